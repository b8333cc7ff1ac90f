"""The two float32 CPU products of a linear layer, and the plan that chooses between them by measuring."""
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from vivace import Engine, VivaceError
from vivace.model import linear_plan
from vivace.model.linear_plan import ROW_BUCKETS, LinearPlan, PlanCache, bucket, plan_linears
from vivace.model.transformer import Linear


@pytest.mark.parametrize("rows", [1, 2, 3, 8, 63, 64, 65, 300])
@pytest.mark.parametrize("bias", [True, False])
def test_both_products_equal_f_linear(rows: int, bias: bool) -> None:
    torch.manual_seed(rows)
    layer = Linear(96, 80, bias=bias)
    x = torch.randn(rows, 96)
    plain = layer(x)
    layer.matmul_buckets = frozenset(ROW_BUCKETS)
    out = layer(x)
    assert out.is_contiguous() and out.shape == (rows, 80)
    torch.testing.assert_close(plain, F.linear(x, layer.weight, layer.bias), rtol=0, atol=0)  # no plan: F.linear
    # W x^T: the same float32 products summed in another order, agreement at rounding level
    torch.testing.assert_close(out, F.linear(x, layer.weight, layer.bias), rtol=1e-5, atol=1e-6)


def test_row_buckets() -> None:
    assert [bucket(r) for r in (0, 1, 2, 3, 4, 5, 9, 33, 64, 65)] == [None, None, 2, 4, 4, 8, 16, 64, 64, None]


def test_a_layer_runs_w_x_t_only_at_its_planned_buckets(monkeypatch: pytest.MonkeyPatch) -> None:
    layer = Linear(32, 16)
    layer.matmul_buckets = frozenset({8})
    calls = []
    real = linear_plan.matmul_product
    monkeypatch.setattr("vivace.model.transformer.matmul_product", lambda *a: calls.append(a[0].shape[0]) or real(*a))
    for rows in (1, 2, 5, 8, 9, 70):
        layer(torch.randn(rows, 32))
    assert calls == [5, 8]


def test_measure_keeps_w_x_t_only_where_it_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fake clocks: W x^T takes half of F.linear's time at 8 rows, 95 % (inside the margin) elsewhere."""
    monkeypatch.setattr(linear_plan, "timings", lambda weight, rows, generator: (1.0, 0.5 if rows == 8 else 0.95))
    assert linear_plan.measure([(4, 6), (6, 4)]) == LinearPlan({(4, 6): frozenset({8}), (6, 4): frozenset({8})})


def test_timings_time_both_products() -> None:
    linear_s, matmul_s = linear_plan.timings(torch.randn(64, 32), 4, torch.Generator().manual_seed(0))
    assert 0 < linear_s < 1 and 0 < matmul_s < 1


def test_the_cache_measures_each_shape_once_per_machine(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    measured = []

    def fake_measure(shapes):
        measured.append(sorted(shapes))
        return LinearPlan({shape: frozenset({16}) for shape in shapes})

    monkeypatch.setattr(linear_plan, "measure", fake_measure)
    cache = PlanCache(tmp_path / "plans.json")
    assert cache.plan({(8, 4)}, key="A").buckets(8, 4) == {16}
    assert cache.plan({(8, 4), (4, 8)}, key="A").buckets(4, 8) == {16}
    assert cache.plan({(8, 4)}, key="B").buckets(8, 4) == {16}
    assert measured == [[(8, 4)], [(4, 8)], [(8, 4)]]
    data = json.loads((tmp_path / "plans.json").read_text())
    assert data["A"] == {"4x8": [16], "8x4": [16]}
    (tmp_path / "plans.json").write_text("{not json")  # a damaged cache is measured again and rewritten
    assert cache.plan({(8, 4)}, key="A").buckets(8, 4) == {16} and len(measured) == 4
    unwritable = PlanCache(tmp_path / "file" / "plans.json")
    (tmp_path / "file").write_text("a file where the folder would be")
    assert unwritable.plan({(8, 4)}, key="A").buckets(8, 4) == {16}


def test_engine_modes(tiny_pack: Path) -> None:
    plain = Engine.from_pack(tiny_pack, linear_products="linear")
    everywhere = Engine.from_pack(tiny_pack, linear_products="matmul")
    measured = Engine.from_pack(tiny_pack)
    layers = [m for m in everywhere.core.runners["coarse"].model.modules() if isinstance(m, Linear)]
    assert layers and all(m.matmul_buckets == frozenset(ROW_BUCKETS) for m in layers)
    assert all(not m.matmul_buckets for s in plain.family.stages().values() for m in s.model.modules() if isinstance(m, Linear))
    assert plain.info()["linear_matmul_rows"] == {}
    assert set(measured.info()["linear_matmul_rows"]) <= {f"{i}x{o}" for i, o in everywhere.linear_plan.matmul_buckets}
    # the products differ in rounding only: the same tokens
    events = [list(e.events("calm piano", 1.0, seed=3)) for e in (plain, everywhere, measured)]
    tokens = [[ev.tokens for ev in run if hasattr(ev, "tokens")] for run in events]
    assert tokens[0] == tokens[1] == tokens[2]
    with pytest.raises(VivaceError, match="linear_products must be one of auto, linear, matmul, got 'fast'"):
        Engine.from_pack("/nonexistent", linear_products="fast")


def test_int8_layers_have_no_plan(tiny_pack: Path) -> None:
    engine = Engine.from_pack(tiny_pack, quantize="int8", linear_products="matmul")
    assert engine.linear_plan == LinearPlan()
    assert plan_linears([], "auto") == LinearPlan()

"""Every kernel implementation provides its interface (vivace.kernels.ops) with the interface's exact parameters, so
dispatch can hand any of them to the stage transformer."""
from __future__ import annotations

import importlib
import inspect

import pytest

from vivace.kernels.ops import AttentionOps, FusedOps

IMPLEMENTATIONS = {
    AttentionOps: ["paged_attention", "cpu_paged_attention", "triton_paged_attention"],
    FusedOps: ["fused", "triton_fused"],
}


def interface_parameters(protocol: type, name: str) -> list[tuple[str, object]]:
    parameters = list(inspect.signature(getattr(protocol, name)).parameters.values())[1:]  # without self
    return [(p.name, p.default) for p in parameters]


@pytest.mark.parametrize(
    "protocol, module", [(protocol, module) for protocol, modules in IMPLEMENTATIONS.items() for module in modules]
)
def test_module_implements_its_interface(protocol: type, module: str) -> None:
    if module.startswith("triton_"):
        pytest.importorskip("triton")
    implementation = importlib.import_module(f"vivace.kernels.{module}")
    ops = [name for name in vars(protocol) if not name.startswith("_") and callable(getattr(protocol, name))]
    assert ops
    for name in ops:
        function = getattr(implementation, name)
        got = [(p.name, p.default) for p in inspect.signature(function).parameters.values()]
        assert got == interface_parameters(protocol, name), f"{module}.{name}"

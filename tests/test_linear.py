import pytest
import torch
import torch.nn.functional as F

from vivace.model.transformer import Linear


@pytest.mark.parametrize("rows", [1, 2, 3, 64, 65, 300])
@pytest.mark.parametrize("bias", [True, False])
def test_few_row_product_equals_f_linear(rows: int, bias: bool) -> None:
    torch.manual_seed(rows)
    layer = Linear(96, 80, bias=bias)
    x = torch.randn(rows, 96)
    out = layer(x)
    assert out.is_contiguous() and out.shape == (rows, 80)
    # the same float32 products summed in another order: agreement at rounding level
    torch.testing.assert_close(out, F.linear(x, layer.weight, layer.bias), rtol=1e-5, atol=1e-6)

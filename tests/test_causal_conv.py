"""vivace._C.causal_conv1d (the streaming codec's convolutions, ELU and residual add fused) against torch.

Tolerance: each output is a float32 sum of in_channels * kernel products added in another order than torch's
convolution (and the bias and residual added first, not last), so the two differ by float32 rounding: at most
1e-5 of the output's largest magnitude (measured: under 1e-6). The AVX-512 and the portable form, and every thread
count, give the same bits: the sum order is fixed.
"""
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from vivace import _C
from vivace.codecs.causal_stream import phase_weights
from vivace.codecs.soundstream import CausalConvTranspose1d

REL = 1e-5


def close(y: torch.Tensor, ref: torch.Tensor) -> bool:
    return y.shape == ref.shape and float((y - ref).abs().max()) <= REL * (1 + float(ref.abs().max()))


def conv(x, weight, bias=None, dilation=1, elu=False, residual=None, context=None, threads=1, portable=False):
    def array(t):
        return None if t is None else t.numpy()

    return torch.from_numpy(_C.causal_conv1d(array(x), array(weight), array(bias), dilation, elu, array(residual),
                                             array(context), threads, portable))


@pytest.mark.parametrize("seed", range(12))
def test_matches_torch_with_context_elu_and_residual(seed: int) -> None:
    rng = random.Random(seed)
    torch.manual_seed(seed)
    batch, cin, cout = rng.choice([1, 2, 3]), rng.choice([1, 5, 16, 64]), rng.choice([1, 3, 8, 16, 70])
    kernel, dilation = rng.choice([1, 2, 3, 7]), rng.choice([1, 3, 9])
    reach = (kernel - 1) * dilation
    context_length = rng.choice([0, reach, reach + 5]) if reach else rng.choice([0, 4])
    length = rng.choice([1, 17, 64, 65, 200]) + max(0, reach - context_length)
    x, context = torch.randn(batch, cin, length) * 3, torch.randn(batch, cin, context_length) * 3
    weight, bias = torch.randn(cout, cin, kernel), rng.choice([None, torch.randn(cout)])
    elu = rng.random() < 0.5
    joined = torch.cat([context, x], dim=-1)
    ref = F.conv1d(F.elu(joined) if elu else joined, weight, bias, dilation=dilation)
    residual = rng.choice([None, torch.randn_like(ref)])
    if residual is not None:
        ref = residual + ref
    first = conv(x, weight, bias, dilation, elu, residual, context if context_length else None)
    assert close(first, ref)
    for threads in (1, 2, 3):
        for portable in (False, True):
            assert torch.equal(conv(x, weight, bias, dilation, elu, residual, context if context_length else None,
                                    threads, portable), first)


@pytest.mark.parametrize("stride,kernel", [(2, 4), (3, 6), (8, 16), (4, 4), (3, 7), (5, 10)])
def test_transposed_convolution_by_phases(stride: int, kernel: int) -> None:
    torch.manual_seed(stride * 100 + kernel)
    layer = CausalConvTranspose1d(6, 5, kernel, stride)
    x = torch.randn(2, 6, 40)
    with torch.no_grad():
        ref = layer(F.elu(x))  # [2, 5, 40 * stride]
    weight, bias = phase_weights(layer)
    taps = weight.shape[-1]
    y = conv(x, weight, bias, elu=True, context=torch.zeros(2, 6, taps - 1) if taps > 1 else None)
    y = y.view(2, stride, 5, 40).permute(0, 2, 3, 1).reshape(2, 5, 40 * stride)
    assert close(y, ref)


@pytest.mark.parametrize("kwargs,message", [
    (dict(weight=torch.zeros(4, 3, 3)), "input channels"),
    (dict(x=torch.zeros(1, 2, 1)), "shorter than the kernel's reach"),
    (dict(residual=torch.zeros(1, 4, 5)), "must have the output's shape"),
    (dict(context=torch.zeros(2, 2, 4)), "batch and channels of x"),
    (dict(x=torch.zeros(1, 2, 8, dtype=torch.float64)), "dtype float32"),
    (dict(dilation=0), "dilation must be at least 1"),
])
def test_refuses_bad_arguments_in_one_line(kwargs: dict, message: str) -> None:
    args = dict(x=torch.zeros(1, 2, 8), weight=torch.zeros(4, 2, 3), dilation=1, residual=None, context=None)
    args.update(kwargs)
    with pytest.raises(ValueError, match=message) as error:
        conv(args["x"], args["weight"], None, args["dilation"], False, args["residual"], args["context"])
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("batch,cout,length", [(0, 4, 10), (1, 0, 10), (1, 4, 3)])
def test_empty_outputs(batch: int, cout: int, length: int) -> None:
    y = conv(torch.zeros(batch, 2, length), torch.zeros(cout, 2, 4))
    assert y.shape == (batch, cout, length - 3)


def test_fast_flag_names_the_form_that_runs() -> None:
    assert isinstance(_C.causal_conv1d_fast(), bool)
    x, weight = np.ones((1, 1, 4), np.float32), np.ones((1, 1, 1), np.float32)
    assert _C.causal_conv1d(x, weight).tolist() == [[[1.0, 1.0, 1.0, 1.0]]]

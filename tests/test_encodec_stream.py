"""Overlapped chunk decoding of EnCodec against one full decode: the error bounds of vivace.codecs.context_decoder."""
from itertools import pairwise

import pytest
import torch
from encodec_models import CONFIGS, random_decoder

from vivace.codecs.context_decoder import ContextDecoder
from vivace.codecs.encodec import EncodecConfig, EncodecDecoder

BOUNDS = {8: 1e-2, 16: 1e-3, 32: 1e-5}  # context frames on each side -> max |chunked - full| / max |full|


def decode_overlapped(decoder: EncodecDecoder, codes: torch.Tensor, chunk: int, left: int, right: int) -> torch.Tensor:
    return ContextDecoder(decoder, decoder.config.hop_length, left, right).chunks(codes, chunk)


def random_codes(config: EncodecConfig, batch: int, frames: int, seed: int) -> torch.Tensor:
    return torch.randint(0, config.codebook_size, (batch, config.num_levels, frames), generator=torch.Generator().manual_seed(seed))


def relative_error(decoder: EncodecDecoder, codes: torch.Tensor, chunk: int, left: int, right: int) -> float:
    with torch.inference_mode():
        full = decoder(codes)
    got = decode_overlapped(decoder, codes, chunk, left, right)
    assert got.shape == full.shape
    return (got - full).abs().max().item() / full.abs().max().item()


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("seed", [0, 1])
def test_error_bound_and_more_context_helps(name: str, seed: int) -> None:
    config = CONFIGS[name]
    decoder = random_decoder(config, seed)
    codes = random_codes(config, 2, 150, seed)
    for chunk in (10, 25):
        errors = [relative_error(decoder, codes, chunk, context, context) for context in (0, 4, *BOUNDS)]
        assert errors[0] > 0.05
        assert all(a > b for a, b in pairwise(errors)), errors
        for error, bound in zip(errors[2:], BOUNDS.values()):
            assert error <= bound, (chunk, errors)


def test_causal_needs_no_right_context() -> None:
    config = CONFIGS["causal_24khz"]
    decoder = random_decoder(config, 3)
    codes = random_codes(config, 1, 90, 3)
    with_right = decode_overlapped(decoder, codes, 15, 16, 16)
    without = decode_overlapped(decoder, codes, 15, 16, 0)
    assert (with_right - without).abs().max().item() <= 1e-6 * with_right.abs().max().item()


@pytest.mark.parametrize("name", list(CONFIGS))
def test_one_chunk_or_full_context_is_the_full_decode(name: str) -> None:
    config = CONFIGS[name]
    decoder = random_decoder(config, 4)
    codes = random_codes(config, 2, 40, 4)
    with torch.inference_mode():
        full = decoder(codes)
    assert torch.equal(decode_overlapped(decoder, codes, 40, 0, 0), full)
    assert torch.equal(decode_overlapped(decoder, codes, 64, 3, 3), full)
    assert (decode_overlapped(decoder, codes, 7, 40, 40) - full).abs().max().item() <= 1e-5


def test_rejects_bad_sizes() -> None:
    decoder = random_decoder(CONFIGS["musicgen_32khz"], 0)
    codes = random_codes(decoder.config, 1, 10, 0)
    for args in [(0, 1, 1), (5, -1, 0), (5, 0, -2)]:
        with pytest.raises(ValueError, match="chunk_frames|context frames"):
            decode_overlapped(decoder, codes, *args)

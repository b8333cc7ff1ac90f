import random
from pathlib import Path

import torch

from vivace.codecs.context_decoder import ContextDecoder
from vivace.families.musiclm.pack import load_pack


@torch.no_grad()
def test_chunked_decode_equals_full_decode(tiny_pack: Path) -> None:
    codec = load_pack(tiny_pack).codec
    codes = torch.randint(0, codec.config.codebook_size, (2, codec.config.num_levels, 90))
    full = codec(codes)
    hop = codec.config.hop_length
    assert full.shape == (2, 90 * hop)
    rng = random.Random(0)
    cuts = sorted(rng.sample(range(1, 90), 6))
    decoder = ContextDecoder(codec, hop, codec.receptive_field_frames())
    pieces = [decoder.range(codes[..., :end], start, end) for start, end in zip([0] + cuts, cuts + [90])]
    # causal convolutions with the full receptive field as left context: equal up to float32 summation order
    assert (torch.cat(pieces, dim=-1) - full).abs().max() <= 1e-5


@torch.no_grad()
def test_frame_depends_only_on_past_frames(tiny_pack: Path) -> None:
    codec = load_pack(tiny_pack).codec
    codes = torch.randint(0, codec.config.codebook_size, (1, codec.config.num_levels, 40))
    changed = codes.clone()
    changed[..., 30:] = (changed[..., 30:] + 1) % codec.config.codebook_size
    hop = codec.config.hop_length
    assert torch.equal(codec(codes)[..., : 30 * hop], codec(changed)[..., : 30 * hop])

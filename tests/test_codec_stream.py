"""CodecStream: chunk-by-chunk decode with carried convolution state (torch ops or the native convolutions) equals
one full decode."""
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from vivace import Engine
from vivace.codecs.backend import FrameStream, TorchBackend
from vivace.codecs.causal_stream import CodecStream
from vivace.codecs.context_decoder import ContextDecoder, ContextStream
from vivace.codecs.soundstream import CodecConfig, SoundStreamDecoder
from vivace.families.musiclm.pack import load_pack
from vivace.families.musiclm.pipeline import MusicLM
from vivace.families.musiclm.random_pack import preset_config

TOL = 1e-5
OTHER = CodecConfig(
    num_levels=4, codebook_size=16, codebook_dim=8, channels=6, ratios=(2, 5, 3),
    residual_dilations=(1, 2), kernel_size=5, residual_kernel_size=5,
)


def random_decoder(config: CodecConfig, seed: int = 0) -> SoundStreamDecoder:
    torch.manual_seed(seed)
    codec = SoundStreamDecoder(config).eval()
    with torch.no_grad():
        codec.codebooks.normal_()
    return codec


@pytest.mark.parametrize("native", [False, True], ids=["torch", "native"])
@pytest.mark.parametrize("config", [preset_config("tiny").codec, OTHER], ids=["tiny", "other"])
def test_stream_equals_full_decode_for_random_chunks(config: CodecConfig, native: bool) -> None:
    codec = random_decoder(config)
    codes = torch.randint(0, config.codebook_size, (2, config.num_levels, 120))
    with torch.inference_mode():
        full = codec(codes)
    rng = random.Random(1)
    for _ in range(4):
        stream, pieces, t = CodecStream(codec, native), [], 0
        while t < 120:
            n = rng.choice([1, 2, rng.randint(1, 40)])
            pieces.append(stream.push(codes[..., t : t + n]))
            assert pieces[-1].shape == (2, min(n, 120 - t) * config.hop_length)
            t += n
        assert stream.frames == 120
        assert (torch.cat(pieces, dim=-1) - full).abs().max() <= TOL


@pytest.mark.parametrize("native", [False, True], ids=["torch", "native"])
def test_empty_push_changes_nothing(native: bool) -> None:
    codec = random_decoder(OTHER)
    codes = torch.randint(0, OTHER.codebook_size, (1, OTHER.num_levels, 30))
    stream = CodecStream(codec, native)
    head = stream.push(codes[..., :10])
    assert stream.push(codes[..., 10:10]).shape == (1, 0)
    tail = stream.push(codes[..., 10:])
    with torch.inference_mode():
        assert (torch.cat([head, tail], dim=-1) - codec(codes)).abs().max() <= TOL


def test_streams_of_one_backend_share_their_phase_weights() -> None:
    """A backend's streams copy the transposed convolutions' phase weights once between them, and each stream still
    decodes its own codes. (Native form forced: where AVX-512 is missing it runs the portable scalar form.)"""
    codec = random_decoder(OTHER)
    backend = TorchBackend(codec)
    assert backend.stream()._phases is backend._phases is backend.stream()._phases
    codes = torch.randint(0, OTHER.codebook_size, (2, 1, OTHER.num_levels, 20))
    first = CodecStream(codec, True, backend._phases).push(codes[0])
    filled = dict(backend._phases)
    assert len(filled) == len(OTHER.ratios)  # one entry per transposed convolution
    second = CodecStream(codec, True, backend._phases).push(codes[1])
    assert all(backend._phases[conv] is filled[conv] for conv in filled)  # the second stream copied nothing
    with torch.inference_mode():
        for pcm, clip in ((first, codes[0]), (second, codes[1])):
            assert (pcm - codec(clip)).abs().max() <= TOL


def test_context_stream_and_range_match_the_module(tiny_pack: Path) -> None:
    codec = load_pack(tiny_pack).codec
    backend = TorchBackend(codec)
    hop = codec.config.hop_length
    codes = torch.randint(0, codec.config.codebook_size, (1, codec.config.num_levels, 70))
    with torch.inference_mode():
        full = codec(codes)
    assert (backend.context_decoder.range(codes[..., :50], 20, 50) - full[..., 20 * hop : 50 * hop]).abs().max() <= TOL
    stream = backend.context_decoder.stream()
    pieces = [stream.push(codes[..., t : t + 9]) for t in range(0, 70, 9)]
    assert (torch.cat(pieces, dim=-1) - full).abs().max() <= TOL


class CountingStream(ContextStream):
    def __init__(self, decoder: ContextDecoder, pushed: list[int]) -> None:
        super().__init__(decoder)
        self.pushed = pushed

    def push(self, codes: torch.Tensor) -> torch.Tensor:
        self.pushed.append(codes.shape[-1])
        return super().push(codes)


class CountingBackend(TorchBackend):
    """Streams by re-decoding the left context (what the onnxruntime backend does), counting frames pushed."""

    def __init__(self, codec: SoundStreamDecoder) -> None:
        super().__init__(codec)
        self.pushed: list[int] = []

    def stream(self) -> FrameStream:
        return CountingStream(self.context_decoder, self.pushed)


def test_pipeline_streams_each_chunk_once_and_matches_context_decode(engine: Engine) -> None:
    counting = CountingBackend(engine.pack.codec)
    redecode = Engine(MusicLM(engine.pack, counting), engine.device, engine.dtype, engine.block_size, engine.kv_cache_gb)
    prompts = ["warm analog synth", "solo cello"]
    streamed = engine.generate(prompts, 1.3, seed=7)
    reference = redecode.generate(prompts, 1.3, seed=7)
    chunk = round(engine.config.musiclm.fine_chunk_s * engine.config.frame_rate)
    frames = round(1.3 * engine.config.frame_rate)
    assert sorted(counting.pushed) == sorted([chunk, chunk, frames - 2 * chunk] * 2)
    assert streamed.shape == reference.shape == (2, round(1.3 * engine.sample_rate))
    assert np.abs(streamed - reference).max() <= TOL
    assert engine.info()["codec_backend"] == "torch"

"""Decoding a chunk of frames with context: the one way any codec decodes part of a track.

The chunk's frames are decoded together with up to `left` frames before it and `right` frames after it, and only
the chunk's own samples are kept. For a causal codec with a bounded receptive field (SoundStream), `left` = that
field and `right` = 0 give exactly the chunk's samples of one full decode. For EnCodec they approximate it: the LSTM
starts each chunk from a zero state and the chunk's edges are reflect-padded instead of seeing their neighbours; the
error falls fast with context (docs/codec_backends.md has the measured bound, tests/test_encodec_stream.py asserts
it).

`range` decodes one chunk of a track in memory, `chunks` a whole track chunk by chunk, `span` / `decode_span` let a
caller copy only the frames a chunk reads, and `ContextStream` decodes frames as they arrive, keeping the last
`left` frames as the next chunk's context.
"""
from __future__ import annotations

from collections.abc import Callable

import torch


class ContextDecoder:
    def __init__(self, decode: Callable[[torch.Tensor], torch.Tensor], hop_length: int, left: int, right: int = 0) -> None:
        """decode: codes [B, levels, frames] -> PCM [B, frames * hop_length]."""
        if isinstance(left, bool) or isinstance(right, bool) or left < 0 or right < 0:
            raise ValueError(f"context frames must be integers >= 0, got left {left!r} and right {right!r}")
        self.decode = decode
        self.hop_length = hop_length
        self.left = left
        self.right = right

    def span(self, start: int, end: int, total: int) -> tuple[int, int]:
        """The frames [low, high) that decoding frames [start, end) of a track of `total` frames reads."""
        return max(0, start - self.left), min(total, end + self.right)

    @torch.inference_mode()
    def decode_span(self, codes: torch.Tensor, low: int, start: int, end: int) -> torch.Tensor:
        """PCM [B, (end - start) * hop] of frames [start, end), from codes holding frames [low, span(...)[1])."""
        hop = self.hop_length
        return self.decode(codes)[..., (start - low) * hop : (end - low) * hop]

    def range(self, codes: torch.Tensor, start: int, end: int) -> torch.Tensor:
        """PCM of frames [start, end) of codes [B, levels, frames]."""
        low, high = self.span(start, end, codes.shape[-1])
        return self.decode_span(codes[..., low:high], low, start, end)

    def chunks(self, codes: torch.Tensor, chunk_frames: int) -> torch.Tensor:
        """PCM [B, frames * hop] of all of codes, one decode per chunk of chunk_frames."""
        if isinstance(chunk_frames, bool) or chunk_frames <= 0:
            raise ValueError(f"chunk_frames must be a positive integer, got {chunk_frames!r}")
        frames = codes.shape[-1]
        return torch.cat([self.range(codes, start, min(start + chunk_frames, frames)) for start in range(0, frames, chunk_frames)], dim=-1)

    def stream(self) -> ContextStream:
        return ContextStream(self)


class ContextStream:
    """Frames as they arrive: push(codes [B, levels, frames]) -> PCM [B, frames * hop] of exactly those frames,
    decoded with the last `left` frames pushed before them (a stream has no right context)."""

    def __init__(self, decoder: ContextDecoder) -> None:
        if decoder.right:
            raise ValueError("a stream has no right context: decode chunks whose right context exists with range()")
        self.decoder = decoder
        self.history: torch.Tensor | None = None

    def push(self, codes: torch.Tensor) -> torch.Tensor:
        joined = codes if self.history is None else torch.cat([self.history, codes], dim=-1)
        context = joined.shape[-1] - codes.shape[-1]
        self.history = joined[..., max(0, joined.shape[-1] - self.decoder.left) :]
        return self.decoder.range(joined, context, joined.shape[-1])

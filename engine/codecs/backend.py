"""Codec backends: who turns codes [B, levels, frames] into PCM [B, frames * hop].

Every backend decodes codes [B, levels, frames] whole (`decode`) and opens per-row streams for the pipeline.
"torch" runs the module and streams with carried convolution state (CodecStream); "onnxruntime" runs
PACK/codec.onnx (written by `vivace export onnx PACK`) and streams by re-decoding the receptive field of left
context per chunk (vivace.codecs.context_decoder), since the exported graph is stateless.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from vivace.codecs.causal_stream import CodecStream
from vivace.codecs.context_decoder import ContextDecoder
from vivace.codecs.soundstream import PaddedConv1d
from vivace.errors import VivaceError
from vivace.packs.manifest import CodecOnnx


class CodecPack(Protocol):
    """What choosing a codec backend reads of a pack, whatever its family."""

    path: Path
    codec: nn.Module
    codec_onnx: CodecOnnx | None

BACKENDS = ("auto", "torch", "onnxruntime", "tensorrt")
GPU_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider")
# setup.py's extras as plain packages: `pip install 'vivace[onnx]'` needs vivace on an index (or -e '.[onnx]' in
# its checkout), while the packages themselves install the same way whichever way vivace was installed
EXTRA_PACKAGES = {"onnx": "onnx onnxruntime", "tensorrt": "onnx onnxruntime-gpu tensorrt"}


def install_hint(extra: str) -> str:
    """How to install an extra, quoted so that zsh does not glob the brackets."""
    return f"pip install 'vivace[{extra}]', or pip install {EXTRA_PACKAGES[extra]}"


def min_frames(codec: nn.Module) -> int:
    """The fewest frames an exported graph of codec decodes: 1, or for reflect padding one more than the widest pad
    (the exporter traces pad1d's long-input branch)."""
    pads = [max(m.pad_left, m.pad_right) for m in codec.modules() if isinstance(m, PaddedConv1d) and m.pad_mode == "reflect"]
    return max(pads, default=0) + 1


class FrameStream(Protocol):
    def push(self, codes: torch.Tensor) -> torch.Tensor:
        """codes [B, levels, frames] following the previous push -> PCM [B, frames * hop] of those frames."""
        ...


def check_codes(codes: Any, codebooks: torch.Tensor, all_levels: bool) -> torch.Tensor:
    """A user's codes (numpy or torch, [levels, frames] or [rows, levels, frames]) as int64 [rows, levels, frames] on
    the codebooks' device, refused with one line unless they hold at least one frame, every code is in
    [0, codebook_size) and the levels are the codebooks' (all_levels) or at most as many."""
    levels, size = codebooks.shape[:2]
    if isinstance(codes, np.ndarray):
        codes = torch.from_numpy(codes)
    if not isinstance(codes, torch.Tensor):
        raise VivaceError(f"codes must be a numpy array or a torch tensor, got {type(codes).__name__}")
    if codes.is_floating_point() or codes.is_complex() or codes.dtype == torch.bool:
        raise VivaceError(f"codes must be integers, got {str(codes.dtype).removeprefix('torch.')}")
    fits = codes.dim() in (2, 3) and (codes.shape[-2] == levels if all_levels else 1 <= codes.shape[-2] <= levels)
    if not fits:
        wanted = f"this pack's {levels} levels" if all_levels else f"at most this pack's {levels} levels"
        raise VivaceError(f"codes must be [levels, frames] or [rows, levels, frames] with {wanted}, got shape {list(codes.shape)}")
    if codes.numel() == 0:
        raise VivaceError(f"codes must hold at least one row and one frame, got shape {list(codes.shape)}")
    if int(codes.min()) < 0 or int(codes.max()) >= size:
        raise VivaceError(f"codes must be in [0, {size}), got values from {int(codes.min())} to {int(codes.max())}")
    batch = codes if codes.dim() == 3 else codes.unsqueeze(0)
    return batch.to(device=codebooks.device, dtype=torch.int64)


class CodecBackend(ABC):
    name: str

    def __init__(self, codec: nn.Module) -> None:
        """codec: a decoder module; one with receptive_field_frames() (a causal codec) streams by chunks."""
        self.codec = codec
        self.hop_length = codec.config.hop_length
        field = getattr(codec, "receptive_field_frames", None)
        self.context_frames = field() if callable(field) else None
        # part of a track: exact with the receptive field as left context; None for codecs decoded whole
        self.context_decoder = ContextDecoder(self.decode, self.hop_length, self.context_frames) if self.context_frames is not None else None

    @abstractmethod
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """codes [B, levels, frames] -> PCM [B, frames * hop] on the codes' device."""

    def check_codes(self, codes: Any) -> torch.Tensor:
        """A user's codes for this codec, all of its levels (see check_codes)."""
        return check_codes(codes, self.codec.codebooks, all_levels=True)

    def stream(self) -> FrameStream:
        if self.context_decoder is None:
            raise VivaceError(f"{type(self.codec).__name__} has no bounded receptive field: it decodes whole, not by chunks")
        return self.context_decoder.stream()

    def describe(self) -> str:
        return self.name


class TorchBackend(CodecBackend):
    name = "torch"

    def __init__(self, codec: nn.Module) -> None:
        super().__init__(codec)
        self._phases: dict[nn.Module, tuple[torch.Tensor, torch.Tensor | None]] = {}  # shared by its CodecStreams

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return self.codec(codes)

    def stream(self) -> FrameStream:
        return CodecStream(self.codec, phases=self._phases)


class OnnxRuntimeBackend(CodecBackend):
    """CPU execution provider; on a CUDA device also TensorRT/CUDA ones where onnxruntime-gpu offers them."""

    name = "onnxruntime"

    def __init__(self, codec: nn.Module, onnx_path: str, device: torch.device, threads: int = 0) -> None:
        """threads: onnxruntime's intra-op threads (0: its default, one per physical core)."""
        super().__init__(codec)
        self.min_frames = min_frames(codec)
        try:
            import onnxruntime as ort
        except ImportError:
            raise VivaceError(f"codec_backend 'onnxruntime' needs onnxruntime: {install_hint('onnx')}") from None
        available = ort.get_available_providers()
        gpu = [p for p in GPU_PROVIDERS if p in available] if device.type == "cuda" else []
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        # between decodes the stage runner's torch threads need the cores that spinning workers would hold
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(onnx_path, options, providers=[*gpu, "CPUExecutionProvider"])

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        if codes.shape[-1] == 0:
            return torch.zeros(codes.shape[0], 0, device=codes.device)
        if codes.shape[-1] < self.min_frames:
            # the graph refuses inputs shorter than its reflect pads (EnCodec: under 4-7 frames); the module decodes them
            with torch.inference_mode():
                return self.codec(codes)
        (pcm,) = self.session.run(None, {"codes": codes.detach().cpu().numpy().astype(np.int64, copy=False)})
        return torch.from_numpy(pcm).to(codes.device)

    def describe(self) -> str:
        return f"{self.name} ({', '.join(self.session.get_providers())})"


def select_backend(pack: CodecPack, name: str, device: torch.device, cpu_preference: str = "torch") -> CodecBackend:
    """The codec backend for codec_backend=name.

    "auto" is a fixed preference: "onnxruntime" when the pack has codec.onnx and either the device is CUDA and
    onnxruntime offers a TensorRT or CUDA execution provider there, or the family prefers it on the CPU
    (cpu_preference; measured per codec in docs/codec_backends.md); "torch" otherwise. A native "tensorrt" backend
    is not in this build.
    """
    if name not in BACKENDS:
        raise VivaceError(f"unknown codec_backend {name!r} (choose one of {', '.join(BACKENDS)})")
    if name == "tensorrt":
        raise VivaceError(
            "codec_backend 'tensorrt' is not available in this build of vivace (no native TensorRT engine builder); "
            f"on a CUDA machine with the [tensorrt] extra ({install_hint('tensorrt')}), codec_backend 'onnxruntime' "
            "runs codec.onnx through onnxruntime-gpu's TensorRT execution provider"
        )
    providers = _onnxruntime_providers()
    if name == "auto":
        gpu = device.type == "cuda" and providers is not None and any(p in providers for p in GPU_PROVIDERS)
        cpu = cpu_preference == "onnxruntime" and providers is not None
        name = "onnxruntime" if (gpu or cpu) and pack.codec_onnx is not None else "torch"
    if name == "torch":
        return TorchBackend(pack.codec)
    if providers is None:
        raise VivaceError(f"codec_backend 'onnxruntime' needs onnxruntime: {install_hint('onnx')}")
    if pack.codec_onnx is None:
        raise VivaceError(f"codec_backend 'onnxruntime' needs {pack.path}/codec.onnx: run `vivace export onnx {pack.path}`")
    return OnnxRuntimeBackend(pack.codec, str(pack.path / pack.codec_onnx.file), device)


def _onnxruntime_providers() -> list[str] | None:
    """onnxruntime's available execution providers, or None when it is not installed."""
    try:
        import onnxruntime as ort
    except ImportError:
        return None
    return ort.get_available_providers()

"""Audio files: normalisation of generated PCM (loudness, peak, clip), encoding through soundfile (WAV, FLAC, MP3, Ogg
Vorbis, Ogg Opus), output that never leaves a partial file (checked before generation, encoded in memory, written to a
temp file and renamed), and reading reference audio.

Generated audio is float32 and not bounded: a model's codec can return samples past full scale (±1.0). The engine's
`generate` returns it as decoded; `normalize` is what the command line applies before writing, for API users too:

- "loudness" (the command line's default): one gain that brings the integrated loudness (ITU-R BS.1770-4: K-weighted,
  400 ms blocks with 75 % overlap, gated at -70 LUFS and 10 LU below the ungated mean) to `loudness_lufs` (-14 LUFS,
  the level audiocraft's MusicGen examples write and streaming services play at), lowered where needed so the sample
  peak stays at or under `peak_db` (-1 dBFS): nothing clips, so a clip with a high crest factor comes out quieter than
  the target. Audio with no block above the -70 LUFS gate (silence) is returned unchanged.
- "peak": one gain that puts the sample peak at exactly `peak_db` (-1 dBFS), up or down. Silence is unchanged.
- "clip": no gain; samples past ±`peak_db` (±0.891) are cut to it, as audiocraft's "clip" does.
- "none": unchanged. Integer PCM and lossy encoders cannot hold samples past ±1.0, so encoding clips those; 32-bit
  float WAV keeps them.

audiocraft's `audio_write` has the same four strategies (its "rms" aside) with the same 1 dB peak headroom and 14 dB
loudness headroom; its loudness strategy hard-clips what passes full scale, where this one caps the gain instead.
"""
from __future__ import annotations

import io
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vivace.errors import VivaceError

STRATEGIES = ("loudness", "peak", "clip", "none")
DEFAULT_STRATEGY = "loudness"
PEAK_DB = -1.0
LOUDNESS_LUFS = -14.0

FORMATS = ("wav", "flac", "mp3", "ogg", "opus")
EXTENSIONS = {".wav": "wav", ".flac": "flac", ".mp3": "mp3", ".ogg": "ogg", ".opus": "opus"}
BITS = {"wav": (16, 24, 32), "flac": (16, 24)}  # 32 is float; the lossy formats have no bit depth
_PCM_SUBTYPES = {16: "PCM_16", 24: "PCM_24", 32: "FLOAT"}
_LOSSY = {"mp3": ("MP3", "MPEG_LAYER_III"), "ogg": ("OGG", "VORBIS"), "opus": ("OGG", "OPUS")}
_CONTAINERS = {"wav": "WAV", "flac": "FLAC"}


# -- loudness (ITU-R BS.1770-4) ----------------------------------------------------------------------------------
# The K-weighting filter's two biquads at 48 kHz, as the recommendation tabulates them: the head's high shelf, then
# the RLB high-pass. Each rate evaluates this response at its own frequencies (up to 24 kHz), so every rate weighs a
# frequency the same; below 3.4 kHz a rate could not hold the shelf as a biquad of its own.
_SHELF = ((1.53512485958697, -2.69169618940638, 1.19839281085285), (1.0, -1.69065929318241, 0.73248077421585))
_HIGH_PASS = ((1.0, -2.0, 1.0), (1.0, -1.99004745483398, 0.99007225036621))
_ABSOLUTE_GATE_LUFS = -70.0
_RELATIVE_GATE_LU = -10.0


def _biquad_power(coefficients: tuple[tuple[float, ...], tuple[float, ...]], omega: np.ndarray) -> np.ndarray:
    (b0, b1, b2), (a0, a1, a2) = coefficients
    z1 = np.exp(-1j * omega)
    z2 = z1 * z1
    return np.abs((b0 + b1 * z1 + b2 * z2) / (a0 + a1 * z1 + a2 * z2)) ** 2


def _k_weighted(channels: np.ndarray, sample_rate: int) -> np.ndarray:
    """channels [C, N] through the K-weighting magnitude response (zero phase: loudness sums power over 400 ms
    blocks, which the filter's few milliseconds of phase delay do not move). Zero padding of half a second keeps the
    circular convolution's wrap-around out of the signal: the RLB high-pass decays by e in about 4 ms."""
    length = channels.shape[-1]
    size = 1 << max(1, (length + sample_rate // 2 - 1).bit_length())
    freqs = np.fft.rfftfreq(size, 1.0 / sample_rate)
    omega = 2 * np.pi * np.minimum(freqs, 24000.0) / 48000.0
    gain = np.sqrt(_biquad_power(_SHELF, omega) * _biquad_power(_HIGH_PASS, omega))
    return np.fft.irfft(np.fft.rfft(channels, size, axis=-1) * gain, size, axis=-1)[..., :length]


def _channels(audio: np.ndarray) -> np.ndarray:
    """[samples] or [channels, samples] float audio, checked, as float64 [channels, samples]."""
    audio = np.asarray(audio)
    if audio.ndim not in (1, 2) or audio.shape[-1] == 0 or not np.issubdtype(audio.dtype, np.floating):
        raise VivaceError(f"audio must be float PCM [samples] or [channels, samples], got {audio.dtype} {list(audio.shape)}")
    if not np.isfinite(audio).all():
        raise VivaceError("audio has NaN or infinite samples")
    return np.atleast_2d(audio).astype(np.float64)


def loudness(audio: np.ndarray, sample_rate: int) -> float:
    """Integrated loudness in LUFS (ITU-R BS.1770-4) of float PCM [samples] or [channels, samples], every channel
    weighted 1 (the recommendation's left, right and centre weight); -inf when no block passes the -70 LUFS gate. A
    clip shorter than one 400 ms block is measured as one block."""
    if isinstance(sample_rate, bool) or not isinstance(sample_rate, (int, np.integer)) or sample_rate <= 0:
        raise VivaceError(f"sample_rate must be a positive integer, got {sample_rate!r}")
    squared = _k_weighted(_channels(audio), int(sample_rate)) ** 2
    length = squared.shape[-1]
    block, step = round(0.4 * sample_rate), round(0.1 * sample_rate)
    if length <= block:
        starts = np.array([0])
        block = length
    else:
        starts = np.arange(0, length - block + 1, step)
    sums = np.concatenate([np.zeros((squared.shape[0], 1)), np.cumsum(squared, axis=-1)], axis=-1)
    power = ((sums[:, starts + block] - sums[:, starts]) / block).sum(axis=0)  # channels summed, per block
    with np.errstate(divide="ignore"):
        levels = -0.691 + 10 * np.log10(power)
    gated = power[levels > _ABSOLUTE_GATE_LUFS]
    if gated.size == 0:
        return -math.inf
    relative = -0.691 + 10 * math.log10(gated.mean()) + _RELATIVE_GATE_LU
    kept = power[(levels > _ABSOLUTE_GATE_LUFS) & (levels > relative)]
    return float(-0.691 + 10 * math.log10(kept.mean()))


def peak_dbfs(audio: np.ndarray) -> float:
    """The sample peak in dBFS (-inf for silence)."""
    peak = float(np.max(np.abs(audio)))
    return 20 * math.log10(peak) if peak > 0 else -math.inf


def normalize(
    audio: np.ndarray, strategy: str = DEFAULT_STRATEGY, sample_rate: int | None = None, *,
    peak_db: float = PEAK_DB, loudness_lufs: float = LOUDNESS_LUFS,
) -> np.ndarray:
    """A new float32 array: audio (float PCM [samples] or [channels, samples], e.g. a row of Engine.generate) under
    one of STRATEGIES (see the module's docstring). sample_rate is required for "loudness"."""
    if strategy not in STRATEGIES:
        raise VivaceError(f"unknown normalize strategy {strategy!r} (choose one of {', '.join(STRATEGIES)})")
    for name, value in (("peak_db", peak_db), ("loudness_lufs", loudness_lufs)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value > 0:
            raise VivaceError(f"{name} must be a finite number <= 0, got {value!r}")
    data = _channels(audio).reshape(np.shape(audio))
    ceiling = 10 ** (peak_db / 20)
    peak = float(np.max(np.abs(data)))
    if strategy == "clip":
        data = np.clip(data, -ceiling, ceiling)
    elif strategy == "peak" and peak > 0:
        data = data * (ceiling / peak)
    elif strategy == "loudness":
        if sample_rate is None:
            raise VivaceError("loudness normalisation needs the audio's sample_rate")
        measured = loudness(data, sample_rate)
        if math.isfinite(measured):
            data = data * min(10 ** ((loudness_lufs - measured) / 20), ceiling / peak)
    return data.astype(np.float32)


# -- formats and files --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class AudioFormat:
    name: str  # one of FORMATS
    container: str  # soundfile's format
    subtype: str  # soundfile's subtype

    def __str__(self) -> str:
        kind = {"PCM_16": "16-bit PCM", "PCM_24": "24-bit PCM", "FLOAT": "32-bit float"}.get(self.subtype, self.subtype.lower())
        return f"{self.name.upper()} {kind}" if self.name in BITS else {"mp3": "MP3", "ogg": "Ogg Vorbis", "opus": "Ogg Opus"}[self.name]

    @property
    def clips(self) -> bool:
        """Whether samples past ±1.0 are cut when encoded (all but float WAV)."""
        return self.subtype != "FLOAT"


def writable_formats() -> list[str]:
    """The FORMATS the installed libsndfile writes (at their default bit depth)."""
    import soundfile as sf

    return [name for name in FORMATS if sf.check_format(*_soundfile_names(name, None))]


def _soundfile_names(name: str, bits: int | None) -> tuple[str, str]:
    if name in _LOSSY:
        return _LOSSY[name]
    return _CONTAINERS[name], _PCM_SUBTYPES[16 if bits is None else bits]


def audio_format(path: str | Path | None = None, format: str | None = None, bits: int | None = None) -> AudioFormat:
    """The format to write: `format` (one of FORMATS), else the one path's extension names (.wav .flac .mp3 .ogg
    .opus), else WAV when there is no path (a stream). bits: 16 (default) or 24 for WAV and FLAC, 32 (float) for WAV.
    Refused with one line: an unknown name, a known extension naming another format, a bit depth the format has
    not, or a format the installed libsndfile does not write."""
    suffix = Path(path).suffix.lower() if path is not None else ""
    named = EXTENSIONS.get(suffix)
    if format is not None:
        if format not in FORMATS:
            raise VivaceError(f"unknown audio format {format!r} (choose one of {', '.join(FORMATS)})")
        if named is not None and named != format:
            raise VivaceError(f"output {path} ends in {suffix} but the format asked for is {format}")
        name = format
    elif named is not None:
        name = named
    elif path is None:
        name = "wav"
    else:
        raise VivaceError(
            f"cannot tell the audio format of output {path} from its extension (known: {', '.join(EXTENSIONS)}) "
            "and no format was given"
        )
    if bits is not None and name not in BITS:
        raise VivaceError(f"a bit depth applies to WAV and FLAC, not to {name} (a lossy format)")
    if bits is not None and bits not in BITS[name]:
        raise VivaceError(f"{name} takes {' or '.join(str(b) for b in BITS[name])}-bit samples, not {bits}")
    import soundfile as sf

    container, subtype = _soundfile_names(name, bits)
    if not sf.check_format(container, subtype):
        raise VivaceError(
            f"this machine's libsndfile ({sf.__libsndfile_version__}) cannot write {name}; it writes "
            f"{', '.join(writable_formats())}"
        )
    return AudioFormat(name, container, subtype)


def check_output_path(path: str | Path, format: str | None = None, bits: int | None = None) -> Path:
    """An output file that can be written, checked before any work: its format is known and writable here (see
    audio_format), it is not a directory, its directory exists and is writable, and an existing file is writable."""
    path = Path(path)
    if path.is_dir():
        raise VivaceError(f"output {path} is a directory")
    audio_format(path, format, bits)
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise VivaceError(f"output directory {parent} does not exist")
    if not os.access(parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise VivaceError(f"output {path} is not writable")
    return path


def _libsndfile_message(exc: BaseException) -> str:
    message = str(getattr(exc, "error_string", None) or exc)
    return message.removeprefix("Error : ").strip()


def check_sample_rate(fmt: AudioFormat, sample_rate: int) -> None:
    """Refuses a rate the format cannot encode (Opus: 8, 12, 16, 24, 48 kHz; MP3: 8 to 48 kHz), by encoding a few
    samples of silence: libsndfile's own rule decides, before any generation."""
    import soundfile as sf

    try:
        sf.write(io.BytesIO(), np.zeros(64, dtype=np.float32), sample_rate, format=fmt.container, subtype=fmt.subtype)
    except sf.SoundFileError as exc:
        raise VivaceError(f"{fmt} cannot hold this pack's {sample_rate} Hz audio: {_libsndfile_message(exc)}") from None


def clipped_samples(audio: np.ndarray, fmt: AudioFormat) -> int:
    """How many samples encoding in fmt cuts at full scale."""
    return int(np.count_nonzero(np.abs(audio) > 1.0)) if fmt.clips else 0


def encode(audio: np.ndarray, sample_rate: int, fmt: AudioFormat) -> bytes:
    """Float PCM [samples] or [channels, samples] as the bytes of a file in fmt. Integer PCM is rounded to nearest
    after clipping to [-1, 1] (16-bit: x * 32767, as the server's PCM is); float WAV keeps the values."""
    import soundfile as sf

    _channels(audio)
    data = np.atleast_2d(np.asarray(audio))  # in its own precision: float32 rounds to 16 bits as the server's does
    if fmt.subtype == "PCM_16":
        samples: np.ndarray = np.rint(np.clip(data, -1.0, 1.0) * 32767.0).astype(np.int16)
    elif fmt.subtype == "PCM_24":
        # soundfile takes 24-bit samples in the top bits of int32; float32 cannot scale to 24 bits exactly
        samples = np.rint(np.clip(data.astype(np.float64), -1.0, 1.0) * 8388607.0).astype(np.int32) << 8
    elif fmt.subtype == "FLOAT":
        samples = data.astype(np.float32)
    else:
        samples = np.clip(data, -1.0, 1.0).astype(np.float32)
    buffer = io.BytesIO()
    try:
        sf.write(buffer, samples.T, sample_rate, format=fmt.container, subtype=fmt.subtype)
    except (sf.SoundFileError, OSError) as exc:
        raise VivaceError(f"cannot encode {fmt} at {sample_rate} Hz: {_libsndfile_message(exc)}") from None
    return buffer.getvalue()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_audio(
    path: str | Path, audio: np.ndarray, sample_rate: int, format: str | None = None, bits: int | None = None,
) -> Path:
    """Writes float PCM [samples] or [channels, samples] as it is (normalize it first) in the format audio_format
    picks (by default 16-bit WAV for .wav), atomically: the file is encoded in memory, written to a temporary file
    beside it and renamed, so a failed write (a full disk, an encoder error) raises VivaceError with one line and
    leaves neither a partial file nor the temporary one."""
    path = check_output_path(path, format, bits)
    return write_atomically(path, encode(audio, sample_rate, audio_format(path, format, bits)))


def write_atomically(path: Path, data: bytes) -> Path:
    """data to a temporary file beside path, renamed to path: a failed write raises VivaceError with one line and
    leaves neither a partial file nor the temporary one; the file gets the mode open() would give it."""
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "wb") as file:
            file.write(data)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; give the file the mode open() would have
        os.replace(tmp, path)
    except OSError as exc:
        raise VivaceError(f"could not write {path}: {exc.strerror or exc}") from None
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
    return path


def read_audio(path: str | Path) -> tuple[np.ndarray, int]:
    """A sound file (WAV, FLAC, ... as soundfile reads them) -> float32 PCM [channels, samples] and its sample rate."""
    path = Path(path)
    if not path.is_file():
        raise VivaceError(f"audio file {path} does not exist")
    import soundfile as sf

    try:
        data, rate = sf.read(str(path), dtype="float32", always_2d=True)
    except (RuntimeError, OSError) as exc:
        raise VivaceError(f"{path}: unreadable audio ({exc})") from None
    return np.ascontiguousarray(data.T), int(rate)


MAX_CHANNELS = 8


def read_pcm(audio: Any, sample_rate: Any, what: str) -> tuple[np.ndarray, int]:
    """An audio input of the API (a sound file path, or PCM [samples] / [channels <= 8, samples] as a numpy array or
    torch tensor, with `{what}_sample_rate`) -> finite real PCM and its sample rate; anything else is refused in one
    line naming `what`."""
    if isinstance(audio, (str, Path)):
        if sample_rate is not None:
            raise VivaceError(f"{what}_sample_rate is for PCM arrays; a sound file carries its own rate")
        pcm, sample_rate = read_audio(audio)
    elif isinstance(audio, (np.ndarray, torch.Tensor)):
        pcm = audio.detach().cpu().numpy() if isinstance(audio, torch.Tensor) else audio
        if sample_rate is None:
            raise VivaceError(f"{what}_sample_rate is required with a PCM array {what}")
    else:
        raise VivaceError(f"{what} must be a sound file path or a PCM array, got {type(audio).__name__}")
    if isinstance(sample_rate, bool) or not isinstance(sample_rate, (int, np.integer)) or sample_rate <= 0:
        raise VivaceError(f"{what}_sample_rate must be a positive integer, got {sample_rate!r}")
    if not (np.issubdtype(pcm.dtype, np.floating) or np.issubdtype(pcm.dtype, np.integer)):
        raise VivaceError(f"{what} PCM must hold real numbers, got dtype {pcm.dtype}")
    if pcm.ndim not in (1, 2) or pcm.shape[-1] == 0 or (pcm.ndim == 2 and not 1 <= pcm.shape[0] <= MAX_CHANNELS):
        raise VivaceError(f"{what} PCM must be [samples] or [channels <= {MAX_CHANNELS}, samples], got shape {list(pcm.shape)}")
    if not np.isfinite(pcm).all():
        raise VivaceError(f"{what} PCM holds NaN or infinite values")
    return pcm, int(sample_rate)

"""WAV output that never leaves a partial file (checked before generation, written to a temp file, renamed), and
reading reference audio."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np

from vivace.errors import VivaceError


def check_output_path(path: str | Path) -> Path:
    path = Path(path)
    if path.suffix.lower() != ".wav":
        raise VivaceError(f"output {path} must end in .wav")
    if path.is_dir():
        raise VivaceError(f"output {path} is a directory")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise VivaceError(f"output directory {parent} does not exist")
    if not os.access(parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise VivaceError(f"output {path} is not writable")
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_wav(path: str | Path, audio: np.ndarray, sample_rate: int) -> Path:
    """Writes float32 PCM [samples] or [channels, samples] as 32-bit float WAV, atomically."""
    path = check_output_path(path)
    data = audio.T if audio.ndim == 2 else audio
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        import soundfile as sf  # file I/O only: generating audio in memory does not need it

        sf.write(tmp, data, sample_rate, subtype="FLOAT", format="WAV")
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; give the file the mode open() would have
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
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

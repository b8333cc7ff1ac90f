"""The bytes of served audio: 16-bit PCM, WAV (whole, or with a streaming header), and whatever else soundfile writes.

Every format starts from the same conversion, `pcm16`, so a served response and offline generation converted with
it agree byte for byte.
"""
from __future__ import annotations

import io
import struct
from dataclasses import dataclass

import numpy as np

STREAMABLE = ("pcm", "wav")  # formats whose bytes can be sent as each chunk is decoded
OPUS_RATES = (8000, 12000, 16000, 24000, 48000)  # Opus encodes only these (no resampling here)
UNKNOWN_LENGTH = 0xFFFFFFFF  # the RIFF and data sizes of a WAV whose length is not known when its header is sent


@dataclass(frozen=True)
class AudioFormat:
    name: str
    media_type: str
    soundfile_format: str | None = None  # None: written here (pcm, wav)
    soundfile_subtype: str | None = None


FORMATS = {
    "pcm": AudioFormat("pcm", "audio/pcm"),
    "wav": AudioFormat("wav", "audio/wav"),
    "flac": AudioFormat("flac", "audio/flac", "FLAC", "PCM_16"),
    "mp3": AudioFormat("mp3", "audio/mpeg", "MP3", "MPEG_LAYER_III"),
    "opus": AudioFormat("opus", "audio/ogg", "OGG", "OPUS"),
}


def available_formats(sample_rate: int) -> dict[str, AudioFormat]:
    """The formats this machine can write at a rate: pcm and wav always, flac / mp3 / opus where the installed
    libsndfile has them (opus only at its own rates)."""
    import soundfile as sf

    formats = {}
    for name, fmt in FORMATS.items():
        if fmt.soundfile_format is None:
            formats[name] = fmt
        elif fmt.soundfile_format in sf.available_formats() and fmt.soundfile_subtype in sf.available_subtypes(fmt.soundfile_format):
            if name != "opus" or sample_rate in OPUS_RATES:
                formats[name] = fmt
    return formats


def pcm16(samples: np.ndarray) -> bytes:
    """Float32 PCM in [-1, 1] -> 16-bit little-endian PCM (clipped, rounded to nearest)."""
    scaled = np.rint(np.clip(samples, -1.0, 1.0) * 32767.0)
    return scaled.astype("<i2").tobytes()


def wav_header(sample_rate: int, data_bytes: int = UNKNOWN_LENGTH, channels: int = 1) -> bytes:
    """A 44-byte RIFF header of 16-bit PCM. A streamed WAV sends it first with the sizes unknown (0xFFFFFFFF), as
    streaming players and decoders expect."""
    riff_size = UNKNOWN_LENGTH if data_bytes == UNKNOWN_LENGTH else 36 + data_bytes
    block_align = channels * 2
    return b"".join([
        b"RIFF", struct.pack("<I", riff_size), b"WAVE",
        b"fmt ", struct.pack("<IHHIIHH", 16, 1, channels, sample_rate, sample_rate * block_align, block_align, 16),
        b"data", struct.pack("<I", data_bytes),
    ])


def encode_whole(fmt: AudioFormat, samples: np.ndarray, sample_rate: int) -> bytes:
    """A whole clip (float32 [samples]) in one format."""
    if fmt.name == "pcm":
        return pcm16(samples)
    if fmt.name == "wav":
        data = pcm16(samples)
        return wav_header(sample_rate, len(data)) + data
    import soundfile as sf

    buffer = io.BytesIO()
    sf.write(buffer, samples, sample_rate, format=fmt.soundfile_format, subtype=fmt.soundfile_subtype)
    return buffer.getvalue()

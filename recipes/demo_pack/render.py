"""Renders the procedural pieces with FluidSynth and the General MIDI soundfont into 24 kHz mono clips.

Writes DATA/clips.npy (int16 [pieces, samples]) and DATA/pieces.jsonl (caption and metadata per piece);
pieces whose index is a multiple of HELD_OUT_EVERY form the held-out split.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import tempfile
from dataclasses import asdict
from multiprocessing import Pool
from pathlib import Path

import numpy as np
import soundfile as sf
from compose import compose, draw_piece

SAMPLE_RATE = 24000
HELD_OUT_EVERY = 20
TARGET_DBFS = {"soft": -26.0, "": -20.0, "loud": -16.0}
SOUNDFONTS = [Path("/usr/share/sounds/sf2/FluidR3_GM.sf2"), Path("/usr/share/sounds/sf2/default-GM.sf2")]


def soundfont() -> Path:
    for path in SOUNDFONTS:
        if path.is_file():
            return path
    raise SystemExit("no General MIDI soundfont: apt-get install fluidsynth fluid-soundfont-gm")


def render_one(job: tuple[int, int, float]) -> np.ndarray:
    index, seed, seconds = job
    piece = draw_piece(index, seed)
    with tempfile.TemporaryDirectory() as tmp:
        midi_path, wav_path = Path(tmp) / "piece.mid", Path(tmp) / "piece.wav"
        compose(piece, seconds + 1.0, seed).save(midi_path)
        subprocess.run(
            ["fluidsynth", "-ni", "-q", "-g", "0.5", "-r", str(SAMPLE_RATE), "-F", str(wav_path), "-O", "s16", "-T", "wav",
             str(soundfont()), str(midi_path)],
            check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        audio, rate = sf.read(wav_path, dtype="float32", always_2d=True)
    assert rate == SAMPLE_RATE
    mono = audio.mean(axis=1)
    length = int(seconds * SAMPLE_RATE)
    mono = np.pad(mono, (0, max(0, length - len(mono))))[:length]
    # FluidSynth's levels vary by 20 dB across instruments; set the loudness from the caption's dynamics instead
    rms = float(np.sqrt(np.mean(mono**2))) + 1e-9
    mono *= 10 ** (TARGET_DBFS[piece.dynamics] / 20) / rms
    peak = np.abs(mono).max()
    if peak > 0.99:
        mono *= 0.99 / peak
    return (mono * 32767).astype(np.int16)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("data", type=Path)
    parser.add_argument("--pieces", type=int, default=560)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    if shutil.which("fluidsynth") is None:
        raise SystemExit("fluidsynth not found: apt-get install fluidsynth fluid-soundfont-gm")
    args.data.mkdir(parents=True, exist_ok=True)
    jobs = [(i, args.seed, args.seconds) for i in range(args.pieces)]
    with Pool(args.workers) as pool:
        clips = np.stack(pool.map(render_one, jobs, chunksize=8))
    np.save(args.data / "clips.npy", clips)
    with open(args.data / "pieces.jsonl", "w") as out:
        for index in range(args.pieces):
            record = asdict(draw_piece(index, args.seed))
            record["held_out"] = index % HELD_OUT_EVERY == 0
            out.write(json.dumps(record) + "\n")
    hours = clips.shape[0] * clips.shape[1] / SAMPLE_RATE / 3600
    print(f"rendered {clips.shape[0]} pieces, {hours:.2f} h of {SAMPLE_RATE} Hz audio -> {args.data}")


if __name__ == "__main__":
    main()

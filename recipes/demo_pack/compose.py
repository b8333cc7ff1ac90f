"""Procedural pieces: a chord progression, a melody, accompaniment, bass and drums, written as MIDI, with the
caption that describes them. Every choice is drawn from one seeded generator, so piece i is the same everywhere."""
from __future__ import annotations

import random
from dataclasses import dataclass

import mido

TICKS = 480  # per beat
NOTE_NAMES = ["C", "C#", "D", "Eb", "E", "F", "F#", "G", "Ab", "A", "Bb", "B"]
SCALES = {"major": [0, 2, 4, 5, 7, 9, 11], "minor": [0, 2, 3, 5, 7, 8, 10]}
PROGRESSIONS = {  # scale degrees (0-based) of one chord per bar
    "major": [[0, 4, 5, 3], [0, 3, 4, 0], [1, 4, 0, 0], [0, 5, 3, 4], [0, 3, 0, 4]],
    "minor": [[0, 5, 2, 6], [0, 3, 4, 0], [0, 3, 6, 2], [0, 5, 3, 4], [0, 6, 5, 4]],
}
LEADS = {"piano": 0, "electric piano": 4, "vibraphone": 11, "marimba": 12, "organ": 16, "acoustic guitar": 24,
         "clean electric guitar": 27, "violin": 40, "cello": 42, "trumpet": 56, "alto sax": 65, "clarinet": 71,
         "flute": 73, "synth lead": 80}
ACCOMPANIMENTS = {"piano": 0, "electric piano": 4, "organ": 16, "acoustic guitar": 24, "harp": 46, "strings": 48,
                  "synth pad": 89, "choir": 52}
BASSES = {"acoustic bass": 32, "electric bass": 33, "synth bass": 38, "tuba": 58}
DRUMS = {"rock drums": 0, "jazz drums": 32, "electronic drums": 25, "brushed drums": 40}
TEMPOS = {"slow": (60, 80), "moderate": (90, 110), "upbeat": (120, 140), "fast": (150, 170)}
DYNAMICS = {"soft": (40, 65), "": (70, 95), "loud": (100, 120)}


@dataclass(frozen=True)
class Piece:
    index: int
    caption: str
    tempo: int
    tonic: int
    mode: str
    lead: str
    accompaniment: str | None
    bass: str | None
    drums: str | None
    dynamics: str
    octave: int  # register shift of the lead, in octaves


def draw_piece(index: int, seed: int) -> Piece:
    rng = random.Random(seed * 1_000_003 + index)
    tempo_word = rng.choice(list(TEMPOS))
    size = rng.choice(["solo", "duo", "trio", "quartet"])
    lead = rng.choice(list(LEADS))
    accompaniment = rng.choice(list(ACCOMPANIMENTS)) if size in ("duo", "trio", "quartet") else None
    bass = rng.choice(list(BASSES)) if size in ("trio", "quartet") else None
    drums = rng.choice(list(DRUMS)) if size == "quartet" or (size == "trio" and rng.random() < 0.3) else None
    dynamics = rng.choice(list(DYNAMICS))
    mode = rng.choice(["major", "minor"])
    piece = Piece(index, "", rng.randint(*TEMPOS[tempo_word]), rng.randrange(12), mode, lead, accompaniment, bass,
                  drums, dynamics, rng.choice([-1, 0, 0, 1]))
    return Piece(**{**piece.__dict__, "caption": caption(piece, tempo_word)})


def caption(piece: Piece, tempo_word: str) -> str:
    parts = [p for p in (piece.accompaniment, piece.bass) if p]
    if not parts:
        band = f"solo {piece.lead}"
    else:
        band = f"{piece.lead} with {' and '.join(parts)}"
    register = {-1: "low ", 0: "", 1: "high "}[piece.octave]
    words = [tempo_word, piece.dynamics, f"{register}{band}"]
    text = " ".join(w for w in words if w)
    if piece.drums:
        text += f" and {piece.drums}"
    return f"{text} in {NOTE_NAMES[piece.tonic]} {piece.mode}"


class Track:
    def __init__(self, channel: int, program: int) -> None:
        self.channel = channel
        self.program = program
        self.events: list[tuple[int, int, int, int]] = []  # (tick, order, note, velocity); order puts offs first

    def note(self, start: int, length: int, pitch: int, velocity: int) -> None:
        pitch = max(0, min(127, pitch))
        self.events.append((start, 1, pitch, max(1, min(127, velocity))))
        self.events.append((start + max(1, length), 0, pitch, 0))

    def to_midi(self) -> mido.MidiTrack:
        track = mido.MidiTrack()
        track.append(mido.Message("program_change", program=self.program, channel=self.channel, time=0))
        now = 0
        for tick, _, pitch, velocity in sorted(self.events):
            kind = "note_on" if velocity else "note_off"
            track.append(mido.Message(kind, note=pitch, velocity=velocity, channel=self.channel, time=tick - now))
            now = tick
        return track


def compose(piece: Piece, seconds: float, seed: int) -> mido.MidiFile:
    rng = random.Random(seed * 7_000_003 + piece.index)
    scale = SCALES[piece.mode]
    bars = int(seconds * piece.tempo / 60 / 4) + 2
    progression = rng.choice(PROGRESSIONS[piece.mode])
    low, high = DYNAMICS[piece.dynamics]
    base = 48 + piece.tonic

    def degree_pitch(degree: int, octave_base: int) -> int:
        return octave_base + 12 * (degree // 7) + scale[degree % 7]

    tracks = []
    lead = Track(0, LEADS[piece.lead])
    degree = rng.randrange(7) + 7
    lead_base = base + 12 * (1 + piece.octave)
    rhythms = [[1, 1, 1, 1], [0.5] * 8, [1.5, 0.5, 1, 1], [2, 1, 1], [1, 0.5, 0.5, 2], [4], [2, 2], [0.5, 0.5, 1, 0.5, 0.5, 1]]
    for bar in range(bars):
        chord_root = progression[bar % len(progression)]
        t = 0.0
        for length in rng.choice(rhythms):
            if rng.random() < 0.1:
                t += length
                continue
            if t == 0:  # strong beat: move to a chord tone
                degree = min((chord_root + c + 7 * k for c in (0, 2, 4) for k in (0, 1, 2)), key=lambda d: abs(d - degree))
            else:
                degree = max(2, min(18, degree + rng.choice([-2, -1, -1, 1, 1, 2, 0, 3, -3])))
            start = int((bar * 4 + t) * TICKS)
            lead.note(start, int(length * TICKS * 0.9), degree_pitch(degree, lead_base), rng.randint(low, high))
            t += length
    tracks.append(lead)
    if piece.accompaniment:
        comp = Track(1, ACCOMPANIMENTS[piece.accompaniment])
        style = rng.choice(["block", "arpeggio", "offbeat"])
        for bar in range(bars):
            root = progression[bar % len(progression)]
            chord = [degree_pitch(root + c, base) for c in (0, 2, 4)]
            velocity = rng.randint(low, high) - 10
            if style == "block":
                for pitch in chord:
                    comp.note(bar * 4 * TICKS, 4 * TICKS - 20, pitch, velocity)
            elif style == "arpeggio":
                for step in range(8):
                    comp.note(int((bar * 4 + step * 0.5) * TICKS), TICKS // 2, chord[[0, 1, 2, 1][step % 4]] + 12 * (step // 4), velocity)
            else:
                for beat in range(4):
                    for pitch in chord:
                        comp.note(int((bar * 4 + beat + 0.5) * TICKS), TICKS // 3, pitch, velocity)
        tracks.append(comp)
    if piece.bass:
        bass = Track(2, BASSES[piece.bass])
        walking = rng.random() < 0.5
        for bar in range(bars):
            root = progression[bar % len(progression)]
            nxt = progression[(bar + 1) % len(progression)]
            velocity = rng.randint(low, high)
            if walking:
                steps = [root, root + 2, root + 4, nxt + 1 if nxt > root else nxt - 1]
                for beat, d in enumerate(steps):
                    bass.note((bar * 4 + beat) * TICKS, TICKS - 30, degree_pitch(d, base - 24), velocity)
            else:
                for beat in (0, 2):
                    bass.note((bar * 4 + beat) * TICKS, 2 * TICKS - 30, degree_pitch(root, base - 24), velocity)
        tracks.append(bass)
    if piece.drums:
        drums = Track(9, DRUMS[piece.drums])
        swing = piece.drums in ("jazz drums", "brushed drums")
        for bar in range(bars):
            velocity = rng.randint(low, high)
            for eighth in range(8):
                start = (bar * 4 * 2 + eighth) * TICKS // 2
                if swing and eighth % 2:
                    start += TICKS // 6
                drums.note(start, TICKS // 4, 51 if swing else 42, velocity - 20)
                if piece.drums == "electronic drums":
                    if eighth % 2 == 0:
                        drums.note(start, TICKS // 4, 36, velocity)
                    if eighth in (2, 6):
                        drums.note(start, TICKS // 4, 39, velocity)
                else:
                    if eighth in (0, 4) or (eighth == 5 and rng.random() < 0.3):
                        drums.note(start, TICKS // 4, 36, velocity)
                    if eighth in (2, 6):
                        drums.note(start, TICKS // 4, 38, velocity - (25 if swing else 0))
        tracks.append(drums)
    midi = mido.MidiFile(ticks_per_beat=TICKS)
    tempo_track = mido.MidiTrack()
    tempo_track.append(mido.MetaMessage("set_tempo", tempo=mido.bpm2tempo(piece.tempo), time=0))
    midi.tracks.append(tempo_track)
    midi.tracks.extend(track.to_midi() for track in tracks)
    return midi

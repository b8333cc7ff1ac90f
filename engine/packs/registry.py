"""The families a pack can belong to: pack.json's "family" -> the family class that runs it.

Families are imported by name when a pack of theirs is loaded, so shared code imports no family.
"""
from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

from vivace.errors import PackError
from vivace.packs.manifest import read_manifest

FAMILIES = {
    "musiclm": "vivace.families.musiclm.pipeline:MusicLM",
    "musicgen": "vivace.families.musicgen.pipeline:MusicGen",
}


# packs that generate nothing, with the class that opens them
CODEC_PACKS = {"encodec": "vivace.Codec"}


def family_class(name: Any) -> type:
    if name in CODEC_PACKS:
        raise PackError(f"a {name} pack is a codec, not a model that generates: open it with {CODEC_PACKS[name]}.from_pack")
    if name not in FAMILIES:
        raise PackError(f"unknown pack family {name!r} (this vivace runs {', '.join(FAMILIES)})")
    module, _, cls = FAMILIES[name].partition(":")
    return getattr(importlib.import_module(module), cls)


def family_of(path: str | Path) -> type:
    """The family class of the pack at path (its pack.json's format and version checked)."""
    return family_class(read_manifest(path).get("family"))

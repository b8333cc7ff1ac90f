"""Where a converter writes its pack: a new or empty directory, filled through OUT.partial and renamed at the end,
so a failed conversion leaves nothing behind; and the source directory's config.json."""
from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from vivace.errors import PackError, VivaceError
from vivace.packs.schema import read_json_object


def check_output(out: str | Path) -> Path:
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise VivaceError(f"{out}: already exists and is not an empty directory")
    return out


def source_config(src: Path) -> tuple[Path, dict[str, Any]]:
    """(config.json's path, its object) of a transformers model directory."""
    manifest = src / "config.json"
    if not manifest.is_file():
        raise PackError(f"{src}: not a transformers model directory (no config.json)")
    return manifest, read_json_object(manifest)


def write_pack(out: Path, save: Callable[[Path], object]) -> Path:
    """save(directory) into OUT.partial, then the rename to out (checked empty by check_output)."""
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    try:
        save(partial)
        if out.exists():
            out.rmdir()
        partial.rename(out)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return out

"""Writes constraints.txt: the exact installed version of every distribution vivace[...] depends on, transitively.

Run after a green `make test-latest` (which installs the newest releases) to move CI to them: `make constraints`.
torch is left out (the Makefile installs the CPU build, the GPU machines bring their own) and so is everything only
torch needs.
"""
from __future__ import annotations

import re
import sys
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement

EXTRAS = ("dev", "demo", "text", "onnx", "gpu", "serve", "ray")
BUILD = ("setuptools", "wheel", "pybind11")  # what the Makefile installs to build vivace._C
LEFT_OUT = {"torch"}


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def closure(root: str, extras: tuple[str, ...]) -> dict[str, str]:
    """Every installed distribution reachable from root[extras], by canonical name, with its version."""
    found: dict[str, str] = {}
    pending = [(root, set(extras))]
    while pending:
        name, wanted = pending.pop()
        dist = metadata.distribution(name)
        for line in dist.requires or []:
            requirement = Requirement(line)
            key = canonical(requirement.name)
            if key in LEFT_OUT:
                continue
            if requirement.marker and not any(
                requirement.marker.evaluate({"extra": extra}) for extra in (wanted or {""})
            ):
                continue
            if key not in found:
                try:
                    found[key] = metadata.version(requirement.name)
                except metadata.PackageNotFoundError:
                    continue  # an optional dependency not installed here (another platform's)
                pending.append((requirement.name, set(requirement.extras)))
    return found


def main() -> None:
    pins = closure("vivace", EXTRAS)
    pins.update({canonical(name): metadata.version(name) for name in BUILD})
    header = (
        "# The exact versions `make test` (CI) installs: the last set the suite passed with, on Python "
        f"{sys.version_info.major}.{sys.version_info.minor}.\n"
        "# Regenerate after a green `make test-latest` with `make constraints`. torch is not pinned here.\n"
    )
    body = "".join(f"{name}=={version}\n" for name, version in sorted(pins.items()))
    Path(sys.argv[1] if len(sys.argv) > 1 else "constraints.txt").write_text(header + body)


if __name__ == "__main__":
    main()

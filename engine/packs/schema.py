"""Config records to and from pack.json: typed reading that names the first bad key, and plain-dict writing."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, TypeVar

from vivace.core.sampling import SamplingParams
from vivace.errors import PackError

T = TypeVar("T")


def from_dict(cls: type[T], data: dict[str, Any], where: str) -> T:
    """Builds a config record from JSON, naming the first unknown or ill-typed key."""
    if not isinstance(data, dict):
        raise PackError(f"{where}: expected an object, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise PackError(f"{where}: unknown key {unknown[0]!r}")
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        default = fields[key].default
        if isinstance(default, SamplingParams):
            value = from_dict(SamplingParams, value, f"{where}.{key}")
        elif isinstance(default, tuple):
            value = tuple(value)
        kwargs[key] = value
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise PackError(f"{where}: {exc}") from None


def to_dict(record: Any) -> dict[str, Any]:
    return dataclasses.asdict(record)


def read_json_object(file: Path) -> dict[str, Any]:
    """A JSON file that must hold an object; any failure is one PackError naming the file."""
    try:
        data = json.loads(file.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise PackError(f"{file}: unreadable JSON ({exc})") from None
    if not isinstance(data, dict):
        raise PackError(f"{file}: expected a JSON object")
    return data

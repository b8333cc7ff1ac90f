"""Config records to and from pack.json: typed reading that names the first bad key, and plain-dict writing.

`from_dict` is the one place where pack.json's values are checked against the records they fill: every field's type
comes from the record's annotation (int, float, bool, str, a Literal, a tuple of ints, a nested record) and every
number's range from `BOUNDS` (positive unless listed there). Strings are not numbers, booleans are not integers and
a float is not an integer even when it is whole, so a hand-edited pack.json fails on load with the key's path and
value, never later inside torch or as a silently coerced setting.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import types
import typing
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from vivace.errors import PackError

T = TypeVar("T")


@dataclass(frozen=True)
class Bound:
    """The range of a numeric field: above low (or at it, when inclusive), at most high."""

    low: float = 0
    inclusive: bool = False
    high: float | None = None

    def holds(self, value: float) -> bool:
        above = value >= self.low if self.inclusive else value > self.low
        return above and (self.high is None or value <= self.high)

    def words(self, integer: bool) -> str:
        if self.high is not None:
            return f"a number in {'[' if self.inclusive else '('}{self.low:g}, {self.high:g}]"
        if self.low == 0 and not self.inclusive:
            return "a positive integer" if integer else "a positive number"
        return f"{'an integer' if integer else 'a number'} {'>=' if self.inclusive else '>'} {self.low:g}"


POSITIVE = Bound()
# Every number in a record is a size, a count, a rate or a duration, so positive, except these ("Record.field").
BOUNDS: dict[str, Bound] = {
    "TransformerConfig.cross_dim": Bound(0, inclusive=True),  # 0 without cross-attention
    "SamplingParams.temperature": Bound(0, inclusive=True),  # 0: greedy
    "SamplingParams.top_k": Bound(0, inclusive=True),  # 0: no top-k filter
    "SamplingParams.top_p": Bound(0, high=1),
    "EncodecConfig.trim_right_ratio": Bound(0, inclusive=True, high=1),
    "MusicGenConfig.guidance_scale": Bound(1, inclusive=True),  # 1: no classifier-free guidance
    "MusicLMConfig.guidance_scale": Bound(1, inclusive=True),
    "CodecOnnx.max_abs_error": Bound(0, inclusive=True),
}


def shown(value: Any) -> str:
    """A value as pack.json spells it ("24000", true, 4.5), so a message shows what the file holds."""
    try:
        return json.dumps(value)
    except (TypeError, ValueError):
        return repr(value)


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def check_value(value: Any, kind: Any, where: str, bound: Bound = POSITIVE) -> Any:
    """value checked against the annotation kind (bound: the range of a number), in the form the record holds:
    a float field's int as a float, a list as a tuple, an object as its record. where names it in the message."""
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if dataclasses.is_dataclass(kind):
        return from_dict(kind, value, where)
    if origin is typing.Literal:
        if isinstance(value, bool) or value not in args:
            raise PackError(f"{where} must be one of {', '.join(shown(a) for a in args)}, got {shown(value)}")
        return value
    if origin is typing.Union or origin is types.UnionType:
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        if len(options) == 1:
            return check_value(value, options[0], where, bound)
    elif origin is tuple and len(args) == 2 and args[1] is Ellipsis:
        if not isinstance(value, (list, tuple)) or not value:
            raise PackError(f"{where} must be a non-empty list, got {shown(value)}")
        return tuple(check_value(item, args[0], f"{where}[{i}]", bound) for i, item in enumerate(value))
    elif kind is bool:
        if not isinstance(value, bool):
            raise PackError(f"{where} must be true or false, got {shown(value)}")
        return value
    elif kind is str:
        if not isinstance(value, str):
            raise PackError(f"{where} must be a string, got {shown(value)}")
        return value
    elif kind is int:
        if isinstance(value, bool) or not isinstance(value, int) or not bound.holds(value):
            raise PackError(f"{where} must be {bound.words(integer=True)}, got {shown(value)}")
        return value
    elif kind is float:
        number = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
        if not number or not bound.holds(value):
            raise PackError(f"{where} must be {bound.words(integer=False)}, got {shown(value)}")
        return float(value)
    # a record field of a kind this reader cannot check would reach the modules unchecked: a bug, not bad input
    raise TypeError(f"{where}: from_dict has no check for fields of type {kind!r}")


def from_dict(cls: type[T], data: Any, where: str) -> T:
    """Builds a config record from JSON, naming the first unknown, missing or ill-typed key (where: its path)."""
    if not isinstance(data, dict):
        raise PackError(f"{where} must be an object, got {shown(data)}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}  # type: ignore[arg-type]
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise PackError(f"{where}: unknown key {unknown[0]!r}")
    required = [name for name, f in fields.items() if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    missing = [name for name in required if name not in data]
    if missing:
        raise PackError(f"{where}: missing key {missing[0]!r}")
    hints = _hints(cls)
    kwargs = {
        # a list field whose default is empty may be empty (an empty list reads as its default)
        key: () if isinstance(value, (list, tuple)) and not value and fields[key].default == () else
        check_value(value, hints[key], f"{where}.{key}", BOUNDS.get(f"{cls.__name__}.{key}", POSITIVE))
        for key, value in data.items()
    }
    return cls(**kwargs)


@contextmanager
def naming(file: Path) -> Iterator[None]:
    """Prefixes the PackError of a record read from file with the file, so the message says where to look."""
    try:
        yield
    except PackError as exc:
        raise PackError(f"{file}: {exc}") from None


def to_dict(record: Any) -> dict[str, Any]:
    return dataclasses.asdict(record)


def read_json_object(file: Path) -> dict[str, Any]:
    """A JSON file that must hold an object; any failure is one PackError naming the file."""
    try:
        data = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PackError(f"{file}: unreadable JSON ({exc})") from None
    if not isinstance(data, dict):
        raise PackError(f"{file}: expected a JSON object")
    return data

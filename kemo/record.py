"""Results as dataclasses: written to JSON with ``dataclasses.asdict``, read back typed by :func:`from_dict`, which
builds nested dataclasses (also inside lists, dicts and ``X | None``) from the field types. A record that lacks a
field or has one this kemo does not write is refused in one line: it was written by another kemo version.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, TypeVar

T = TypeVar("T")


class OtherVersion(ValueError):
    """A stored result this kemo does not write: the user is told to write a new output."""


def from_dict(cls: type[T], data: Any, where: str = "") -> T:
    """``cls`` rebuilt from ``asdict``'s output; :class:`OtherVersion` if its keys are not ``cls``'s fields."""
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    required = {f.name for f in dataclasses.fields(cls)  # type: ignore[arg-type]
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING and f.init}
    if not isinstance(data, dict) or not required <= set(data) <= names:
        got = sorted(data) if isinstance(data, dict) else type(data).__name__
        raise OtherVersion(f"{where or cls.__name__}: not a {cls.__name__} this kemo writes (keys {got}); it was "
                           "written by another kemo version: write a new output")
    hints = typing.get_type_hints(cls)
    return cls(**{k: _typed(hints[k], v, where) for k, v in data.items()})


def _typed(tp: Any, value: Any, where: str) -> Any:
    if value is None:
        return None
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        return _typed(inner[0], value, where) if len(inner) == 1 else value
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, where)
    if origin is list:
        return [_typed(args[0], v, where) for v in value]
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
        return tuple(_typed(args[0], v, where) for v in value)
    if origin is dict:
        return {k: _typed(args[1], v, where) for k, v in value.items()}
    return value

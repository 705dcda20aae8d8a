"""Checks of what comes in: `need` (one condition, one clear line) and type checks for the config
dataclasses, from their annotations.

Settings come from YAML, TOML, JSON and `--model-arg KEY=VALUE`, which can put a list, a string, a null
or NaN anywhere. Checked here, each is a ValueError naming the setting; unchecked, it was a TypeError
(or a silent NaN learning rate) far from where it came in.
"""
from __future__ import annotations

import dataclasses
import math
import types
import typing
from typing import Any, Callable


def need(ok: bool, message: str, error: type[Exception] = ValueError, limit: int | None = None) -> None:
    """Raise `error(message)` unless `ok`; a message longer than `limit` characters is cut there (a
    value read from a file can be any length)."""
    if not ok:
        raise error(message[:limit])


def needing(prefix: str, suffix: str = "", error: type[Exception] = ValueError,
            limit: int | None = None) -> Callable[[bool, str], None]:
    """`need` for one place, whose every message reads prefix + detail + suffix:
    `need = needing("ResNetConfig: ")`, then `need(self.groups >= 1, "groups must be >= 1")`."""
    def check(ok: bool, detail: str) -> None:
        need(ok, prefix + detail + suffix, error, limit)
    return check


def check_types(obj: Any, where: str) -> None:
    """Raise ValueError unless every field of the dataclass `obj` matches its annotation. Numbers
    must be finite; bool is not accepted as an integer or number."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        value, kind = getattr(obj, f.name), hints[f.name]
        if not _matches(value, kind):
            raise ValueError(f"{where}: {f.name} must be {_describe(kind)}, got {value!r}"[:300])


def _matches(v: Any, t: Any) -> bool:
    origin, args = typing.get_origin(t), typing.get_args(t)
    if t is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_matches(v, a) for a in args)
    if origin is typing.Literal:
        return any(type(v) is type(a) and v == a for a in args)
    if t is type(None):
        return v is None
    if t is bool:
        return isinstance(v, bool)
    if t is int:
        return isinstance(v, int) and not isinstance(v, bool)
    if t is float:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    if t is str:
        return isinstance(v, str)
    if origin in (tuple, list) or t in (tuple, list):  # tuple[X, ...] and list[X]: a list or tuple of X
        return isinstance(v, (tuple, list)) and (not args or all(_matches(x, args[0]) for x in v))
    if origin is dict or t is dict:
        return isinstance(v, dict) and all(isinstance(k, str) for k in v)  # values: checked by their user
    return True


def _describe(t: Any) -> str:
    origin, args = typing.get_origin(t), typing.get_args(t)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in args)
    if origin is typing.Literal:
        return "one of " + ", ".join(map(repr, args))
    if origin in (tuple, list):
        return f"a list of {_describe(args[0]).removeprefix('a ').removeprefix('an ')}s" if args else "a list"
    if origin is dict:
        return "a table of option = value"
    return {type(None): "unset (null)", bool: "true or false", int: "an integer", float: "a finite number",
            str: "a string", list: "a list"}.get(t, getattr(t, "__name__", str(t)))

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


MAX_JSON_DEPTH = 64  # deeper than any file this package writes; 100,000 levels overflow the parser's stack


def parse_json(text: str | bytes, where: str, kind: type | None = None) -> Any:
    """JSON text -> value, every failure a ValueError naming `where` (a file, or a file and its field):
    not JSON, nested deeper than MAX_JSON_DEPTH (checked before parsing: the C parser would recurse
    until a RecursionError), or not of `kind` (e.g. dict) at the top."""
    import json

    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError:
            raise ValueError(f"{where} is damaged: not UTF-8 text (a binary file?)") from None
    depth = _nesting(text)
    if depth > MAX_JSON_DEPTH:
        raise ValueError(f"{where} is damaged: its JSON is nested {depth} levels deep (at most {MAX_JSON_DEPTH})")
    try:
        value = json.loads(text)
    except (ValueError, RecursionError) as e:
        raise ValueError(f"{where} is damaged: its text is not JSON ({e})"[:300]) from None
    if kind is not None and not isinstance(value, kind):
        raise ValueError(f"{where} is damaged: expected a JSON {_JSON_NAMES.get(kind, kind.__name__)}, "
                         f"got {type(value).__name__}")
    return value


_JSON_NAMES = {dict: "object", list: "array", str: "string"}


def _nesting(text: str) -> int:
    """The deepest nesting of [ and { outside strings (an upper bound where brackets sit in strings
    with escaped quotes: only ever too strict for such strings, and deep files are refused anyway)."""
    if text.count("[") + text.count("{") <= MAX_JSON_DEPTH:  # the usual file: nothing to scan
        return 0
    import re

    depth = deepest = 0
    for token in re.finditer(r'"(?:[^"\\]|\\.)*"|[\[{]|[\]}]', text):
        t = token.group()
        if t in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif t in "]}":
            depth -= 1
    return deepest


def read_json(path, kind: type | None = dict) -> Any:
    """The JSON value in the file at `path` (a dict unless `kind` says otherwise): ValueError naming the
    file when it is damaged; OSError (FileNotFoundError) when it cannot be read."""
    from pathlib import Path

    return parse_json(Path(path).read_bytes(), str(path), kind)


def number_field(record: dict, key: str, where) -> float | None:
    """record[key] as a finite number, None where absent or null; anything else is a ValueError naming
    the file and the field (a summary.json edited by hand, or of another program)."""
    value = record.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{where} is damaged: {key} must be a number, got {value!r}"[:300])
    return float(value)

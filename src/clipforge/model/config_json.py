"""Type checks for config dicts read from JSON files, which may hold anything.

`check_fields` compares a dict with the field types a config dataclass declares (nested dataclasses included);
`get` reads one typed field of a foreign config. Both raise ValueError naming the field (`vision.image_size`);
the checkpoint reader adds the file's name.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from typing import Any

_REQUIRED = object()
_NAMES = {
    bool: "true or false",
    int: "an integer",
    float: "a finite number",
    str: "a string",
    type(None): "null",
    dict: "a JSON object",
    list: "a list",
}


def check_fields(cls: type, obj: Any, where: str) -> None:
    """Raise ValueError for the first field of `obj` that is missing though required, or whose value does not
    fit the type `cls` declares for it. Unknown keys are left to the dataclass, which lists the valid ones."""
    if not isinstance(obj, dict):
        raise ValueError(f"{where} must be a JSON object, found {_found(obj)}")
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        if f.name not in obj:
            if required:
                raise ValueError(f"{where}.{f.name} is missing")
            continue
        hint, value = _tower_class(hints[f.name], obj[f.name]), obj[f.name]
        if dataclasses.is_dataclass(hint) and (value is not None or required):  # null: the default
            check_fields(hint, value, f"{where}.{f.name}")
        elif not fits(value, hint):
            raise ValueError(f"{where}.{f.name} must be {describe(hint)}, found {_found(value)}")


def _tower_class(hint: Any, value: Any) -> Any:
    """A tower field is a union of config classes told apart by their `kind` key (CLIP's own towers may have
    none): the class that kind names, so its fields are the ones checked."""
    members = typing.get_args(hint)
    if not members or not all(dataclasses.is_dataclass(m) for m in members):
        return hint
    kind = value.get("kind") if isinstance(value, dict) else None
    for m in members:
        default = next((f.default for f in dataclasses.fields(m) if f.name == "kind"), None)
        if kind == default:
            return m
    return members[0]  # no or an unknown kind: the base class, whose own check names the valid kinds


def get(d: dict[str, Any], key: str, hint: Any, where: str, default: Any = _REQUIRED) -> Any:
    """`d[key]` (or `default` when absent), refused unless it fits `hint`. `where` names `d` in messages
    ("" for a file's top level)."""
    name = f"{where}.{key}" if where else key
    if key not in d:
        if default is _REQUIRED:
            raise ValueError(f"{name} is missing")
        return default
    if not fits(d[key], hint):
        raise ValueError(f"{name} must be {describe(hint)}, found {_found(d[key])}")
    return d[key]


def fits(value: Any, hint: Any) -> bool:
    """Whether a JSON value fits a type annotation; JSON arrays stand for tuples. Annotations this does not
    know are accepted, for the dataclass to judge."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(fits(value, a) for a in args)
    if hint in (bool, type(None), str, dict, list):
        return isinstance(value, hint)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            return False
        if origin is tuple and not (len(args) == 2 and args[1] is Ellipsis):
            return len(value) == len(args) and all(fits(v, a) for v, a in zip(value, args))
        return all(fits(v, args[0]) for v in value) if args else True
    if origin is dict:
        return isinstance(value, dict) and all(isinstance(k, str) for k in value)
    if origin is typing.Literal:
        return value in args
    return True


def describe(hint: Any) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(describe(a) for a in args)
    if origin in (tuple, list):
        if origin is tuple and not (len(args) == 2 and args[1] is Ellipsis):
            return f"a list of {len(args)} values"
        return f"a list, each {describe(args[0])}" if args else "a list"
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    return _NAMES.get(hint, getattr(hint, "__name__", str(hint)))


def _found(value: Any) -> str:
    return f"{type(value).__name__} {value!r:.60}"

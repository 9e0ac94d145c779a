"""Typed config dataclasses <-> YAML: strict loading with errors that name file and key.

A leaf of the engine (it imports only errors.py), so every module can read and write
configs without importing the recipe. Loading is strict: an unknown key, a wrong type or a
missing required value raises `ConfigError` naming the file, the key path and what would
have been valid, so the CLI can print one line instead of a traceback.

YAML features: `include: base.yaml` (or a list; paths relative to the including file,
later files and the including file win, mappings merge deeply) and command-line
overrides `--set model.depth=6` (values parsed as YAML scalars). Numbers follow YAML 1.2:
`1e-4` and `1.0e5` are floats (PyYAML's YAML 1.1 reads them as strings).

Hostile files end in one line, fast: aliases that would expand beyond `MAX_NODES` nodes (a
"billion laughs"), a recursive alias, or nesting deeper than `MAX_DEPTH` are refused from
the event stream, before anything is built; error messages show values truncated.
"""
from __future__ import annotations

import dataclasses
import re
import reprlib
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from .errors import ConfigError


# ---------------------------------------------------------------- YAML -> dict


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads YAML 1.2 floats without a dot or exponent sign (`1e-4`,
    `1.0e5`, `-2E+3`): YAML 1.1, which PyYAML follows, makes them strings, so a learning
    rate written the usual way would be refused as "expected float, got str"."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)[eE][-+]?[0-9]+$"),
    list("-+.0123456789"))


MAX_NODES = 100_000
"""Nodes a document may hold with every alias expanded (a recipe has a few hundred)."""
MAX_DEPTH = 64
"""Deepest nesting of mappings / lists (PyYAML's composer recurses: 1000 levels overflow it)."""


class HostileYAML(yaml.YAMLError):
    """Refused before building: too deep, or aliases expanding beyond MAX_NODES."""


def _check_shape(text: str) -> None:
    """Walk the parser's events (iterative, nothing built): depth and the expanded node count,
    an alias counting as the size of what it names."""
    anchors: dict[str, int] = {}
    stack: list[list] = [[None, 0]]  # [anchor, size so far] per open collection
    for ev in yaml.parse(text, Loader=_Loader):
        if isinstance(ev, (yaml.MappingStartEvent, yaml.SequenceStartEvent)):
            if len(stack) > MAX_DEPTH:
                raise HostileYAML(f"nested deeper than {MAX_DEPTH} levels (line {ev.start_mark.line + 1})")
            stack.append([ev.anchor, 1])
            continue
        if isinstance(ev, (yaml.MappingEndEvent, yaml.SequenceEndEvent)):
            anchor, n = stack.pop()
        elif isinstance(ev, yaml.AliasEvent):
            if ev.anchor not in anchors:
                raise HostileYAML(f"alias *{ev.anchor} refers to an anchor that is not complete there "
                                  f"(recursive or undefined; line {ev.start_mark.line + 1})")
            anchor, n = None, anchors[ev.anchor]
        elif isinstance(ev, yaml.ScalarEvent):
            anchor, n = ev.anchor, 1
        else:
            continue
        if anchor is not None:
            anchors[anchor] = n
        stack[-1][1] += n
        if stack[-1][1] > MAX_NODES:
            raise HostileYAML(f"aliases expand to more than {MAX_NODES:,} nodes (line {ev.start_mark.line + 1}): "
                              "refused (an alias bomb?)")


def parse_yaml(text: str):
    """YAML text -> data, safe (no objects) and with YAML 1.2 numbers (see `_Loader`); raises
    HostileYAML (a yaml.YAMLError) for nesting or alias expansion beyond the bounds above."""
    _check_shape(text)
    return yaml.load(text, Loader=_Loader)  # noqa: S506 (a SafeLoader subclass)


def short_repr(value: Any) -> str:
    """repr() bounded to ~100 characters, without building the full one (an aliased value
    can stand for gigabytes of text)."""
    r = reprlib.Repr()  # keyword arguments only from Python 3.12
    r.maxlevel, r.maxlist, r.maxtuple, r.maxdict, r.maxset = 2, 4, 4, 4, 4
    r.maxstring, r.maxother, r.maxlong = 60, 60, 40
    return r.repr(value)


def _deep_merge(base: dict, top: dict) -> dict:
    out = dict(base)
    for k, v in top.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def read_yaml(path: str | Path, _seen: tuple[Path, ...] = ()) -> dict:
    """Read a recipe file and resolve its `include:` chain into one mapping."""
    path = Path(path).resolve()
    if path in _seen:
        raise ConfigError(f"{path}: include cycle: {' -> '.join(str(p) for p in _seen + (path,))}")
    if not path.is_file():
        raise ConfigError(f"{path}: recipe file not found")
    try:
        data = parse_yaml(path.read_text()) or {}
    except HostileYAML as e:
        raise ConfigError(f"{path}: {e}") from None
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a recipe must be a mapping, got {type(data).__name__}")
    includes = data.pop("include", [])
    includes = [includes] if isinstance(includes, str) else includes
    merged: dict = {}
    for inc in includes:
        merged = _deep_merge(merged, read_yaml(path.parent / inc, _seen + (path,)))
    return _deep_merge(merged, data)


def apply_overrides(data: dict, overrides: list[str], source: str = "--set") -> dict:
    """Apply `a.b.c=value` strings; the value is parsed as a YAML scalar/list."""
    data = dict(data)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"{source}: expected KEY=VALUE, got {item!r}")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        node = data
        for p in parts[:-1]:
            child = node.get(p)
            node[p] = dict(child) if isinstance(child, dict) else {}
            node = node[p]
        try:
            node[parts[-1]] = parse_yaml(raw) if raw.strip() else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"{source}: {key.strip()}: value {short_repr(raw)} is not valid YAML "
                              f"({str(e).splitlines()[0]})") from None
    return data


# ---------------------------------------------------------------- dict -> dataclass


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is not None:
        args = ", ".join(_type_name(a) for a in typing.get_args(tp))
        return f"{origin.__name__}[{args}]"
    return "null" if tp is type(None) else getattr(tp, "__name__", str(tp))


def _convert(tp: Any, value: Any, key: str, file: str) -> Any:
    """Check `value` against the annotation `tp` and convert it; raise ConfigError."""

    def bad() -> ConfigError:
        return ConfigError(f"{file}: {key}: expected {_type_name(tp)}, got "
                           f"{type(value).__name__} {short_repr(value)}")

    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise bad()
        return from_dict(tp, value, file=file, prefix=key)
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise bad()
        return value
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise bad()
        for a in args:
            if a is type(None):
                continue
            try:
                return _convert(a, value, key, file)
            except ConfigError:
                continue
        raise bad()
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise bad()
        args = typing.get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise bad()
            return tuple(_convert(a, v, f"{key}[{i}]", file) for i, (a, v) in enumerate(zip(args, value)))
        elem = args[0] if args else Any
        items = [_convert(elem, v, f"{key}[{i}]", file) for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise bad()
        _, vt = typing.get_args(tp) or (str, Any)
        return {str(k): _convert(vt, v, f"{key}.{k}", file) for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise bad()
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad()
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad()
        return value
    if tp is str:
        if not isinstance(value, str):
            raise bad()
        return value
    if isinstance(tp, type) and not isinstance(value, tp):
        raise bad()
    return value


def from_dict(cls: type, data: dict, *, file: str = "<recipe>", prefix: str = "", validate: bool = True) -> Any:
    """Build dataclass `cls` from `data`, strictly. Nested dataclasses recurse.

    Calls `obj.validate()` when the class has one (nested ones always; this one unless
    validate=False, which leaves it to the caller); a ValueError from it becomes a
    ConfigError naming the file and section.
    """
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    where = prefix or "<top level>"
    unknown = sorted(set(data) - set(fields))
    if unknown:
        k = unknown[0]
        raise ConfigError(f"{file}: unknown key '{prefix + '.' if prefix else ''}{k}' in "
                          f"{where}; valid keys: {', '.join(sorted(fields))}")
    kwargs = {}
    for name, f in fields.items():
        key = f"{prefix}.{name}" if prefix else name
        if name in data:
            kwargs[name] = _convert(hints[name], data[name], key, file)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{file}: missing required key '{key}' ({_type_name(hints[name])})")
    obj = cls(**kwargs)
    check = getattr(obj, "validate", None) if validate else None
    if callable(check):
        try:
            check()
        except ValueError as e:
            raise ConfigError(f"{file}: {where}: {e}") from None
    return obj


def to_dict(obj: Any) -> Any:
    """Dataclass tree -> plain YAML/JSON-safe data (tuples become lists)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def dump_yaml(obj: Any) -> str:
    return yaml.safe_dump(to_dict(obj), sort_keys=False)

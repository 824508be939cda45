"""Typed options from YAML and the command line: the generic engine behind the recipe's config.

A *config* is a dataclass whose fields are *sections* (dataclasses built by ``default_factory``); each
field of a section is an option with a type annotation (``int``, ``float``, ``bool``, ``str``, lists,
tuples, ``dict``, ``Optional`` of those, ``Any``) and, from :func:`itop_timm.config.option`, a help
text. This module turns nested ``{section: {key: value}}`` values and ``--section.key value`` overrides
into such a config: unknown sections and keys raise a ``ValueError`` naming the valid ones, values are
type-checked against the annotations. Options of a mapping type also take sub-keys on the command line,
``--section.key.subkey value``, merged into the mapping of the file (and of earlier overrides).

It knows nothing of the recipe's sections (those are :mod:`.config`).
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Any

import yaml

from ..validation import short_repr

__all__ = [
    "section_fields",
    "field_type",
    "type_name",
    "check_type",
    "valid_keys",
    "describe_keys",
    "sections_to_dict",
    "build_sections",
    "parse_yaml",
    "parse_overrides",
    "merge_overrides",
]


def section_fields(section_cls: type) -> list[dataclasses.Field]:
    """The option keys of a section: its dataclass fields, less those named in its ``derived``."""
    derived = getattr(section_cls, "derived", ())
    return [f for f in dataclasses.fields(section_cls) if f.name not in derived]


def field_type(section_cls: type, key: str) -> Any:
    """The type annotation of option ``key`` of ``section_cls`` (strings resolved)."""
    return typing.get_type_hints(section_cls)[key]


def _is_union(annotation: Any) -> bool:
    return typing.get_origin(annotation) in (typing.Union, types.UnionType)


def _is_mapping_type(annotation: Any) -> bool:
    """``dict[...]``, or a union that allows one (``dict[str, Any] | None``)."""
    if _is_union(annotation):
        return any(_is_mapping_type(a) for a in typing.get_args(annotation))
    return typing.get_origin(annotation) is dict or annotation is dict


def type_name(annotation: Any) -> str:
    """``int | None`` -> ``INT|null``, ``list[float]`` -> ``[FLOAT, ...]``."""
    origin = typing.get_origin(annotation)
    if _is_union(annotation):
        return "|".join("null" if a is type(None) else type_name(a) for a in typing.get_args(annotation))
    if origin in (list, tuple):
        return f"[{type_name(typing.get_args(annotation)[0])}, ...]"
    if origin is dict:
        return "{KEY: VALUE}"
    if annotation is Any:
        return "VALUE"
    return getattr(annotation, "__name__", str(annotation)).upper()


def check_type(key: str, value: Any, annotation: Any) -> Any:
    """Coerce/validate ``value`` against a field annotation (int/float/bool/str/list/dict/Optional);
    a ``ValueError`` naming ``key`` when it does not fit."""
    origin = typing.get_origin(annotation)
    if _is_union(annotation):
        options = typing.get_args(annotation)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return check_type(key, value, option)
            except ValueError as err:
                errors.append(str(err))
        raise ValueError(errors[0] if errors else f"{key}: invalid value {short_repr(value)}")
    if annotation is Any:
        return value
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise ValueError(f"{key} must be true or false, got {short_repr(value)}")
    if annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ValueError(f"{key} must be an integer, got {short_repr(value)}")
    if annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ValueError(f"{key} must be a number, got {short_repr(value)}")
    if annotation is str:
        if isinstance(value, str):
            return value
        raise ValueError(f"{key} must be a string, got {short_repr(value)}")
    if origin is tuple:
        item = typing.get_args(annotation)[0]
        if isinstance(value, Sequence) and not isinstance(value, str):
            return tuple(check_type(f"{key}[{i}]", v, item) for i, v in enumerate(value))
        raise ValueError(f"{key} must be a list, got {short_repr(value)}")
    if origin is list:
        (item,) = typing.get_args(annotation)
        if isinstance(value, Sequence) and not isinstance(value, str):
            return [check_type(f"{key}[{i}]", v, item) for i, v in enumerate(value)]
        raise ValueError(f"{key} must be a list, got {short_repr(value)}")
    if origin is dict:
        if isinstance(value, Mapping):
            return dict(value)
        raise ValueError(f"{key} must be a mapping, got {short_repr(value)}")
    raise ValueError(f"{key}: unsupported field type {annotation}")  # pragma: no cover


def _sections(config_cls: type) -> dict[str, type]:
    return {f.name: f.default_factory for f in dataclasses.fields(config_cls)}


def valid_keys(config_cls: type) -> list[str]:
    """Every ``section.key`` a config of ``config_cls`` may set."""
    return [f"{name}.{f.name}" for name, cls in _sections(config_cls).items() for f in section_fields(cls)]


def describe_keys(config_cls: type) -> str:
    """Every ``--section.key`` with its type, default and meaning (for ``--help``)."""
    lines = []
    for name, section_cls in _sections(config_cls).items():
        lines.append(f"{name}:")
        hints = typing.get_type_hints(section_cls)
        for f in section_fields(section_cls):
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            if "library_default" in f.metadata:
                shown = f"the method's, else {f.metadata['library_default']!r}"
            else:
                shown = repr(default)
            lines.append(f"  --{name}.{f.name} {type_name(hints[f.name])} (default: {shown})")
            lines.append(f"      {f.metadata.get('help', '')}")
    return "\n".join(lines)


def sections_to_dict(config: Any) -> dict[str, Any]:
    """Plain ``{section: {key: value}}`` of a config instance (copies; tuples as lists), as in YAML."""
    out: dict[str, Any] = {}
    for s in dataclasses.fields(config):
        section = getattr(config, s.name)
        values = {f.name: copy.deepcopy(getattr(section, f.name)) for f in section_fields(type(section))}
        out[s.name] = {k: list(v) if isinstance(v, tuple) else v for k, v in values.items()}
    return out


def build_sections(config_cls: type, values: Mapping[str, Any], source: str) -> dict[str, Any]:
    """``{section: section instance}`` from nested ``{section: {key: value}}``; unknown sections or
    keys (with a close match suggested) and ill-typed values raise ``ValueError`` naming ``source``."""
    if not isinstance(values, Mapping):
        raise ValueError(f"{source}: expected a mapping of sections, got {type(values).__name__}")
    sections = _sections(config_cls)
    unknown = [k for k in values if k not in sections]
    if unknown:
        raise ValueError(
            f"{source}: unknown section(s) {short_repr(unknown, 200)}; valid sections: {list(sections)}"
        )
    built = {}
    for name, section_cls in sections.items():
        given = values.get(name) or {}
        if not isinstance(given, Mapping):
            raise ValueError(f"{source}: section {name!r} must be a mapping, got {short_repr(given)}")
        known = [f.name for f in section_fields(section_cls)]
        bad = [k for k in given if k not in known]
        if bad:
            hints = {k: difflib.get_close_matches(k, known, n=1) for k in bad}
            hint = "; ".join(f"{name}.{k}: did you mean {name}.{h[0]}?" for k, h in hints.items() if h)
            raise ValueError(
                f"{source}: unknown key(s) {short_repr([f'{name}.{k}' for k in bad], 200)}"
                f"{' (' + hint + ')' if hint else ''}; valid keys in {name!r}: {known}"
            )
        typed = {k: check_type(f"{name}.{k}", v, field_type(section_cls, k)) for k, v in given.items()}
        built[name] = section_cls(**typed)
    return built


#: The most values (scalars, lists, mappings and keys) one YAML text may expand to, an alias counted at
#: every use: a config holds a few hundred; an alias bomb (a few hundred bytes whose anchors nest) holds
#: billions, and printing or walking them would take minutes and gigabytes.
MAX_YAML_VALUES = 100_000


def _expands_beyond(value: Any, limit: int) -> bool:
    """Whether ``value`` holds more than ``limit`` values with every alias expanded (a value that
    contains itself does): a walk that stops at the first value over the limit."""
    stack, count = [value], 0
    while stack:
        count += 1
        if count > limit:
            return True
        item = stack.pop()
        if isinstance(item, Mapping):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return False


def parse_yaml(text: str, source: str) -> Any:
    """``yaml.safe_load`` (which never runs code) with its errors as a ``ValueError`` naming ``source``;
    a text that expands to more than :data:`MAX_YAML_VALUES` values (an alias bomb) or nests deeper
    than Python's recursion limit is refused the same way."""
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ValueError(f"{source}: not valid YAML (plain values only, no tags): {err}") from None
    except RecursionError:
        raise ValueError(f"{source}: YAML nested too deeply") from None
    if _expands_beyond(value, MAX_YAML_VALUES):
        raise ValueError(
            f"{source}: YAML that expands to more than {MAX_YAML_VALUES} values (aliases counted at every "
            "use) is refused"
        )
    return value


def _check_override_key(key: str, config_cls: type, valid: list[str]) -> None:
    """Accept ``section.key``, and ``section.key.subkey[.subkey...]`` where ``section.key`` is a mapping."""
    if key in valid:
        return
    parts = key.split(".")
    option = ".".join(parts[:2])
    if len(parts) > 2 and option in valid:
        section, name = parts[0], parts[1]
        annotation = field_type(_sections(config_cls)[section], name)
        if not _is_mapping_type(annotation):
            raise ValueError(
                f"--{key}: {option} is {type_name(annotation)}, not a mapping, so it has no sub-key "
                f"{'.'.join(parts[2:])!r}; set it with --{option} VALUE"
            )
        if all(parts[2:]):
            return
    close = difflib.get_close_matches(key, valid, n=3)
    raise ValueError(
        f"unknown config key {short_repr(key)}{f' (did you mean {close}?)' if close else ''}; valid keys: {', '.join(valid)}"
    )


def parse_overrides(args: Sequence[str], config_cls: type) -> dict[str, dict[str, Any]]:
    """``["--optim.lr", "0.05", "--sparsity.density=0.02"]`` -> ``{"optim": {"lr": 0.05}, ...}``.

    Values are parsed as YAML (``true``, ``null``, ``[0.5, 0.75]``, ``{a: 1}``; an empty value is null).
    A sub-key of a mapping option (``--model.kwargs.drop_rate 0.1``) stays dotted in the result
    (``{"model": {"kwargs.drop_rate": 0.1}}``) for :func:`merge_overrides`; the last spelling of a key
    comes last, so later overrides win.
    """
    out: dict[str, dict[str, Any]] = {}
    valid = valid_keys(config_cls)
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--"):
            raise ValueError(
                f"unexpected argument {short_repr(arg)}: overrides look like --section.key value"
            )
        key, eq, raw = arg[2:].partition("=")
        if not eq:
            if i + 1 >= len(args):
                raise ValueError(f"override {short_repr(arg)} needs a value")
            raw = args[i + 1]
            i += 1
        i += 1
        _check_override_key(key, config_cls, valid)
        section, name = key.split(".", 1)
        values = out.setdefault(section, {})
        values.pop(name, None)  # re-inserted last: applied after every earlier override
        values[name] = parse_yaml(raw, f"--{key}") if raw != "" else None
    return out


def _with_subkey(mapping: Any, path: list[str], value: Any, name: str) -> dict[str, Any]:
    """A copy of ``mapping`` (``None``: empty) with ``value`` at ``path``."""
    if mapping is None:
        mapping = {}
    if not isinstance(mapping, Mapping):
        raise ValueError(
            f"cannot set {name}.{'.'.join(path)}: {name} is {short_repr(mapping)}, not a mapping"
        )
    out = dict(mapping)
    head, *rest = path
    out[head] = _with_subkey(out.get(head), rest, value, f"{name}.{head}") if rest else value
    return out


def merge_overrides(base: Mapping[str, Any], overrides: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """``base`` (``{section: {key: value}}``, e.g. from a YAML file) with ``overrides`` applied in order:
    ``key`` replaces the value, a dotted ``key.subkey`` sets one entry of the mapping ``key``."""
    merged = {k: dict(v) if isinstance(v, Mapping) else v for k, v in base.items()}
    for section, values in overrides.items():
        current = merged.get(section)
        target = dict(current) if isinstance(current, Mapping) else {}
        for key, value in values.items():
            name, *path = key.split(".")
            if path:
                target[name] = _with_subkey(target.get(name), path, value, f"{section}.{name}")
            else:
                target[name] = value
        merged[section] = target
    return merged

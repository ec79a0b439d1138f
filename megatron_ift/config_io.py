"""YAML <-> frozen dataclass configs, with ``dotted.key=value`` overrides.

:func:`from_dict` is the one way a config dataclass is built from a mapping (a YAML file, an
override, a checkpoint's recorded ``ModelConfig``): every unknown key, wrong type or bad value
fails there, naming the full dotted key, before any process group or model is built. String
choices are ``Literal`` types: the type lists the choices, :func:`from_dict` and
:func:`check_literals` (called from each ``__post_init__``) enforce them.
"""

from __future__ import annotations

import dataclasses
import functools
import re
import types
import typing
from typing import Any, Literal, Mapping, Sequence, TypeVar

import yaml

from megatron_ift.errors import one_line
from megatron_ift.validation import ConfigError, check_choice

T = TypeVar("T")


class _ConfigLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` with two fixes for config files:

    * YAML 1.2 floats: PyYAML implements YAML 1.1, which reads ``1e-4`` (no dot) as a string;
      every other tool (and YAML 1.2) reads a number.
    * duplicate keys are an error: PyYAML keeps the last one, so a second ``optimizer:`` section
      would silently replace the first.
    """


_ConfigLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def _construct_mapping(loader: yaml.SafeLoader, node: yaml.MappingNode, deep: bool = False):
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=True)
        line = key_node.start_mark.line + 1
        if key in seen:
            raise ConfigError(
                f"{key_node.start_mark.name}:{line}: duplicate key {key!r} (first on line "
                f"{seen[key]}); merge the two into one"
            )
        seen[key] = line
    return loader.construct_mapping(node, deep=deep)


_ConfigLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def parse_yaml(text: str) -> Any:
    """YAML text -> Python objects with the config loader (1.2 floats, no duplicate keys)."""
    return yaml.load(text, Loader=_ConfigLoader)  # noqa: S506 (a SafeLoader subclass)


def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if errors else f"{key}: bad value {value!r}")
    if origin is Literal:
        check_choice(key, value, typing.get_args(tp))
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key} must be a mapping of {tp.__name__} fields, got {value!r}")
        return from_dict(tp, value, key)
    if origin in (list, tuple, Sequence):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}={value!r} must be a list")
        (inner,) = typing.get_args(tp)[:1] or (Any,)
        items = [_coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}={value!r} must be a mapping")
        return dict(value)
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}={value!r} must be true or false")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}={value!r} must be an integer")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{key}={value!r} must be a number")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}={value!r} must be a string")
    return value


@functools.lru_cache(maxsize=None)
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def check_literals(obj: Any, prefix: str) -> None:
    """Every ``Literal``-typed field of the dataclass ``obj`` holds one of its type's choices.

    Args:
        obj: a config dataclass instance (called from its ``__post_init__``).
        prefix: the section name used in messages (``model`` -> ``model.activation=...``).

    Raises:
        ConfigError: naming the first field whose value is not a choice, and the choices.
    """
    for name, tp in _hints(type(obj)).items():
        if typing.get_origin(tp) is Literal:
            check_choice(f"{prefix}.{name}", getattr(obj, name), typing.get_args(tp))


def from_dict(cls: type[T], data: Mapping[str, Any], prefix: str = "") -> T:
    """Build the frozen dataclass ``cls`` from ``data``, refusing unknown keys.

    Args:
        cls: the config dataclass.
        data: its fields (nested dataclasses as mappings).
        prefix: the dotted name of ``data`` in messages (``model``, ``train``, ...).

    Raises:
        ConfigError: one line naming the first unknown, missing, mistyped or invalid key.
    """
    hints = _hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        where = prefix or cls.__name__
        raise ConfigError(
            f"unknown key {'.'.join(filter(None, [prefix, unknown[0]]))!r} in {where}; "
            f"known keys: {', '.join(sorted(fields))}"
        )
    kwargs = {}
    for name, value in data.items():
        key = f"{prefix}.{name}" if prefix else name
        kwargs[name] = _coerce(value, hints[name], key)
    missing = [
        n for n, f in fields.items()
        if n not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ConfigError(f"missing required key {'.'.join(filter(None, [prefix, missing[0]]))!r}")
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{prefix or cls.__name__}: {exc}") from exc


def to_dict(obj: Any) -> Any:
    """Plain dict/list form of a (nested) dataclass, for YAML and checkpoint metadata."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    """``data[a][b][c] = value`` for ``key = "a.b.c"``, creating missing sections, in place."""
    parts = key.strip().split(".")
    node = data
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {key!r}: {p!r} is not a section")
    node[parts[-1]] = value


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Apply ``a.b.c=value`` overrides (value parsed as YAML) to a nested dict, in place."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like section.key=value")
        key, raw = item.split("=", 1)
        try:
            value = parse_yaml(raw) if raw.strip() else ""
        except yaml.YAMLError as exc:
            raise ConfigError(f"override {item!r}: the value is not valid YAML ({one_line(exc)})") from None
        set_dotted(data, key, value)
    return data


def load_yaml(path: str) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.load(f, Loader=_ConfigLoader) or {}  # noqa: S506 (a SafeLoader subclass)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except IsADirectoryError:
        raise ConfigError(f"config file {path} is a folder; pass the YAML file") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config file {path} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {one_line(exc)}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of sections")
    return data


def dump_yaml(obj: Any) -> str:
    return yaml.safe_dump(to_dict(obj), sort_keys=False)

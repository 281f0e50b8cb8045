"""One typed config per job and for the service: a dataclass, YAML presets, command-line overrides.

    cfg = parse_args(PairsConfig, argv)  # --config preset.yaml, then --field-name value for any field
    cfg = from_dict(ServiceConfig, {"max_batch_size": "8"})  # strings or typed values, one coercion for all

Unknown keys (in YAML or on the command line) and values of the wrong type fail with a ConfigError naming the key.
Each config's `check()` then tests the values against each other, without I/O, and raises one ConfigError that
lists every problem; the jobs add the checks that need storage or a cluster before any work starts.
"""
from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A config that cannot work: the message names each problem and, where there is one, the fix."""


def raise_problems(cls_name: str, problems: list[str]) -> None:
    if problems:
        raise ConfigError(f"{cls_name}: " + "; ".join(problems))


def _field_types(cls) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _coerce(name: str, value: Any, tp: Any) -> Any:
    """Converts a YAML or command-line value to the field's type, or raises ConfigError naming the field."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        return _coerce(name, value, args[0])
    if origin in (tuple, list):
        if isinstance(value, str):
            value = [v for v in value.replace("[", "").replace("]", "").split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key {name!r} expects a list, got {value!r}")
        args = typing.get_args(tp)
        item_types = [args[0]] * len(value) if (origin is list or (len(args) == 2 and args[1] is Ellipsis)) else list(args)
        if len(item_types) != len(value):
            raise ConfigError(f"config key {name!r} expects {len(item_types)} values, got {len(value)}")
        items = [_coerce(name, v.strip() if isinstance(v, str) else v, t) for v, t in zip(value, item_types)]
        return tuple(items) if origin is tuple else items
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on", "false", "0", "no", "off"):
            return value.lower() in ("true", "1", "yes", "on")
        raise ConfigError(f"config key {name!r} expects true/false, got {value!r}")
    if tp in (int, float):
        if isinstance(value, bool):
            raise ConfigError(f"config key {name!r} expects a number, got {value!r}")
        try:
            number = float(value) if tp is float else int(value.strip(), 10) if isinstance(value, str) else int(value)
        except (TypeError, ValueError):
            raise ConfigError(f"config key {name!r} expects {tp.__name__}, got {value!r}") from None
        if tp is int and isinstance(value, float) and value != int(value):
            raise ConfigError(f"config key {name!r} expects an integer, got {value!r}")
        return number
    if tp is str:
        if isinstance(value, bool):  # YAML's `true` for keys that take true / false / auto
            return "true" if value else "false"
        if value is None or isinstance(value, (dict, list)):
            raise ConfigError(f"config key {name!r} expects a string, got {value!r} (write \"\" for an empty one)")
        return str(value)
    if tp is dict or typing.get_origin(tp) is dict:
        if isinstance(value, str):  # from a command line: JSON, or YAML's flow style
            try:
                value = yaml.safe_load(value)
            except yaml.YAMLError:
                pass
        if not isinstance(value, dict):
            raise ConfigError(f"config key {name!r} expects a mapping, got {value!r}")
        return value
    return value


def from_dict(cls: type[T], values: dict[str, Any], base: T | None = None) -> T:
    """A `cls` instance from `base` (or the defaults) updated with `values`; unknown keys are an error."""
    types_ = _field_types(cls)
    unknown = sorted(set(values) - set(types_))
    if unknown:
        raise ConfigError(f"unknown config key(s) {unknown} for {cls.__name__}; valid keys: {sorted(types_)}")
    current = dataclasses.asdict(base) if base is not None else {}
    current.update({k: _coerce(k, v, types_[k]) for k, v in values.items()})
    try:
        return cls(**current)
    except TypeError as e:
        raise ConfigError(f"{cls.__name__}: {e}") from None


def load_yaml(path: str) -> dict[str, Any]:
    from dmd_ray.data import storage

    try:
        data = yaml.safe_load(storage.read_bytes(path)) or {}
    except FileNotFoundError:
        raise ConfigError(f"config file {path!r} does not exist") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path!r} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path!r} must hold a mapping of keys to values")
    return data


def add_arguments(parser: argparse.ArgumentParser, cls) -> None:
    """--config FILE plus one --field-name option per dataclass field (values are parsed by the field's type)."""
    parser.add_argument("--config", help="YAML file of config keys (command-line options override it)")
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        parser.add_argument(flag, dest=f.name, default=argparse.SUPPRESS, metavar=f.name.upper(), help=f"(default: {default})")


def parse_args(cls: type[T], argv: list[str] | None = None, description: str | None = None, defaults: dict | None = None) -> T:
    """Parses --config and per-field overrides into `cls`; errors go through argparse (exit code 2)."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_arguments(parser, cls)
    args = vars(parser.parse_args(argv))
    try:
        values: dict[str, Any] = dict(defaults or {})
        path = args.pop("config", None)
        if path:
            values.update(load_yaml(path))
        values.update(args)
        return from_dict(cls, values)
    except ConfigError as e:
        parser.error(str(e))
        raise  # unreachable: parser.error exits

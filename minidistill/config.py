"""Typed config dataclasses: loading from YAML / dicts, ``a.b=c`` overrides, and validation.

Every config in minidistill is a ``@dataclass`` subclass of :class:`ConfigBase`. Field docstrings
(a string literal right after the field) document each key. Unknown keys raise
:class:`ConfigError` naming the key and the nearest valid one.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

import yaml

from .errors import MinidistillError

T = TypeVar("T", bound="ConfigBase")


class ConfigError(MinidistillError, ValueError):
    """A config key or value is invalid; the message names the key."""


class ConfigBase:
    """Mixin for config dataclasses: ``from_dict``, ``to_dict``, ``validate``."""

    def validate(self) -> None:
        """Check values; raise ConfigError naming the offending key. Overridden by subclasses."""

    @classmethod
    def from_dict(cls: type[T], data: dict[str, Any] | None, *, prefix: str = "") -> T:
        """Build from a (nested) dict, converting and checking types; unknown keys raise ConfigError."""
        data = dict(data or {})
        hints = get_type_hints(cls)
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = [k for k in data if k not in names]
        if unknown:
            key = unknown[0]
            close = difflib.get_close_matches(key, names, n=1)
            hint = f"; did you mean '{prefix}{close[0]}'?" if close else f"; valid keys: {', '.join(names)}"
            raise ConfigError(f"unknown config key '{prefix}{key}'{hint}")
        kwargs = {k: _convert(v, hints[k], f"{prefix}{k}") for k, v in data.items()}
        obj = cls(**kwargs)
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if isinstance(value, ConfigBase):
                value.validate()
        obj.validate()
        return obj

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (YAML / JSON serialisable)."""
        return dataclasses.asdict(self)

    def replace(self: T, **changes) -> T:
        """A validated copy with some fields changed."""
        obj = dataclasses.replace(self, **changes)
        obj.validate()
        return obj


def _convert(value: Any, tp: Any, key: str) -> Any:
    """Convert ``value`` to type ``tp`` (dataclasses, Optional, unions, lists, dicts, Literal, scalars)."""
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        if len(options) == 1:  # Optional[X]: X's own error is the most precise
            return _convert(value, options[0], key)
        for arg in options:
            try:
                return _convert(value, arg, key)
            except ConfigError:
                continue
        raise ConfigError(f"{key}={value!r} does not match {_type_name(tp)}")
    if origin is Literal:
        if isinstance(value, bool) and not any(isinstance(c, bool) for c in get_args(tp)):
            # YAML reads no / off / false (yes / on / true) as a bool: take the choice spelled that way
            spelled = [c for c in (("yes", "on", "true") if value else ("no", "off", "false")) if c in get_args(tp)]
            value = spelled[0] if spelled else value
        if value not in get_args(tp):
            raise ConfigError(f"{key}={value!r}: choose one of {list(get_args(tp))}")
        return value
    if isinstance(tp, type) and dataclasses.is_dataclass(tp) and issubclass(tp, ConfigBase):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a mapping of {tp.__name__} fields, got {value!r}")
        return tp.from_dict(value, prefix=f"{key}.")
    if origin in (list, tuple):
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} must be a list, got {value!r}")
        args = get_args(tp)
        item = args[0] if args else Any
        out = [_convert(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(out) if origin is tuple else out
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a mapping, got {value!r}")
        args = get_args(tp)
        vt = args[1] if len(args) == 2 else Any
        return {k: _convert(v, vt, f"{key}.{k}") for k, v in value.items()}
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key} must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{key} must be an integer, got {value!r}")
    if tp is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):  # YAML 1.1 reads exponents without a dot (1e-4) as strings
            try:
                number = float(value)
            except ValueError:
                pass
        if number is None:
            raise ConfigError(f"{key} must be a number, got {value!r}")
        if not math.isfinite(number):
            raise ConfigError(f"{key}={value!r}: must be a finite number")
        return number
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key} must be a string, got {value!r}")
    return value


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """``["a.b=1", "c=[1, 2]"]`` -> ``{"a": {"b": 1}, "c": [1, 2]}``; values parsed as YAML.

    A leading ``--`` is accepted (``--train.lr=1e-4``) so recipes can pass remaining argv through.
    """
    out: dict[str, Any] = {}
    for item in overrides:
        item = item[2:] if item.startswith("--") else item
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key=value (e.g. train.max_steps=100)")
        key, raw = item.split("=", 1)
        if not key or any(not part for part in key.split(".")):
            raise ConfigError(f"override {item!r}: empty key; write key=value (e.g. train.max_steps=100)")
        try:
            value = yaml.safe_load(raw) if raw != "" else None
        except yaml.YAMLError:
            raise ConfigError(
                f"override {item!r}: the value {raw!r} is not valid YAML; quote it (key='...') or fix the brackets"
            ) from None
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r} conflicts with an earlier override of {part!r}")
        node[parts[-1]] = value
    return out


def merge_dicts(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """Recursive merge: mappings merge key by key, anything else in ``update`` replaces."""
    out = dict(base)
    for k, v in update.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge_dicts(out[k], v)
        else:
            out[k] = v
    return out


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] | None = None) -> T:
    """Load ``cls`` from a YAML file (optional) with command-line overrides applied on top."""
    data: dict[str, Any] = {}
    if path is not None:
        data = read_config_file(path)
    data = merge_dicts(data, parse_overrides(overrides or []))
    return cls.from_dict(data)


BASE_KEY = "base"
"""A config file's ``base: other.yaml`` (relative to the file) is read first and the file's own keys merged on top."""


def read_config_file(path: str | Path, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """The mapping of a config file with its ``base`` chain resolved (ConfigError naming the file on a missing base or a cycle)."""
    path = Path(path)
    data = read_yaml_file(path)
    base = data.pop(BASE_KEY, None)
    if base is None:
        return data
    if not isinstance(base, str):
        raise ConfigError(f"config file {path}: base must be a YAML file name (e.g. base: demo.yaml), not {base!r}")
    base_path = (path.parent / base).resolve()
    seen = (*_seen, path.resolve())
    if base_path in seen:
        raise ConfigError(f"config file {path}: base: {base} leads back to {base_path.name}; remove the cycle")
    if not base_path.is_file():
        raise ConfigError(f"config file {path}: base: {base} does not exist next to it ({base_path}); fix the name")
    return merge_dicts(read_config_file(base_path, seen), data)


def read_yaml_file(path: str | Path) -> dict[str, Any]:
    """A YAML mapping from ``path``; ConfigError naming the file (and line) when it is missing or unreadable."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"config file {path} is a folder; pass a YAML file (e.g. recipes/configs/demo.yaml)")
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist; pass a YAML file (e.g. recipes/configs/demo.yaml)")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"config file {path} is not UTF-8 text (byte {e.start}); save it as UTF-8 YAML") from None
    except OSError as e:
        raise ConfigError(f"config file {path} cannot be read: {e.strerror or e}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"config file {path} is not valid YAML{where}: {problem}; fix the YAML syntax there") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"config file {path} must hold a mapping at the top level (key: value lines), not a {type(data).__name__}"
        )
    return data


def save_config(cfg: ConfigBase, path: str | Path) -> None:
    """Write the resolved config as YAML."""
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))


def field_docs(cls: type) -> dict[str, str]:
    """Field docstrings of a config dataclass (string literals right after each field)."""
    import ast
    import inspect
    import textwrap

    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError):
        return {}
    body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
    docs: dict[str, str] = {}
    for prev, node in zip(body, body[1:]):
        if (
            isinstance(prev, ast.AnnAssign)
            and isinstance(prev.target, ast.Name)
            and isinstance(node, ast.Expr)
            and isinstance(node.value, ast.Constant)
            and isinstance(node.value.value, str)
        ):
            docs[prev.target.id] = " ".join(node.value.value.split())
    return docs


__all__ = [
    "ConfigBase",
    "ConfigError",
    "field_docs",
    "load_config",
    "merge_dicts",
    "parse_overrides",
    "read_yaml_file",
    "save_config",
]

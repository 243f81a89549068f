"""Typed configs: pydantic dataclasses loaded from YAML, overridden with `a.b=value` on the command line.

One config object per flow/recipe; `to_dict` gives the full resolved config that is logged with every run.
Every value is validated by type and range when the config is built (pydantic field constraints); unknown
keys are errors (a typo in a config must not silently fall back to a default). Errors name where the value
came from: the YAML file and line, or the command-line override.

This module stays light (yaml + pydantic): the CLI loads configs before anything heavy is imported.
"""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import TypeAdapter, ValidationError

C = TypeVar("C")


class BadInputError(ValueError):
    """Input the user can fix (config, data, model name, run name): the CLI prints it and exits 2.

    Only this family is "bad input": any other exception is a failure (exit 1, traceback in the log).
    """


class ConfigError(BadInputError):
    pass


# where each dotted key's value came from: "file.yaml:12" or "override train.steps=-5"
Origins = dict[str, str]


def _loc(loc: tuple[Any, ...]) -> str:
    return ".".join(str(x) for x in loc)


def _describe_error(cls: Any, err: Any, origins: Origins) -> str:
    key = _loc(err["loc"])
    where = ""
    for k in (key, *(key.rsplit(".", i)[0] for i in range(1, key.count(".") + 1))):
        if k in origins:
            where = f" ({origins[k]})"
            break
    else:  # an unknown section: name the override / line that introduced one of its keys
        where = next((f" ({o})" for k, o in origins.items() if k.startswith(key + ".")), "")
    if err["type"] in ("extra_forbidden", "unexpected_keyword_argument"):
        parent = key.rpartition(".")[0]
        fields = getattr(field_type(cls, parent) if parent else cls, "__pydantic_fields__", {})
        return f"{key}: unknown key{where}; known: {sorted(fields)}"
    got = err.get("input")
    hint = ""
    if err["type"] == "string_type" and (got is None or isinstance(got, bool)):
        # YAML reads null / no / off / yes as null or a boolean: never a string by accident
        hint = "; quote it, or give '' for empty"
    shown = "" if isinstance(got, dict) else f"={'null' if got is None else repr(got)}"
    return f"{key}{shown}: {err['msg'][:1].lower()}{err['msg'][1:]}{where}{hint}"


def from_dict(cls: type[C], data: dict[str, Any], where: str = "config", origins: Origins | None = None) -> C:
    """Build and validate `cls` from a plain dict; ConfigError lists every bad field."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__}")
    try:
        return TypeAdapter(cls).validate_python(data)
    except ValidationError as e:
        lines = [_describe_error(cls, err, origins or {}) for err in e.errors()]
        msg = lines[0] if len(lines) == 1 else "\n  ".join([f"{len(lines)} invalid values:", *lines])
        raise ConfigError(msg) from None


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def field_type(cls: Any, dotted: str) -> Any:
    """The annotation of a dotted field (`train.steps` -> int), or None if it does not exist."""
    tp: Any = cls
    for k in dotted.split("."):
        fields = getattr(tp, "__pydantic_fields__", None)
        if fields is None or k not in fields:
            return None
        tp = fields[k].annotation
    return tp


def _override_value(cls: Any, key: str, raw: str) -> Any:
    """YAML-parse an override, except that a plain-string field takes the text as written.

    `name=2024` is the string "2024", not an int, and `tracking_uri=null` / `data.replay=no` stay what YAML says
    (null, False) so the string field refuses them with a hint instead of becoming "None" / "False".
    """
    if not raw.strip():
        return ""
    try:
        parsed = yaml.safe_load(raw)
    except yaml.YAMLError as e:
        raise ConfigError(f"override {key}={raw}: invalid value: {e}") from None
    if field_type(cls, key) is str and parsed is not None and not isinstance(parsed, bool):
        return raw
    return parsed


def _set_path(d: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    for k in keys[:-1]:
        d = d.setdefault(k, {})
        if not isinstance(d, dict):
            raise ConfigError(f"override {dotted!r}: {k!r} is not a section")
    d[keys[-1]] = value


def _yaml_lines(node: Any, prefix: str, out: Origins, path: str) -> None:
    """Record the line of every key of a composed YAML mapping (1-based, as editors show it)."""
    if not isinstance(node, yaml.MappingNode):
        return
    for k, v in node.value:
        key = f"{prefix}{k.value}"
        out[key] = f"{path}:{k.start_mark.line + 1}"
        _yaml_lines(v, key + ".", out, path)


def read_yaml(path: str | Path, origins: Origins | None = None) -> dict[str, Any]:
    p = Path(path)
    if p.is_dir():
        raise ConfigError(f"config file {p}: is a directory")
    if not p.is_file():
        raise ConfigError(f"config file {p}: file not found")
    try:
        text = p.read_text(encoding="utf-8-sig")  # a BOM is legitimate
    except UnicodeDecodeError as e:
        line = p.read_bytes()[: e.start].count(b"\n") + 1
        raise ConfigError(f"{p}:{line}: not UTF-8 text ({e.reason})") from None
    try:
        loaded = yaml.safe_load(text) or {}
        if origins is not None:
            _yaml_lines(yaml.compose(text), "", origins, str(p))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f"{mark.line + 1}:{mark.column + 1}" if mark is not None else ""
        raise ConfigError(f"{p}:{at}: invalid YAML: {getattr(e, 'problem', None) or e}") from None
    if not isinstance(loaded, dict):
        raise ConfigError(f"{p}:1: top level must be a mapping of config sections")
    return loaded


def load_config(cls: type[C], path: str | Path | None = None, overrides: list[str] | None = None,
                base: str | Path | None = None) -> C:
    """Defaults <- `base` YAML (e.g. the demo's) <- YAML file <- `key.sub=value` overrides (values parsed as
    YAML scalars), then validated."""
    data: dict[str, Any] = to_dict(cls())
    origins: Origins = {}
    if base is not None:
        _deep_update(data, read_yaml(base, origins), cls)
    if path is not None:
        _deep_update(data, read_yaml(path, origins), cls)
    for ov in overrides or []:
        if "=" not in ov:
            raise ConfigError(f"override {ov!r} must look like key.sub=value")
        k, v = ov.split("=", 1)
        k = k.strip()
        _set_path(data, k, _override_value(cls, k, v))
        origins[k] = f"override {ov}"
    return from_dict(cls, data, origins=origins)


def _deep_update(base: dict[str, Any], new: dict[str, Any], cls: Any = None) -> None:
    """Merge YAML into the defaults: config sections (dataclass fields) merge key by key; a dict-valued knob
    (e.g. `data.task_kwargs`) is replaced whole, as its override is: merging would keep default keys the
    YAML's value does not have."""
    import dataclasses
    import typing

    hints = typing.get_type_hints(cls) if cls is not None and dataclasses.is_dataclass(cls) else {}
    for k, v in new.items():
        sub = hints.get(k)
        section = sub is not None and dataclasses.is_dataclass(sub)
        if isinstance(v, dict) and isinstance(base.get(k), dict) and (section or cls is None):
            _deep_update(base[k], v, sub if section else None)
        else:
            base[k] = v


def _flow(value: Any) -> str:
    """One YAML value in flow style on one line ('' for an empty string, [a, b] for a list)."""
    return yaml.safe_dump([value], default_flow_style=True, width=10**9).strip()[1:-1]


def _describe(obj: Any, indent: int, out: list[str]) -> None:
    fields = typing.cast(dict[str, Any], getattr(type(obj), "__pydantic_fields__", {}))
    for f in dataclasses.fields(obj):
        value, info = getattr(obj, f.name), fields.get(f.name)
        desc = f"  # {info.description}" if info is not None and info.description else ""
        pad = " " * indent
        if dataclasses.is_dataclass(value):
            out.append(f"{pad}{f.name}:{desc}")
            _describe(value, indent + 2, out)
        else:
            out.append(f"{pad}{f.name}: {_flow(value)}{desc}")


def dump_yaml(cfg: Any, describe: bool = False) -> str:
    """The config as YAML; `describe` adds each knob's meaning as a comment (still loadable YAML)."""
    if not describe:
        return yaml.safe_dump(to_dict(cfg), sort_keys=False)
    out: list[str] = []
    _describe(cfg, 0, out)
    return "\n".join(out) + "\n"

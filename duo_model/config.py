"""Typed run configurations and their ``key=value`` overrides.

A config is a dataclass whose fields carry a ``help`` string; :func:`build` starts from the defaults,
applies a JSON file (``--config FILE``; YAML too when PyYAML is installed) and then ``key=value``
overrides, converting each value to the field's type. An unknown key is an error that lists the
closest known keys.

Example::

    >>> from duo_model.train import TrainConfig
    >>> build(TrainConfig, None, ["lr=1e-3", "curriculum=dense"]).lr
    0.001
    >>> build(TrainConfig, None, ["learning_rate=1e-3"])
    Traceback (most recent call last):
    ...
    duo_model.config.ConfigError: unknown setting 'learning_rate'; did you mean: lr, warmup_steps? (`duo train --help` lists every setting)
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import textwrap
import typing
from pathlib import Path


class ConfigError(ValueError):
    """A config file or override that cannot be applied, with what to write instead."""


def setting(default, help: str, choices: tuple | None = None, group: str | None = None, check=None):
    """A dataclass field with its help text, its allowed values if a closed set, the ``--help`` heading
    it opens (``group``), and ``check``: ``(predicate, requirement)`` that :func:`validate` applies,
    e.g. ``(lambda v: v >= 1, "must be >= 1")``."""
    return dataclasses.field(default=default, metadata={"help": help, "choices": choices, "group": group,
                                                        "check": check})


def validate(cfg) -> None:
    """Raise :class:`ConfigError` for the first setting of ``cfg`` that fails its ``check``."""
    for f in dataclasses.fields(cfg):
        check = f.metadata.get("check")
        value = getattr(cfg, f.name)
        if check and not check[0](value):
            raise ConfigError(f"{f.name}={value!r}: {check[1]}")


def _field_types(cls) -> dict[str, type]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _parse_int(text: str) -> int:
    """An int, also written as ``1e4`` or ``2000.0``."""
    try:
        return int(text)
    except ValueError:
        number = float(text)
        if not number.is_integer():
            raise
        return int(number)


def _convert(key: str, raw, kind: type, choices):
    if isinstance(raw, str):
        text = raw.strip()
        try:
            if kind is bool:
                lowered = text.lower()
                if lowered not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError
                value = lowered in ("true", "1", "yes")
            elif kind is int:
                value = _parse_int(text)
            elif kind is float:
                value = float(text)
            else:
                value = text
        except ValueError:
            raise ConfigError(f"{key}={raw!r}: expected {kind.__name__}") from None
    else:
        value = raw
        if kind is float and isinstance(raw, int) and not isinstance(raw, bool):
            value = float(raw)
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise ConfigError(f"{key}={raw!r}: expected {kind.__name__}, got {type(raw).__name__}")
    if choices and value not in choices:
        raise ConfigError(f"{key}={value!r}: choose one of {', '.join(map(str, choices))}")
    return value


def _unknown(cls, key: str, command: str) -> ConfigError:
    """The error for an unknown key: the names closest in spelling, then those whose help text holds
    every word of the key (``learning_rate`` -> ``lr``)."""
    fields = dataclasses.fields(cls)
    names = [f.name for f in fields]
    close = difflib.get_close_matches(key, names, n=3, cutoff=0.6)
    words = [w for w in key.lower().replace("-", "_").split("_") if w]
    close += [f.name for f in fields
              if f.name not in close and words and all(w in f.metadata["help"].lower() for w in words)]
    hint = f"; did you mean: {', '.join(close[:4])}?" if close else ""
    return ConfigError(f"unknown setting {key!r}{hint} (`duo {command} --help` lists every setting)")


def load_file(path: str | Path) -> dict:
    """A JSON object (or YAML mapping when PyYAML is installed and the file ends in .yaml/.yml)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    text = path.read_text()
    if path.suffix in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise ConfigError(f"{path} is YAML but PyYAML is not installed (`pip install pyyaml`), "
                              "or write the config as JSON") from None
        data = yaml.safe_load(text)
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the config must be a mapping of setting names to values")
    return data


def build(cls, config_file: str | Path | None, overrides: list[str], *, base: dict | None = None,
          command: str = "train"):
    """``cls`` from its defaults, then ``base``, then the file, then ``key=value`` overrides."""
    types = _field_types(cls)
    choices = {f.name: f.metadata.get("choices") for f in dataclasses.fields(cls)}
    values: dict = {}
    layers = [("", base or {})]
    if config_file:
        layers.append((f"{config_file}: ", load_file(config_file)))
    parsed = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"expected key=value, got {item!r}")
        parsed[key.strip()] = raw
    layers.append(("", parsed))
    for prefix, layer in layers:
        for key, raw in layer.items():
            if key not in types:
                error = _unknown(cls, key, command)
                raise ConfigError(prefix + str(error))
            values[key] = _convert(key, raw, types[key], choices[key])
    cfg = cls(**values)
    validate(cfg)
    return cfg


def describe(cls) -> str:
    """The ``--help`` listing: one line per setting with its default and help, grouped by comments."""
    lines = []
    types = _field_types(cls)
    for f in dataclasses.fields(cls):
        group = f.metadata.get("group")
        if group:
            lines.append(f"\n{group}:")
        choices = f.metadata.get("choices")
        extra = f" (one of: {', '.join(map(str, choices))})" if choices else ""
        default = json.dumps(f.default) if not isinstance(f.default, str) else f.default or '""'
        text = textwrap.fill(f.metadata["help"] + extra, width=100, initial_indent=" " * 6, subsequent_indent=" " * 6)
        lines.append(f"  {f.name}={default}  [{types[f.name].__name__}]\n{text}")
    return "\n".join(lines)


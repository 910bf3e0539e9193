"""Typed run configurations and their ``key=value`` overrides.

A config is a dataclass whose fields carry a ``help`` string and the rule their value must satisfy (a
closed set of ``choices``, or a :class:`Check` such as ``at_least(1)``); :func:`build` starts from the
defaults, applies a JSON file (``--config FILE``; YAML too when PyYAML is installed) and then
``key=value`` overrides, converting each value to the field's type, then :func:`validate` checks every
setting and the config's own ``validate()`` (rules between settings). Every failure is a one-line
:class:`ConfigError` that names the setting; an unknown key lists the closest known keys.

Example::

    >>> from duo_model.train import TrainConfig
    >>> build(TrainConfig, None, ["lr=1e-3", "curriculum=dense"]).lr
    0.001
    >>> build(TrainConfig, None, ["learning_rate=1e-3"])
    Traceback (most recent call last):
    ...
    duo_model.config.ConfigError: unknown setting 'learning_rate'; did you mean: lr, warmup_steps? (`duo train --help` lists every setting)
    >>> build(TrainConfig, None, ["lr=-1"])
    Traceback (most recent call last):
    ...
    duo_model.config.ConfigError: lr=-1.0: must be > 0
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
import re
import textwrap
import typing
from pathlib import Path


class ConfigError(ValueError):
    """A config file or override that cannot be applied, with what to write instead."""


@dataclasses.dataclass(frozen=True)
class Check:
    """The rule a setting's value must satisfy: ``problem(value)`` says what is wrong with it (None when
    it is fine); ``invalid`` is a value the rule rejects (the command-line tests feed it)."""

    problem: typing.Callable[[typing.Any], str | None]
    invalid: typing.Any


def setting(default, help: str, choices: tuple | None = None, group: str | None = None, *,
            check: Check | None = None):
    """A dataclass field with its help text, its allowed values if a closed set (``choices``) or the
    :class:`Check` its value must pass, and the ``--help`` heading it opens (``group``). Every setting
    that is not a bool needs ``choices`` or a ``check``."""
    return dataclasses.field(default=default, metadata={"help": help, "choices": choices, "group": group,
                                                        "check": check})


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def at_least(lo) -> Check:
    """A finite number >= ``lo``."""
    return Check(lambda v: None if _number(v) and v >= lo else f"must be >= {lo}", lo - 1)


def above(lo) -> Check:
    """A finite number > ``lo``."""
    return Check(lambda v: None if _number(v) and v > lo else f"must be > {lo}", lo - 1)


def within(lo, hi, *, lo_open: bool = False, hi_open: bool = False, also=()) -> Check:
    """A finite number in the interval from ``lo`` to ``hi`` (each end open or closed), or one of ``also``
    (special values such as 0 = "the default")."""
    interval = f"{'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
    extra = "".join(f" or {a}" for a in also)

    def problem(v):
        inside = _number(v) and (v > lo if lo_open else v >= lo) and (v < hi if hi_open else v <= hi)
        return None if inside or v in also else f"must lie in {interval}{extra}"
    return Check(problem, hi + 1)


def finite() -> Check:
    return Check(lambda v: None if _number(v) else "must be a finite number", "inf")


def matches(pattern: str, what: str, invalid: str) -> Check:
    """A string matching the regular expression ``pattern`` in full; ``what`` describes the form."""
    return Check(lambda v: None if re.fullmatch(pattern, v) else f"expected {what}", invalid)


def writable_path(*, optional: bool = False) -> Check:
    """A file or folder path that can be created: none of its existing parents is a file, and the
    nearest existing one is writable. ``optional``: the empty string (a default) is allowed."""

    def problem(value: str):
        if not value:
            return None if optional else "a path is required"
        path = Path(value).expanduser().absolute()
        for parent in path.parents:
            if parent.exists():
                if not parent.is_dir():
                    return f"{parent} is not a folder"
                if not os.access(parent, os.W_OK | os.X_OK):
                    return f"{parent} is not writable"
                return None
        return None
    return Check(problem, "/dev/null/not-a-folder")


def existing_path(*, optional: bool = False, also: str = "") -> Check:
    """A path that exists (``optional``: or the empty string; ``also``: or a string starting with this
    prefix, such as ``hf:``)."""

    def problem(value: str):
        if (optional and not value) or (also and value.startswith(also)):
            return None
        if not value:
            return "a path is required"
        return None if Path(value).expanduser().exists() else f"{value} does not exist"
    return Check(problem, "/nonexistent/duo-run")


def corpus_spec(*, optional: bool = False) -> Check:
    """``shakespeare``, ``text:PATH`` or ``hf:NAME[:CONFIG]`` (``optional``: or empty = the checkpoint's)."""
    return matches(r"shakespeare|text:.+|hf:.+" + ("|" if optional else ""),
                   "shakespeare, text:PATH or hf:NAME[:CONFIG]", "ftp:corpus")


def tokenizer_spec() -> Check:
    """``bytes``, ``gpt2`` or ``bpe:N`` with N >= 260."""

    def problem(value: str):
        match = re.fullmatch(r"bpe:(\d+)", value)
        if value in ("bytes", "gpt2") or (match and int(match[1]) >= 260):
            return None
        return "expected bytes, gpt2 or bpe:N with N >= 260 (256 bytes + 3 specials + merges)"
    return Check(problem, "bpe:ten")


def device_spec() -> Check:
    """``auto``, ``cpu``, ``cuda`` or ``cuda:N``."""
    return matches(r"auto|cpu|cuda(:\d+)?", "auto, cpu, cuda or cuda:N", "gpu")


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


def validate(cfg) -> None:
    """Check every setting of ``cfg`` against its rule, then the config's own ``validate()`` (rules
    between settings), if it has one; the first failure raises :class:`ConfigError` naming the setting."""
    for f in dataclasses.fields(cfg):
        check = f.metadata.get("check")
        value = getattr(cfg, f.name)
        problem = check.problem(value) if check is not None else None
        if problem:
            raise ConfigError(f"{f.name}={value!r}: {problem}")
    if hasattr(cfg, "validate"):
        cfg.validate()


def check_gamma_window(gamma_min: float, gamma_max: float) -> None:
    """The gamma window rule of ``duo train`` and ``duo distill``: both ends or neither (NaN: the
    vocabulary's default window), and ``gamma_min < gamma_max``."""
    if math.isnan(gamma_min) != math.isnan(gamma_max):
        raise ConfigError(f"give both gamma_min and gamma_max, or neither (got {gamma_min}, {gamma_max})")
    if gamma_min >= gamma_max:
        raise ConfigError(f"gamma_min={gamma_min} must be < gamma_max={gamma_max}")


def build(cls, config_file: str | Path | None, overrides: list[str], *, base: dict | None = None,
          command: str = "train"):
    """``cls`` from its defaults, then ``base``, then the file, then ``key=value`` overrides; validated."""
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


"""Typed configs loaded from YAML: a bad config is a clear error that names the field."""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import TypeVar

import yaml
from pydantic import BaseModel, ValidationError

T = TypeVar("T", bound=BaseModel)


class ConfigError(ValueError):
    pass


def packaged_config(name: str) -> Path:
    """A config file of the repository's `configs/`, found where the package is installed: the package links to
    that folder and ships its YAML files as package data, so a non-editable install has them too."""
    return Path(str(resources.files("unifer_ray") / "configs" / name))


def parse_config(data: object, cls: type[T], source: str = "config") -> T:
    try:
        return cls.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '<root>'}: {err['msg']}" for err in exc.errors()
        )
        raise ConfigError(f"{source}: {problems}") from None


def read_yaml(path: str | Path) -> object:
    """The parsed YAML of a config file; a missing file or bad YAML is a ConfigError naming the file."""
    path = Path(path)
    try:
        return yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None


def load_config(path: str | Path, cls: type[T], section: str | None = None) -> T:
    """Load `cls` from a YAML file, or from one top-level `section` of it (one file can hold every stage)."""
    data = read_yaml(path)
    if section is not None:
        if not isinstance(data, dict) or section not in data:
            raise ConfigError(f"{path}: has no '{section}' section")
        data = data[section]
    return parse_config(data, cls, source=f"{path}" + (f" [{section}]" if section else ""))

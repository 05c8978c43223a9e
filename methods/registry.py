"""The one registry of protection methods, shared by `defend.py`, `main_defend.py` and their `--help`."""

from __future__ import annotations

import inspect
from typing import Any

from .base import Attack

METHODS: dict[str, type[Attack]] = {}


def register(cls: type[Attack]) -> type[Attack]:
    if not cls.name or cls.name in METHODS:
        raise ValueError(f"{cls.__name__} needs a unique name, got {cls.name!r}")
    METHODS[cls.name] = cls
    return cls


def get_method(name: str) -> type[Attack]:
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown defend method {name!r}; choose one of {', '.join(METHODS)}") from None


def create(name: str, **options: Any) -> Attack:
    """Build method `name` from the subset of `options` its constructor takes (models and hyper-parameters);
    an option set to None keeps the method's own default."""
    cls = get_method(name)
    accepted = inspect.signature(cls.__init__).parameters
    return cls(**{k: v for k, v in options.items() if k in accepted and v is not None})


def describe() -> str:
    """One line per method, for `--help`."""
    return "\n".join(f"  {name:<9} {cls.summary}" for name, cls in METHODS.items())

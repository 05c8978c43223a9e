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


def accepted_options(cls: type[Attack]) -> set[str]:
    """The keyword arguments `cls` takes, following `**options` up to the base classes that name them."""
    names: set[str] = set()
    for klass in cls.__mro__:
        if "__init__" not in vars(klass):
            continue
        parameters = inspect.signature(klass.__init__).parameters.values()
        names |= {p.name for p in parameters if p.kind is not p.VAR_KEYWORD and p.name != "self"}
        if not any(p.kind is p.VAR_KEYWORD for p in parameters):
            break
    return names


def create(name: str, **options: Any) -> Attack:
    """Build method `name` from the subset of `options` it takes (models and hyper-parameters); an option set to
    None keeps the method's own default."""
    cls = get_method(name)
    accepted = accepted_options(cls)
    return cls(**{k: v for k, v in options.items() if k in accepted and v is not None})


def describe() -> str:
    """One line per method, for `--help`."""
    return "\n".join(f"  {name:<9} {cls.summary}" for name, cls in METHODS.items())

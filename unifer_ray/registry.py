"""Small registries by name (advantage estimators, loss aggregations, rewards, datasets): one way to look a name up,
and one message for a name that is not there, naming the kind, the name and the names there are."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TypeVar

T = TypeVar("T")


def unknown_name(kind: str, name: object, known: Iterable[str]) -> str:
    """`unknown loss aggregation 'mean'; expected one of grpo, dr_grpo, dapo`"""
    return f"unknown {kind} {name!r}; expected one of {', '.join(known)}"


def lookup(registry: Mapping[str, T], name: str, kind: str) -> T:
    """`registry[name]`; a ValueError saying `unknown_name` when it holds no such name."""
    try:
        return registry[name]
    except KeyError:
        raise ValueError(unknown_name(kind, name, registry)) from None

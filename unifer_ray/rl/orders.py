"""Each epoch's order of the RLVR items, a registry by name (ORDERS): functions of the items and a seeded generator
that return a permutation of their indices."""

from __future__ import annotations

from collections import defaultdict

import numpy as np


def _shuffled(items: list[dict], rng: np.random.Generator) -> np.ndarray:
    return rng.permutation(len(items))


def _by_answer(items: list[dict], rng: np.random.Generator) -> np.ndarray:
    """A seeded order in which each answer's items are spread evenly over the epoch: any run of prompts holds the
    answers about in their share of the whole set. A step of prompts drawn at random holds some labels twice and
    others not at all, and on a small policy the update then shifts every image's answers toward the labels that
    happened to be rewarded (docs/benchmarks.md, "RLVR's label drift")."""
    groups: dict[str, list[int]] = defaultdict(list)
    for index in rng.permutation(len(items)):
        groups[items[index]["answer"]].append(int(index))
    keys = np.empty(len(items))
    for members in groups.values():
        keys[members] = (np.arange(len(members)) + rng.random(len(members))) / len(members)
    return np.argsort(keys, kind="stable")


def _by_id(items: list[dict], rng: np.random.Generator) -> np.ndarray:
    return np.arange(len(items))


ORDERS = {"shuffled": _shuffled, "by_answer": _by_answer, "id": _by_id}

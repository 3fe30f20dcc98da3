"""Verifiable rewards: pure functions `(completions, solutions, **meta) -> scores`, one score per completion.

`meta` holds per-completion lists: `answers` (the text inside the solution's <answer> tags), `problems`, `tasks`,
`datasets`, `ids`. A function takes the keywords it needs and ignores the rest (`**_`).

Registered: `accuracy` (the strict parser's answer equals the solution: the FERBench scoring rule) and `format`
(`<think>…</think>` then `<answer>…</answer>` over the whole completion). Any other function is named by its
module path, `package.module:function`.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence

import numpy as np

from unifer_ray.parsing import is_format_compliant, parse_strict
from unifer_ray.registry import unknown_name
from unifer_ray.rl.config import RewardSpec

RewardFn = Callable[..., Sequence[float]]


def accuracy_reward(completions: Sequence[str], solutions: Sequence[str], *, answers: Sequence[str],
                    **_) -> list[float]:
    """1 when the completion's last <answer> names the solution's answer (synonyms as FERBench reads them)."""
    return [float(parse_strict(c, [a]) is not None) for c, a in zip(completions, answers, strict=True)]


def format_reward(completions: Sequence[str], solutions: Sequence[str], **_) -> list[float]:
    return [float(is_format_compliant(c)) for c in completions]


REGISTRY: dict[str, RewardFn] = {"accuracy": accuracy_reward, "format": format_reward}


def load_reward(function: str) -> RewardFn:
    """A registered reward by name, or `package.module:function`."""
    if function in REGISTRY:
        return REGISTRY[function]
    module_name, sep, attr = function.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(unknown_name("reward function", function, [*REGISTRY, "'package.module:function'"]))
    try:
        fn = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"reward function {function!r} cannot be loaded: {exc}") from None
    if not callable(fn):
        raise ValueError(f"reward function {function!r} is not callable")
    return fn


class RewardSet:
    """The run's reward functions and weights; `score` returns each function's scores and the weighted total."""

    def __init__(self, specs: Sequence[RewardSpec]):
        self.specs = list(specs)
        self.functions = {spec.name: load_reward(spec.function or spec.name) for spec in self.specs}

    def score(self, completions: Sequence[str], items: Sequence[dict]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """`items[i]` is the RLVR item completion i answers (fields of `read_rlvr`)."""
        solutions = [item["solution"] for item in items]
        meta = {"answers": [item["answer"] for item in items], "problems": [item["problem"] for item in items],
                "tasks": [item.get("task", "") for item in items],
                "datasets": [item.get("dataset", "") for item in items], "ids": [item["id"] for item in items]}
        per_function: dict[str, np.ndarray] = {}
        for spec in self.specs:
            returned = self.functions[spec.name](list(completions), solutions, **meta)
            try:
                scores = np.asarray(returned, dtype=np.float64)
            except (TypeError, ValueError):
                raise ValueError(f"reward {spec.name!r} returned something that is not a list of numbers") from None
            if scores.shape != (len(completions),):
                raise ValueError(f"reward {spec.name!r} returned {scores.size} scores for "
                                 f"{len(completions)} completions")
            if not np.isfinite(scores).all():
                raise ValueError(f"reward {spec.name!r} returned a score that is not a finite number")
            per_function[spec.name] = scores
        total = sum(spec.weight * per_function[spec.name] for spec in self.specs)
        return np.asarray(total, dtype=np.float64), per_function

"""The prompts of each step: RLVR items read once through `read_rlvr`, then a seeded order per epoch (ORDERS).

The items' text columns are small (the images stay in storage until a rollout worker loads them), so the driver
holds them all; a step's batch is a pure function of (seed, step): the data position of a checkpoint is its step.
"""

from __future__ import annotations

import numpy as np

from unifer_ray.data.training_sets import read_rlvr
from unifer_ray.records import ErrorRecord
from unifer_ray.rl.config import PromptData
from unifer_ray.rl.orders import ORDERS

COLUMNS = ("id", "dataset", "task", "image_uri", "problem", "solution", "answer", "source", "row")
SUBSET_DRAW = 2**32 - 1  # the generator stream of `max_items`' draw: no epoch's (seed, epoch) stream


class PromptSource:
    def __init__(self, config: PromptData, *, prompts_per_step: int, seed: int):
        ds = read_rlvr(config.paths, config.image_root, keep_errors=True)
        rows = ds.take_all()
        self.errors = [ErrorRecord(r["source"], r["error"], row=r["row"], id=r["id"]).to_dict()
                       for r in rows if r["error"]]
        # Ray Data's block order is not fixed, and a curation run names its shards afresh: sort by item id first,
        # so that the same items give the same epochs.
        valid = [{k: r[k] for k in COLUMNS} for r in rows if not r["error"]]
        self.items = sorted((r for r in valid if config.tasks is None or r["task"] in config.tasks),
                            key=lambda r: (r["id"], r["source"], r["row"]))
        self.order = ORDERS[config.order]  # a name the config checked
        if config.max_items is not None and config.max_items < len(self.items):
            drawn = self.order(self.items, np.random.default_rng([seed, SUBSET_DRAW]))[: config.max_items]
            self.items = [self.items[i] for i in sorted(drawn)]
        present = sorted({r["task"] for r in valid})
        if config.tasks is not None and set(config.tasks) - set(present):
            raise ValueError(f"{config.paths}: data.tasks {sorted(set(config.tasks) - set(present))} match no valid "
                             f"RLVR item (their tasks: {present})")
        if len(self.items) < prompts_per_step:
            kept = "" if config.tasks is None else f" of the tasks {config.tasks} (of {len(valid)} valid)"
            raise ValueError(f"{config.paths}: {len(self.items)} valid RLVR items{kept}, fewer than prompts_per_step "
                             f"{prompts_per_step} ({len(self.errors)} bad rows)")
        self.prompts_per_step = prompts_per_step
        self.seed = seed
        self._epoch_order: tuple[int, np.ndarray] | None = None

    def __len__(self) -> int:
        return len(self.items)

    def position(self, step: int) -> tuple[int, int]:
        """(epoch, index within the epoch) of the first prompt of `step`."""
        return divmod(step * self.prompts_per_step, len(self.items))

    def batch(self, step: int) -> list[dict]:
        """The prompts of `step`: the next prompts_per_step items of the epochs' orders (an epoch's tail joins the
        next epoch's head)."""
        start = step * self.prompts_per_step
        return [self.items[self._index(start + i)] for i in range(self.prompts_per_step)]

    def _index(self, position: int) -> int:
        epoch, offset = divmod(position, len(self.items))
        if self._epoch_order is None or self._epoch_order[0] != epoch:
            self._epoch_order = (epoch, self.order(self.items, np.random.default_rng([self.seed, epoch])))
        return int(self._epoch_order[1][offset])

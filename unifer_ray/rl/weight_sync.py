"""Learner → rollout weights behind one interface: one `push(version)` per sync; `restore` for a fresh worker.

Only trainable parameters move: a frozen vision tower stays as the rollout engines loaded it.
- `object_store` (the default, everywhere): learner rank 0 gathers the trainable weights (every rank joins a
  ZeRO-3 gather), returns them once into the Ray object store, and every rollout worker loads that one object in
  place.
- `nccl` (GPU learners and vLLM engines): one NCCL group of learner rank 0 and every vLLM worker; each sync is one
  RPC per engine and a bucketed broadcast.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod

import ray

from unifer_ray.rl.config import SyncConfig
from unifer_ray.rl.learner import LearnerGroup
from unifer_ray.rl.rollout import RolloutGroup


class WeightSync(ABC):
    def __init__(self, learners: LearnerGroup, rollouts: RolloutGroup):
        self.learners = learners
        self.rollouts = rollouts
        self.version = 0  # what the rollout workers hold (or will, once queued loads run)
        rollouts.restore = self.restore

    @staticmethod
    def create(config: SyncConfig, learners: LearnerGroup, rollouts: RolloutGroup) -> "WeightSync":
        if config.kind == "nccl":
            return NCCLSync(learners, rollouts, config)
        return ObjectStoreSync(learners, rollouts)

    @abstractmethod
    def push(self, version: int, *, wait: bool = True) -> dict[str, float]:
        """Send the learners' weights to every rollout worker as `version`; returns timings (seconds).

        Without `wait`, the workers may still be generating: the load runs after their current batch.
        """

    @abstractmethod
    def restore(self, worker: int) -> None:
        """Bring a freshly started rollout worker (starting-checkpoint weights) to the current version."""


class ObjectStoreSync(WeightSync):
    def __init__(self, learners: LearnerGroup, rollouts: RolloutGroup):
        super().__init__(learners, rollouts)
        self.state: ray.ObjectRef | None = None  # the current version's weights; None: the starting checkpoint

    def push(self, version: int, *, wait: bool = True) -> dict[str, float]:
        started = time.perf_counter()
        self.state = self.learners.trainable_state()
        self.version = version
        gathered = time.perf_counter()
        load_s = self.rollouts.load_weights(self.state, version, wait=wait)
        return {"sync_gather_s": gathered - started, "sync_load_s": load_s, "sync_s": time.perf_counter() - started}

    def restore(self, worker: int) -> None:
        if self.state is not None:
            ray.get(self.rollouts.workers[worker].load_weights.remote(self.state, self.version))


class NCCLSync(WeightSync):
    def __init__(self, learners: LearnerGroup, rollouts: RolloutGroup, config: SyncConfig):
        super().__init__(learners, rollouts)
        self.config = config
        self._connect()
        self.buckets = ray.get(learners.workers[0].weight_buckets.remote(config.bucket_mb * 2**20, config.dtype))

    def _connect(self) -> None:
        """One NCCL group: learner rank 0 is rank 0, then each engine's workers in turn."""
        master_addr, master_port = ray.get(self.learners.workers[0].address.remote())
        per_engine = self.rollouts.ranks_per_worker
        world_size = 1 + per_engine * len(self.rollouts.workers)
        joins = [w.init_weight_group.remote(master_addr, master_port, 1 + i * per_engine, world_size)
                 for i, w in enumerate(self.rollouts.workers)]
        joins.append(self.learners.workers[0].init_weight_group.remote(master_addr, master_port, world_size))
        ray.get(joins)

    def push(self, version: int, *, wait: bool = True) -> dict[str, float]:
        # A broadcast needs every receiver: the sync always waits (queued behind any generation in flight).
        started = time.perf_counter()
        receives = [w.receive_weights.remote(self.buckets, version) for w in self.rollouts.workers]
        sends = [w.broadcast_weights.remote(self.buckets) for w in self.learners.workers]
        ray.get(sends)
        load_s = max(ray.get(receives))
        self.version = self.rollouts.version = version
        return {"sync_gather_s": 0.0, "sync_load_s": load_s, "sync_s": time.perf_counter() - started}

    def restore(self, worker: int) -> None:
        # A new engine is outside the NCCL group: form the group again with everyone, then send the weights.
        self._connect()
        if self.version:
            self.push(self.version)

"""Learner → rollout weights behind one interface: one `push(version)` per sync; `restore` for a fresh worker.

Both kinds go through vLLM's weight-transfer API (`start_weight_update` / `update_weights` / `finish_weight_update`,
see `vllm_transfer`), so every update reloads with vLLM's post-load processing, and then the engine's prefix,
multimodal and encoder caches are reset: no rollout uses KV computed with old weights. The engine's weight version
is the policy version. Only trainable parameters move: a frozen vision tower stays as the engines loaded it.
- `object_store` (the default, everywhere): learner rank 0 gathers the trainable weights (every rank joins a ZeRO-3
  gather) and returns them once into the Ray object store; each rollout actor fetches that one object and hands it to
  its engine through a file in shared memory (an hf engine copies it in place).
- `nccl` (GPU learners and vLLM engines): vLLM's NCCL backend, learner rank 0 the sender, bucketed (packed).
Every wait has a timeout. A worker found dead or hung is replaced (and restored); an NCCL group with a dead member
is aborted and formed again with the replacements.
"""

from __future__ import annotations

import logging
import time
from abc import ABC, abstractmethod

import ray

from unifer_ray.ray_runtime import get_all
from unifer_ray.rl.config import SyncConfig
from unifer_ray.rl.learner import LearnerGroup
from unifer_ray.rl.rollout import RolloutGroup

log = logging.getLogger(__name__)
FAILURES = (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError, ray.exceptions.RayTaskError)


class WeightSync(ABC):
    def __init__(self, learners: LearnerGroup, rollouts: RolloutGroup):
        self.learners = learners
        self.rollouts = rollouts
        self.version = 0  # what the rollout workers hold (or will, once queued loads run)
        rollouts.restore = self.restore

    @staticmethod
    def create(config: SyncConfig, learners: LearnerGroup, rollouts: RolloutGroup) -> WeightSync:
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
        self.state = self.learners.trainable_state(file_names=self.rollouts.vllm)
        self.version = version
        gathered = time.perf_counter()
        load_s = self.rollouts.load_weights(self.state, version, wait=wait)
        return {"sync_gather_s": gathered - started, "sync_load_s": load_s, "sync_s": time.perf_counter() - started}

    def restore(self, worker: int) -> None:
        if self.state is not None:
            ray.get(self.rollouts.workers[worker].load_weights.remote(self.state, self.version),
                    timeout=self.rollouts.config.sync_timeout_s)


class NCCLSync(WeightSync):
    def __init__(self, learners: LearnerGroup, rollouts: RolloutGroup, config: SyncConfig):
        super().__init__(learners, rollouts)
        self.config = config
        self.timeout_s = rollouts.config.sync_timeout_s
        self.update_timeout_s = rollouts.config.update_timeout_s  # below the learners' group timeout
        self._connect()

    def _connect(self) -> None:
        """One NCCL group: learner rank 0 is rank 0, then each engine's workers in turn."""
        master_addr, port = ray.get(self.learners.workers[0].address.remote(), timeout=self.timeout_s)
        per_engine = self.rollouts.ranks_per_worker
        world_size = 1 + per_engine * len(self.rollouts.workers)
        ray.get([w.init_weight_transfer.remote(master_addr, port, world_size, self.rollouts.workers, per_engine,
                                                self.config.bucket_mb * 2**20, self.config.dtype,
                                                self.update_timeout_s)
                 for w in self.learners.workers], timeout=self.update_timeout_s)

    def push(self, version: int, *, wait: bool = True) -> dict[str, float]:
        # A broadcast needs every receiver: the sync always waits (queued behind any generation in flight).
        started = time.perf_counter()
        while True:
            try:
                # Rank 0 raises as soon as an engine fails (its client aborts the group); the others finish their
                # gathers beside its now silent broadcasts.
                get_all([w.send_weights.remote(version) for w in self.learners.workers], self.update_timeout_s)
                break
            except FAILURES as exc:
                self._rebuild(exc)
        self.version = self.rollouts.version = version
        elapsed = time.perf_counter() - started
        return {"sync_gather_s": 0.0, "sync_load_s": elapsed, "sync_s": elapsed}

    def _rebuild(self, cause: Exception) -> None:
        """A member of the group died or hung: abort the group (ending the sender's broadcast), replace every
        engine (the live ones wait inside the same broadcast), and form the group again."""
        log.warning("NCCL weight sync failed (%s): rebuilding the group", type(cause).__name__)
        ray.get([w.abort_weight_transfer.remote() for w in self.learners.workers], timeout=self.timeout_s)
        restore, self.rollouts.restore = self.rollouts.restore, None  # the new group restores them all at once
        try:
            for index in range(len(self.rollouts.workers)):
                self.rollouts.replace(index, cause)
        finally:
            self.rollouts.restore = restore
        self._connect()

    def restore(self, worker: int) -> None:
        # A new engine is outside the NCCL group: form the group again with everyone, then send the weights.
        self._connect()
        if self.version:
            self.push(self.version)

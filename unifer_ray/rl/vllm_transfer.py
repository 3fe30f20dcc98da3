"""Learner weights into vLLM engines through vLLM's own weight-transfer API (vLLM is imported here only: this module
is loaded by the vLLM worker processes and, for NCCL, by learner rank 0).

Every update is one round of `start_weight_update` → `update_weights` → `finish_weight_update` on the engine: the
engine's transfer backend wraps it in vLLM's layer-wise reload, so each layer is post-processed again after its new
weights arrive (CPU linear weights are prepacked: writing parameters alone leaves the old values in use).

- `unifer_shm` (CPU, or anywhere the learners are not GPUs): registered below with vLLM's registry. The rollout actor
  writes the state (which it fetched once from the Ray object store) to a safetensors file in /dev/shm and sends
  only its path and parameter names; the engine's worker memory-maps the file. No tensor is ever an RPC argument
  (vLLM's msgpack would not deliver it as one).
- `nccl` (GPU learners and engines): vLLM's own backend. Learner rank 0 is the trainer sender; `TrainableSource`
  yields the trainable parameters (gathered from ZeRO-3 shards on every rank) and `RolloutClient` fans each control
  call out to every rollout actor, giving each engine its ranks in the one NCCL group.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from safetensors import safe_open
from vllm.distributed.weight_transfer.base import (
    ParamMeta,
    WeightSource,
    WeightTransferEngine,
    WeightTransferInitInfo,
    WeightTransferUpdateInfo,
)
from vllm.distributed.weight_transfer.factory import WeightTransferEngineFactory
from vllm.model_executor.model_loader.reload import finalize_layerwise_reload, initialize_layerwise_reload

from unifer_ray.ray_runtime import get_all
from unifer_ray.rl.transfer_names import SHM_BACKEND, file_format


@dataclass
class SharedMemoryInitInfo(WeightTransferInitInfo):
    pass  # nothing to rendezvous: each update names its own file


@dataclass
class SharedMemoryUpdateInfo(WeightTransferUpdateInfo):
    path: str  # a safetensors file on the engine's node (in /dev/shm)
    names: list[str]  # loaded in this order: the model's, so each layer completes (and is processed) in turn


class SharedMemoryWeightTransferEngine(WeightTransferEngine[SharedMemoryInitInfo, SharedMemoryUpdateInfo]):
    init_info_cls = SharedMemoryInitInfo
    update_info_cls = SharedMemoryUpdateInfo

    def init_transfer_engine(self, init_info: SharedMemoryInitInfo) -> None:
        pass

    def start_weight_update(self) -> None:
        initialize_layerwise_reload(self.model)

    def update_weights(self, update_info: dict[str, Any]) -> None:
        # The base class synchronises the accelerator, which a CPU build does not have.
        self.receive_weights(self.parse_update_info(update_info))
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    def receive_weights(self, update_info: SharedMemoryUpdateInfo) -> None:
        with safe_open(update_info.path, framework="pt") as f:
            self.model.load_weights((name, f.get_tensor(name)) for name in update_info.names)

    def finish_weight_update(self) -> None:
        finalize_layerwise_reload(self.model, self.model_config)

    def shutdown(self) -> None:
        pass


class RegisterTransferEngines:
    """`worker_extension_cls` of the rollout engines: vLLM imports it in every worker before it loads the model, and
    importing this module registers `unifer_shm`. It adds no method."""


try:
    WeightTransferEngineFactory.register_engine(SHM_BACKEND, SharedMemoryWeightTransferEngine)
except ValueError:  # already registered in this process
    pass


# ---------------------------------------------------------------- NCCL, learner side (GPU)


class TrainableSource(WeightSource):
    """The learner's trainable parameters in model order, each gathered whole (a collective under ZeRO-3, so every
    learner rank iterates in lockstep) and cast to `dtype` (None: as trained)."""

    def __init__(self, parallel: Any, dtype: torch.dtype | None):
        self.parallel = parallel
        self.dtype = dtype
        self.params = list(parallel.trainable_parameters())
        # vLLM maps the names of the model's files (see `file_format`); Qwen2.5-VL's differ by renaming only.
        self.names = [next(iter(file_format(parallel.module, {name: torch.empty(0)}))) for name, _ in self.params]
        self.gathered = 0  # parameters the current pass has gathered
        self._pass: Iterator[tuple[str, torch.Tensor]] | None = None

    def metadata(self) -> list[ParamMeta]:
        return [ParamMeta(name, self.dtype or p.dtype, tuple(getattr(p, "ds_shape", p.shape)))
                for name, (_, p) in zip(self.names, self.params)]

    def start_send(self) -> None:
        """A new send begins: none of its parameters gathered yet."""
        self.gathered, self._pass = 0, None

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        self.start_send()
        self._pass = self._gather_each()
        return self._pass

    def _gather_each(self) -> Iterator[tuple[str, torch.Tensor]]:
        for name, (_, p) in zip(self.names, self.params):
            with self.parallel.gathered([p]):
                self.gathered += 1
                yield name, p.detach().to(self.dtype or p.dtype)

    def finish_gathers(self) -> None:
        """Gather the parameters a failed send did not reach. The other ranks gather every parameter in step with
        this one (ZeRO-3): a sender that stopped early (an engine failed before or during the broadcast) would leave
        them waiting in a collective until the group's timeout kills them."""
        if self._pass is not None:
            self._pass.close()  # leaves the gathered block of the parameter it stopped at
            self._pass = None
        for _, p in self.params[self.gathered:]:
            with self.parallel.gathered([p]):
                pass
        self.gathered = len(self.params)


class RolloutClient:
    """vLLM's `VLLMWeightSyncClient` over the rollout actors: each call reaches every engine and waits at most
    `timeout_s`. Engine i's workers take NCCL ranks 1 + i * ranks_per_engine onwards (vLLM's trainer engine assumes a
    single engine at rank offset 1).

    The first engine that fails (or the timeout) calls `abort` at once and raises: `update_weights` runs on a thread
    beside the sender's broadcast, which would otherwise wait in NCCL for the dead engine until a timeout. Aborting
    the group ends that broadcast; the caller then rebuilds the group with new engines."""

    def __init__(self, actors: list, ranks_per_engine: int, timeout_s: float, abort: Callable[[], None]):
        self.actors, self.ranks_per_engine, self.timeout_s, self.abort = actors, ranks_per_engine, timeout_s, abort
        self.version: str | None = None  # set before each send: vLLM's trainer engine finishes without one

    def _all(self, refs: list) -> None:
        try:
            get_all(refs, self.timeout_s)
        except BaseException:
            self.abort()
            raise

    def init_weight_transfer_engine(self, init_info: dict[str, Any]) -> None:
        self._all([a.init_weight_transfer.remote(init_info | {"rank_offset": 1 + i * self.ranks_per_engine})
                   for i, a in enumerate(self.actors)])

    def start_weight_update(self) -> None:
        self._all([a.start_weight_update.remote() for a in self.actors])

    def update_weights(self, update_info: dict[str, Any]) -> None:
        self._all([a.update_weights.remote(update_info) for a in self.actors])

    def finish_weight_update(self, weight_version: str | None = None) -> None:
        self._all([a.finish_weight_update.remote(weight_version or self.version) for a in self.actors])

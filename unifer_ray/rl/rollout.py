"""Rollout actors: N Ray actors, each one GenerationEngine (vLLM by default: the CPU build here, GPU builds on
clusters; or hf), generating G completions per prompt with token ids and log-probabilities, each batch tagged with
the policy version of the weights it used (a vLLM engine's own weight version).

A worker that dies, or does not answer within its timeout, is replaced: the new actor starts from the starting
checkpoint, the weight sync brings it to the current version (`restore`), and the share of the batch is generated
again with the same seeds. A failed rollout therefore never reaches the rewards.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import ray
from ray.util.placement_group import placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from unifer_ray import placement
from unifer_ray.data.images import ImageError, load_image
from unifer_ray.engines import ChatRequest, Completion, EngineSpec, SamplingParams, create_engine
from unifer_ray.engines.hf import HFEngine, chat_text
from unifer_ray.engines.processes import end_on_node, engine_pids
from unifer_ray.engines.vllm_env import vllm_env
from unifer_ray.ray_runtime import THREAD_ENV
from unifer_ray.records import ErrorRecord
from unifer_ray.rl.config import RolloutConfig
from unifer_ray.rl.transfer_names import SHM_BACKEND, TRANSFER_REGISTRAR

log = logging.getLogger(__name__)

# How long a worker may stay unreachable before it is replaced without the cluster's verdict (`_await_verdict`).
UNREACHABLE_VERDICT_S = 120


class RolloutWorker:
    """One engine (a Ray actor). `generate` loads each prompt's image itself; prompts whose image cannot be used,
    or whose prompt exceeds max_prompt_tokens, come back as error records, never as completions."""

    def __init__(self, engine: dict, *, image_size: int, max_prompt_tokens: int, torch_threads: int,
                 tensor_parallel: bool):
        import torch

        torch.set_num_threads(torch_threads)
        if tensor_parallel:
            # vLLM's Ray executor places its workers in our placement group; it must see every GPU of it.
            os.environ.pop("CUDA_VISIBLE_DEVICES", None)
        self.engine = create_engine(EngineSpec.model_validate(engine))
        self.vllm = not isinstance(self.engine, HFEngine)
        # Recorded now: an owner that replaces this actor ends them itself (engines/processes.py).
        self.engine_processes = {"node_id": ray.get_runtime_context().get_node_id(), "pids": engine_pids()}
        if self.vllm:
            self.engine.llm.update_weight_version("0")  # vLLM starts at "default"
        self.hf_version = 0
        self.image_size = image_size
        self.max_prompt_tokens = max_prompt_tokens

    @property
    def version(self) -> int:
        return int(self.engine.llm.get_weight_version()) if self.vllm else self.hf_version

    def ready(self) -> dict:
        """Once the engine has started: whether it is vLLM, the dtype it runs in, its processes (node and pids)."""
        dtype = self.engine.llm.llm_engine.model_config.dtype if self.vllm else self.engine.model.dtype
        return {"vllm": self.vllm, "dtype": str(dtype).removeprefix("torch."),
                "engine_processes": self.engine_processes}

    def generate(self, items: list[dict], params: dict) -> dict:
        requests, kept, errors = [], [], []
        for index, item in enumerate(items):
            try:
                image = load_image(item["image_uri"], self.image_size)
            except ImageError as exc:
                errors.append(_error(item, f"image {item['image_uri']}: {exc}"))
                continue
            request = ChatRequest.single_image(image, item["problem"])
            length = self._prompt_tokens(request)
            if length > self.max_prompt_tokens:
                errors.append(_error(item, f"prompt of {length} tokens exceeds max_prompt_tokens "
                                           f"{self.max_prompt_tokens}"))
                continue
            requests.append(request)
            kept.append(index)
        started = time.perf_counter()
        try:
            groups = self.engine.generate(requests, SamplingParams.model_validate(params)) if requests else []
        except Exception as exc:
            if type(exc).__name__ == "EngineDeadError":  # vLLM's engine process is gone for good
                log.error("the vLLM engine died (%s): this rollout actor exits, to be replaced", exc)
                os._exit(1)
            raise
        return {"version": self.version, "kept": kept, "groups": groups, "errors": errors,
                "seconds": time.perf_counter() - started}

    def _prompt_tokens(self, request: ChatRequest) -> int:
        processor = self.engine.processor
        encoded = processor(text=[chat_text(processor, request)], images=request.images())
        return len(encoded["input_ids"][0])

    def load_weights(self, state: dict, version: int) -> float:
        """Load `state` (trainable weights by name, from the object store); the engine now serves `version`.

        vLLM: one update through vLLM's weight-transfer API, the tensors passing through a file in shared memory."""
        started = time.perf_counter()
        if not self.vllm:
            self.engine.load_state_dict(state)
            self.hf_version = version
            return time.perf_counter() - started
        with tempfile.NamedTemporaryFile(dir=SHARED_MEMORY, suffix=".safetensors") as file:
            from safetensors.torch import save_file

            save_file({name: t.contiguous() for name, t in state.items()}, file.name)
            self.start_weight_update()
            self.update_weights({"path": file.name, "names": list(state)})
            self.finish_weight_update(str(version))
        return time.perf_counter() - started

    # vLLM's weight-transfer API, called by this actor (shared memory) or by learner rank 0 (NCCL).
    def init_weight_transfer(self, init_info: dict) -> None:
        self.engine.llm.init_weight_transfer_engine({"init_info": init_info})

    def start_weight_update(self) -> None:
        self.engine.llm.start_weight_update()

    def update_weights(self, update_info: dict) -> None:
        self.engine.llm.update_weights({"update_info": update_info})

    def finish_weight_update(self, version: str) -> None:
        """Finish the update as `version`, and drop every cache entry computed with the old weights: prefix KV,
        preprocessed multimodal inputs and vision-encoder outputs."""
        llm = self.engine.llm
        llm.finish_weight_update(weight_version=version)
        llm.reset_prefix_cache()
        llm.reset_mm_cache()
        llm.llm_engine.reset_encoder_cache()


SHARED_MEMORY = "/dev/shm" if os.path.isdir("/dev/shm") else None  # None: the temp dir


def _error(item: dict, reason: str) -> dict:
    return ErrorRecord(item.get("source", ""), reason, row=item.get("row"), id=item["id"]).to_dict()


@dataclass
class _Share:
    worker: int  # index of the worker generating it
    items: list[dict]
    params: dict
    actor: ray.actor.ActorHandle  # the worker's actor when the share was (re)submitted
    ref: ray.ObjectRef


@dataclass
class _Load:
    worker: int
    actor: ray.actor.ActorHandle  # the worker's actor when the load was issued
    ref: ray.ObjectRef


@dataclass
class PendingRollout:
    items: list[dict]
    shares: list[_Share]


@dataclass
class Rollout:
    """A generated batch: the prompts that made it, G completions each, and the version that produced each."""

    items: list[dict]
    completions: list[list[Completion]]
    versions: list[int]
    errors: list[dict]  # prompts dropped (unusable image, prompt too long)
    generate_s: float  # the slowest worker's generation time
    wait_s: float  # how long the controller waited for the batch after asking for it


def share_seeds(count: int, workers: int, seed: int, n: int) -> list[tuple[np.ndarray, int]]:
    """Each worker's contiguous share of `count` prompts, and the seed of its call: an engine gives the j-th request
    of a call seed + j * n, so prompt i's samples come from seed + i * n whichever worker draws them."""
    return [(rows, seed + int(rows[0]) * n if len(rows) else seed)
            for rows in np.array_split(np.arange(count), workers)]


class RolloutGroup:
    """The rollout actors of a run, serving `model` (the starting policy) and then the weights they are sent.

    Each worker is one engine: vLLM (weights arriving through shared memory, or NCCL with `nccl`) or hf, in its own
    placement group (on GPUs one bundle per tensor-parallel GPU), which outlives the worker's replacements."""

    def __init__(self, config: RolloutConfig, *, model: str, image_size: int, max_prompt_tokens: int,
                 nccl: bool = False, revision: str | None = None):
        self.config = config
        self.tensor_parallel = int(config.engine.vllm_kwargs.get("tensor_parallel_size", 1))
        # processed_logprobs: the sampled tokens' log-probabilities after temperature, as the learner computes them.
        vllm_kwargs = {"worker_extension_cls": TRANSFER_REGISTRAR,
                       "weight_transfer_config": {"backend": "nccl" if nccl else SHM_BACKEND},
                       "logprobs_mode": "processed_logprobs"} | config.engine.vllm_kwargs
        if self.tensor_parallel > 1:
            vllm_kwargs.setdefault("distributed_executor_backend", "ray")
        self.spec = config.engine.spec(model, revision).model_copy(update={"vllm_kwargs": vllm_kwargs}).model_dump()
        self.worker_kwargs = {"image_size": image_size, "max_prompt_tokens": max_prompt_tokens,
                              "torch_threads": config.torch_threads, "tensor_parallel": self.tensor_parallel > 1}
        self.name = f"rollout-{uuid.uuid4().hex[:8]}"  # actors are named <name>-<index>-<replacement>
        self.replacements = 0
        bundles = config.bundles
        self.placement_groups = [placement_group(bundles, **placement.group_options("rollout", len(bundles)))
                                 for _ in range(config.num_workers)]
        self.workers: list[ray.actor.ActorHandle] = []
        self.engine_processes: list[dict | None] = [None] * config.num_workers  # known once an engine is ready
        try:
            for index in range(config.num_workers):
                self._wait_for_placement(index)
            self.workers = [self._start(i) for i in range(config.num_workers)]
            started = ray.get([w.ready.remote() for w in self.workers], timeout=config.start_timeout_s)
        except BaseException:
            self.shutdown()  # groups never placed, and workers that did not start in time, still hold their bundles
            raise
        self.vllm = started[0]["vllm"]
        self.dtype = started[0]["dtype"]  # what the rollout/learner mismatch in the metrics is measured with
        self.engine_processes = [s["engine_processes"] for s in started]  # worker i's, ended with it
        self.version = 0
        self.restore: Callable[[int], None] | None = None  # set by the weight sync: bring worker i up to date
        self._loads: list[_Load] = []  # weight loads issued without waiting

    def _start(self, index: int) -> ray.actor.ActorHandle:
        options: dict = {"num_cpus": self.config.num_cpus, "runtime_env": {"env_vars": THREAD_ENV | vllm_env()},
                         "name": f"{self.name}-{index}-{self.replacements}"}
        options["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
            placement_group=self.placement_groups[index], placement_group_bundle_index=0,
            placement_group_capture_child_tasks=True)
        options["num_gpus"] = 1 if self.config.num_gpus and self.tensor_parallel == 1 else 0
        return ray.remote(RolloutWorker).options(**options).remote(self.spec, **self.worker_kwargs)

    def _wait_for_placement(self, index: int) -> None:
        """Wait for worker `index`'s placement group, on its own timeout: on a cluster it may wait for a node's
        launch (a spot rollout lost with its node waits for the next one), which start_timeout_s does not cover."""
        group = self.placement_groups[index]
        if not group.wait(self.config.placement_timeout_s):
            raise RuntimeError(f"rollout worker {index}'s placement group ({group.bundle_specs}) was not placed "
                               f"within placement_timeout_s {self.config.placement_timeout_s}s: no rollout node can "
                               "hold it")

    @property
    def ranks_per_worker(self) -> int:
        """NCCL ranks of one engine: one per tensor-parallel GPU."""
        return self.tensor_parallel

    def submit(self, items: list[dict], params: SamplingParams, seed: int) -> PendingRollout:
        """Start generating `params.n` completions per item, each worker a contiguous share.

        Item i's samples are drawn from seed `seed + i * n` whichever worker generates them (`share_seeds`; vLLM
        gives the k-th sample + k), so seeds never repeat within a batch, a batch split over more workers draws the
        same samples, and a replacement worker regenerates exactly the same samples."""
        shares = []
        for index, (rows, share_seed) in enumerate(share_seeds(len(items), len(self.workers), seed, params.n)):
            if len(rows) == 0:
                continue
            share_items = [items[i] for i in rows]
            share_params = params.model_copy(update={"seed": share_seed}).model_dump()
            actor = self.workers[index]
            shares.append(_Share(index, share_items, share_params, actor,
                                 actor.generate.remote(share_items, share_params)))
        return PendingRollout(items, shares)

    def collect(self, pending: PendingRollout) -> Rollout:
        """Wait for a submitted batch; a share whose worker died or hung is generated again by its replacement.
        Then settle the weight loads queued behind it."""
        started = time.perf_counter()
        items, completions, versions, errors, seconds = [], [], [], [], []
        for share in pending.shares:
            out = self._result(share)
            for index, group in zip(out["kept"], out["groups"], strict=True):
                items.append(share.items[index])
                completions.append(group)
                versions.append(out["version"])
            errors += out["errors"]
            seconds.append(out["seconds"])
        self._settle(self._loads)
        self._loads = []
        return Rollout(items, completions, versions, errors, generate_s=max(seconds, default=0.0),
                       wait_s=time.perf_counter() - started)

    def generate(self, items: list[dict], params: SamplingParams, seed: int) -> Rollout:
        return self.collect(self.submit(items, params, seed))

    def _result(self, share: _Share) -> dict:
        while True:
            try:
                return ray.get(share.ref, timeout=self.config.generate_timeout_s)
            except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError) as exc:
                if self.workers[share.worker] is share.actor:  # else a weight load already replaced it
                    self.replace(share.worker, exc)
                share.actor = self.workers[share.worker]
                share.ref = share.actor.generate.remote(share.items, share.params)

    def load_weights(self, state: ray.ObjectRef, version: int, *, wait: bool) -> float:
        """Every worker loads `state` (fetched once per worker from the object store); returns the slowest load's
        seconds when waiting. Without waiting, the loads queue behind the workers' current generation and are
        settled by the next `collect`."""
        loads = [_Load(i, w, w.load_weights.remote(state, version)) for i, w in enumerate(self.workers)]
        self.version = version
        if not wait:
            self._loads += loads
            return 0.0
        return self._settle(loads)

    def _settle(self, loads: list[_Load]) -> float:
        """Wait for the loads as they finish: a worker whose load failed (its actor or engine died mid-update) is
        replaced at once, whatever the others still do; those still loading after sync_timeout_s are hung."""
        seconds = [0.0]
        # Loads of a worker replaced meanwhile are skipped: the replacement was restored to the current version.
        pending = {load.ref: load for load in loads if self.workers[load.worker] is load.actor}
        deadline = time.monotonic() + self.config.sync_timeout_s
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1, timeout=max(0.0, deadline - time.monotonic()))
            if not done:
                for load in pending.values():
                    self.replace(load.worker, ray.exceptions.GetTimeoutError(
                        f"weight load not done within sync_timeout_s {self.config.sync_timeout_s}s"))
                break
            load = pending.pop(done[0])
            try:
                seconds.append(ray.get(load.ref))
            except (ray.exceptions.RayActorError, ray.exceptions.RayTaskError) as exc:
                self.replace(load.worker, exc)  # the replacement is restored to the current version
        return max(seconds)

    def shutdown(self) -> None:
        for index, worker in enumerate(self.workers):
            self._end(index, worker)
        for group in self.placement_groups:
            ray.util.remove_placement_group(group)

    @staticmethod
    def _await_verdict(worker: ray.actor.ActorHandle) -> None:
        """Wait, at most UNREACHABLE_VERDICT_S, until an unreachable worker answers or is declared dead. A node that
        stops answering (a spot reclaim) is declared dead only once it has missed the GCS's health checks (about 15 s
        by default); a replacement started before that is placed in the group's bundle on that node and dies with it,
        so one lost node would cost two replacements."""
        deadline = time.monotonic() + UNREACHABLE_VERDICT_S
        while (left := deadline - time.monotonic()) > 0:
            try:
                ray.get(worker.ready.remote(), timeout=left)
                return
            except ray.exceptions.ActorUnavailableError:
                time.sleep(1)
            except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
                return

    def _end(self, index: int, worker: ray.actor.ActorHandle) -> None:
        """Kill worker `index` and end its engine's processes, waiting until they are gone."""
        ray.kill(worker)
        if self.engine_processes[index]:
            end_on_node(**self.engine_processes[index])
            self.engine_processes[index] = None

    def replace(self, index: int, cause: Exception) -> None:
        """Kill worker `index` (dead, hung or unreachable) and start another, brought to the current weights."""
        while True:
            if self.replacements >= self.config.max_replacements:
                raise RuntimeError(f"rollout worker {index} failed and all {self.config.max_replacements} "
                                   f"replacements are used up: {cause}")
            self.replacements += 1
            log.warning("rollout worker %d failed (%s); replacing it (replacement %d of %d)", index,
                        type(cause).__name__, self.replacements, self.config.max_replacements)
            if isinstance(cause, ray.exceptions.ActorUnavailableError):  # the worker or a replacement on a lost node
                self._await_verdict(self.workers[index])
            self._end(index, self.workers[index])
            self._wait_for_placement(index)  # a lost node: Ray places the group again, on the node launched next
            self.workers[index] = self._start(index)
            try:
                started = ray.get(self.workers[index].ready.remote(), timeout=self.config.start_timeout_s)
                self.engine_processes[index] = started["engine_processes"]
                if self.restore is not None:
                    self.restore(index)
                return
            except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError) as exc:
                cause = exc

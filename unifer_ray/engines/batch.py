"""Generation as a Ray Data stage, shared by FERBench and curation teachers.

Rows come in with `id`, `prompt` (the user's question), `image` (uint8 H×W×3) and `error` (non-empty: the row already
failed, e.g. its image did not decode); they leave without `image`, with `responses` (n texts), `num_tokens`,
`latency_s` and `error` (the generation's failure, if any). Nothing is dropped: a failed row stays a row.

- vllm: a CPU engine of one rank runs in one process (`OneProcessVLLM`), an engine per CPU of the cluster, and
  renders its rows with its own renderer (vLLM's `render_cmpl`: the tokens with the image's placeholders, the
  processor's patches, content hashes) before it schedules, runs the model and detokenizes, all on the core it holds;
  with `render_ahead` a request actor beside each engine renders them instead. GPU engines and engines of several
  ranks run `ray.data.llm`'s vLLM engine processor (continuous batching, several batches in flight per engine, tensor
  parallel, `accelerator_type`) on our request stage's rows: the chat text's token ids and the image at the model's
  grid with a content id, its own chat template, tokenizer, multi-modal and detokenizer stages off (each would be one
  more actor pool for work that the request stage does in one pass). Engines and batches in flight are sized on the
  cluster and the run's length unless the config says (`sized_workers`).
- hf and openai: a pool of EngineActors (engines/ray_actor.py). API models do not use `HttpRequestProcessorConfig`:
  its stage raises once a request has failed all its retries, which fails the whole dataset, where a benchmark needs
  that item as an error row and the rest scored.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import math
import pickle
import time
from collections.abc import Iterator
from functools import cache

import numpy as np
import ray
from pydantic import BaseModel, ConfigDict, Field

from unifer_ray import placement
from unifer_ray.engines import resolve_engine
from unifer_ray.engines.base import ChatRequest, SamplingParams
from unifer_ray.engines.ray_actor import EngineActor
from unifer_ray.engines.spec import EngineSpec
from unifer_ray.engines.vllm_env import runs_in_one_process, vllm_env, vllm_env_applied
from unifer_ray.records import object_array

# A CPU engine in one process does each request's work (rendering, scheduling, the model, detokenizing) on the core
# it holds, so a cluster gets an engine per CPU, less one CPU for the stages around them (decoding, outputs). Each
# engine more starts once (12 s of a core on a 2-core Zen 4, about 19 s on an AVX2 EPYC: 1,500-2,000 of its
# requests), so a run gets one engine per REQUESTS_PER_CPU_ENGINE requests at most. On 2 cores, 4,096 items (the vLLM
# path of benchmarks/bench_throughput.py, 2026-12-06): one engine 188 items/s, two 209; on AVX2 code 128 and 188.
REQUESTS_PER_CPU_ENGINE = 2048
# vLLM's batch limits for offline work on CPUs (what its LLM class gets): the AsyncLLM inside ray.data.llm's engine
# stage would get its server defaults, 128 sequences and 2048 tokens a step.
CPU_ENGINE_BATCH = {"max_num_seqs": 256, "max_num_batched_tokens": 4096}
VLLM_ENGINE_MAX_NUM_SEQS = 128  # vLLM's default for an AsyncLLM (GPU engines without max_num_seqs of their own)
REQUEST_ACTOR_CPUS = 0.25  # a vLLM stage's request actor (one per engine): about 1 ms a row
# A CPU engine that will see this many requests runs vLLM's compiled model (torch.compile, kept in torch inductor's
# cache between runs): on 2 cores the tiny model's engine did 417-441 rendered items/s compiled against 349 eager, for
# 3.6 s more start-up once the cache holds the model (10 s the first time), so it pays from about 7,000 requests.
COMPILE_FROM_REQUESTS = 8192

# Columns that the vLLM engine stage adds to each row; none of them leaves our output stage.
VLLM_OUTPUT_COLUMNS = ("prompt_token_ids", "num_input_tokens", "generated_tokens", "generated_text",
                       "num_generated_tokens", "embeddings", "metrics", "logprobs", "prompt_logprobs", "request_id",
                       "batch_uuid", "time_taken_llm", "params", "__inference_error__")


class EngineWorkers(BaseModel):
    """How the generation stage runs: the same fields for a benchmarked model and a curation teacher."""

    model_config = ConfigDict(extra="forbid")

    batch_size: int = Field(16, gt=0)  # rows per engine call (vllm: per batch handed to the engine)
    concurrency: int | None = Field(None, gt=0)  # engine actors (vllm: engine replicas); None: sized on the cluster
    num_cpus: float = Field(1.0, ge=0)  # per actor (vllm: per engine worker)
    num_gpus: float = Field(0.0, ge=0)  # per actor (vllm: per engine worker, i.e. per tensor-parallel rank)
    torch_threads: int = Field(1, gt=0)  # hf: torch threads per actor
    # vllm: batches in flight per engine, continuously batched; None: enough to fill the engine's max_num_seqs
    max_concurrent_batches: int | None = Field(None, gt=0)
    accelerator_type: str | None = None  # vllm on GPUs: the node's accelerator, e.g. "L40S" or "A100"
    # vllm, CPU engines of one rank: requests rendered in a request actor beside each engine (true), rather than by
    # the engine itself. Engines sized on the cluster fill its cores, where rendering ahead only adds a process start
    # (17 s of CPU on an AVX2 EPYC) and a pickle per request; it suits engines written to hold fewer cores than it has.
    render_ahead: bool = False


def sized_workers(workers: EngineWorkers, spec: EngineSpec, requests: int | None = None) -> EngineWorkers:
    """`workers` with what the config leaves out sized on the cluster that Ray is connected to (what it has now),
    for a run of `requests` requests (None: unknown).

    Engines: one per GPU (per tensor x pipeline parallel ranks for vLLM) where the workers take GPUs. On CPUs a vLLM
    engine per num_cpus x ranks CPUs, one CPU left for the stages around them, and at most one engine per
    REQUESTS_PER_CPU_ENGINE requests; at least one. hf actors on CPUs and API models: one, as each hf actor holds a
    copy of the model (written concurrency uses more cores).
    Batches in flight per vLLM engine: enough to keep its max_num_seqs scheduled.
    """
    kind = resolve_engine(spec)
    update: dict = {}
    if workers.concurrency is None:
        update["concurrency"] = _engines_on_cluster(workers, spec, kind, requests)
    if kind == "vllm" and workers.max_concurrent_batches is None:
        max_num_seqs = vllm_engine_kwargs(spec, workers).get("max_num_seqs", VLLM_ENGINE_MAX_NUM_SEQS)
        # An AsyncLLM gets one batch more to refill while the others run; an engine in one process takes its
        # batches in one call.
        refill = 0 if one_process_engine(spec, workers) else 1
        update["max_concurrent_batches"] = math.ceil(max_num_seqs / workers.batch_size) + refill
    return workers.model_copy(update=update)


def one_process_engine(spec: EngineSpec, workers: EngineWorkers) -> bool:
    """Whether the engine stage runs vLLM in one process (OneProcessVLLM): a CPU engine of one rank, unless
    `spec.one_process` is false. GPU engines and engines of several ranks take ray.data.llm's stage: the request
    stage renders a one-process engine's requests with vLLM on the CPU nodes, where a GPU build of vLLM has no
    platform to configure an engine for."""
    one_rank = runs_in_one_process(vllm_engine_kwargs(spec, workers), on_cpu=True)
    return one_rank and not workers.num_gpus and spec.one_process is not False


def renders_in_engine(spec: EngineSpec, workers: EngineWorkers) -> bool:
    """Whether a vLLM engine stage renders its own rows, so that no request actor runs beside each engine: a
    one-process engine unless `render_ahead`. ray.data.llm's engine stage always takes our request stage's rows."""
    return one_process_engine(spec, workers) and not workers.render_ahead


def _engines_on_cluster(workers: EngineWorkers, spec: EngineSpec, kind: str, requests: int | None) -> int:
    resources = ray.cluster_resources()
    ranks = spec.vllm_kwargs.get("tensor_parallel_size", 1) * spec.vllm_kwargs.get("pipeline_parallel_size", 1)
    if workers.num_gpus and kind != "openai":
        per_engine = ranks if kind == "vllm" else workers.num_gpus
        return max(1, int(resources.get("GPU", 0) // per_engine))
    if kind != "vllm":
        return 1
    engines = int((resources.get("CPU", 0) - 1) // (max(workers.num_cpus, 1) * ranks))
    if requests is not None:
        engines = min(engines, math.ceil(requests / REQUESTS_PER_CPU_ENGINE))
    return max(1, engines)


def compiled_for_long_runs(spec: EngineSpec, workers: EngineWorkers, requests: int | None) -> EngineSpec:
    """`spec` with vLLM's compiled model (`enforce_eager: false`) where it is a CPU vLLM engine that will see at least
    COMPILE_FROM_REQUESTS of the run's requests (over `workers.concurrency` engines) and its vllm_kwargs do not say;
    CPU engines are eager otherwise (their start-up is the larger cost: tests, the demo, rollouts, Serve). GPU
    engines keep vLLM's own choice."""
    if (requests is None or requests < COMPILE_FROM_REQUESTS * (workers.concurrency or 1) or workers.num_gpus
            or resolve_engine(spec) != "vllm" or "enforce_eager" in spec.vllm_kwargs):
        return spec
    return spec.model_copy(update={"vllm_kwargs": spec.vllm_kwargs | {"enforce_eager": False}})


def add_generation(ds: ray.data.Dataset, spec: EngineSpec, sampling: SamplingParams, workers: EngineWorkers, *,
                   rows: int | None = None) -> ray.data.Dataset:
    """`ds` → the same rows with `responses`, `num_tokens` and `latency_s`, generated by `spec`. `rows`: how many
    rows `ds` has (at most), where the caller knows: CPU engines are sized on it (`sized_workers`), and a long run
    compiles (`compiled_for_long_runs`)."""
    requests = None if rows is None else rows * sampling.n
    workers = sized_workers(workers, spec, requests)
    spec = compiled_for_long_runs(spec, workers, requests)
    if resolve_engine(spec) == "vllm":
        return _vllm_generation(ds, spec, sampling, workers)
    return ds.map_batches(
        EngineActor,
        fn_constructor_kwargs={"engine": spec.model_dump(), "sampling": sampling.model_dump(),
                               "torch_threads": workers.torch_threads},
        batch_size=workers.batch_size, compute=ray.data.ActorPoolStrategy(size=workers.concurrency),
        num_cpus=workers.num_cpus, num_gpus=workers.num_gpus, **gpu_node_options(workers),
    )


def held_cpus(workers: EngineWorkers, spec: EngineSpec, requests: int | None = None) -> float:
    """The CPUs a generation stage's actors hold for a run of `requests` requests (engines, and vLLM's request
    actors), as sized on the cluster now: what the stages around them (decoding, scoring) and other runs cannot
    have. A vLLM engine's request actor counts where it has one (`render_ahead`, or ray.data.llm's engine stage)."""
    workers = sized_workers(workers, spec, requests)
    requests_beside = resolve_engine(spec) == "vllm" and not renders_in_engine(spec, workers)
    per_engine = workers.num_cpus + (REQUEST_ACTOR_CPUS if requests_beside else 0.0)
    return workers.concurrency * per_engine


def gpu_node_options(workers: EngineWorkers) -> dict:
    """GPU engines go to the GPU (rollout) node type; on a labelled cluster Ray Data's default is the cpu nodes."""
    return placement.actor_options("rollout") if workers.num_gpus else {}


def vllm_worker_bundle(workers: EngineWorkers) -> dict[str, float]:
    """The placement bundle of one vLLM engine worker (one per tensor-parallel rank)."""
    return {"CPU": workers.num_cpus} | ({"GPU": 1} if workers.num_gpus else {})


def vllm_engine_kwargs(spec: EngineSpec, workers: EngineWorkers, *, seeded: bool = False) -> dict:
    """The engine stage's engine_kwargs: on CPUs vLLM's own batch limits for offline work first (CPU_ENGINE_BATCH),
    then our defaults and the spec's own (engines/vllm_engine.py)."""
    from unifer_ray.engines.vllm_engine import vllm_llm_kwargs

    on_cpu = not workers.num_gpus
    return (CPU_ENGINE_BATCH if on_cpu else {}) | vllm_llm_kwargs(spec, on_cpu=on_cpu, seeded=seeded)


def vllm_processor_config(spec: EngineSpec, workers: EngineWorkers, *, seeded: bool = False):
    """`ray.data.llm`'s processor config for a spec: the engine stage alone, one placement bundle per engine worker."""
    from ray.data.llm import vLLMEngineProcessorConfig

    return vLLMEngineProcessorConfig(
        model_source=spec.model,
        engine_kwargs=vllm_engine_kwargs(spec, workers, seeded=seeded),
        batch_size=workers.batch_size,
        concurrency=workers.concurrency,
        max_concurrent_batches=workers.max_concurrent_batches,
        accelerator_type=workers.accelerator_type,
        placement_group_config={"bundle_per_worker": vllm_worker_bundle(workers)},
        runtime_env={"env_vars": vllm_env()},
        should_continue_on_error=True,  # a prompt vLLM refuses (e.g. longer than the context) is one error row
        chat_template_stage={"enabled": False},
        tokenize_stage={"enabled": False},
        prepare_multimodal_stage={"enabled": False},
        detokenize_stage={"enabled": False},
        log_engine_metrics=False,
    )


def _vllm_generation(ds: ray.data.Dataset, spec: EngineSpec, sampling: SamplingParams,
                     workers: EngineWorkers) -> ray.data.Dataset:
    # The engine stage returns one completion per row: n samples are n rows (sample k seeded seed + k, vLLM's own
    # rule for n), gathered again by id after the engine.
    # Where a request stage runs, one actor per engine loads the processor (and the renderer) once, while the engines
    # start, where every new task worker would load them again.
    one_process = one_process_engine(spec, workers)
    engine_kwargs = vllm_engine_kwargs(spec, workers, seeded=sampling.seed is not None)
    request_kwargs = {"model": spec.model, "revision": spec.revision, "sampling": sampling.model_dump()}
    in_engine = renders_in_engine(spec, workers)
    if not in_engine:
        ds = ds.map_batches(VLLMRequests, fn_constructor_kwargs=request_kwargs | {
                                "engine_kwargs": engine_kwargs if one_process else None},
                            batch_size=workers.batch_size, compute=ray.data.ActorPoolStrategy(size=workers.concurrency),
                            num_cpus=REQUEST_ACTOR_CPUS)
    if one_process:
        ds = ds.map_batches(OneProcessVLLM, fn_constructor_kwargs={
                                "model": spec.model, "engine_kwargs": engine_kwargs,
                                "request_kwargs": request_kwargs if in_engine else None},
                            batch_size=workers.batch_size * workers.max_concurrent_batches,
                            compute=ray.data.ActorPoolStrategy(size=workers.concurrency), num_cpus=workers.num_cpus,
                            runtime_env={"env_vars": vllm_env()})  # its preloads, at the actor process's start
    else:
        from ray.data.llm import build_processor

        processor = build_processor(vllm_processor_config(spec, workers, seeded=sampling.seed is not None))
        # The processor config has no label selector: the engine stage's own map_batches options take it.
        processor.get_stage_by_name("vLLMEngineStage").map_batches_kwargs.update(gpu_node_options(workers))
        ds = processor(ds)
    ds = ds.map_batches(vllm_outputs, batch_size=None, num_cpus=0.1)
    if sampling.n > 1:
        ds = ds.groupby("id").map_groups(gather_samples, batch_format="numpy", num_cpus=0.1)
    return ds


@cache
def _chat_processor(model: str, revision: str | None):
    """The model's processor, once per worker process (Ray reuses task workers), for its chat template and image
    grid. An s3:// model's weights stay in S3: these CPU workers fetch its other files only, once per node."""
    from transformers import AutoProcessor

    from unifer_ray.models.model_dir import local_model_dir

    return AutoProcessor.from_pretrained(local_model_dir(model, revision=revision, weights=False),
                                         local_files_only=True)


def at_model_grid(image: np.ndarray, image_processor) -> np.ndarray:
    """`image` (uint8 H×W×3) resized exactly as the model's image processor resizes it inside vLLM.

    Qwen2-VL's processor scales each image to a multiple of its patch grid within its pixel budget (the tiny model:
    224² → 112²). Done here, in a CPU stage beside the engines, the engine's processor finds the image at its target
    size and leaves it untouched (torchvision returns such an image as it is), with the very pixels it would have
    made itself. Other processors get the image as it is."""
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor

    if not isinstance(image_processor, Qwen2VLImageProcessor):
        return image
    import torch

    chw = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).contiguous()[None]
    resized = image_processor.resize(chw, size=image_processor.size, resample=image_processor.resample,
                                     factor=image_processor.patch_size * image_processor.merge_size)
    return resized[0].permute(1, 2, 0).numpy()


def image_uuid(image: np.ndarray) -> str:
    """A content id of an image for vLLM's multi-modal caches. Given one, the engine's front end does not hash the
    image itself; it keys the encoder and prefix caches, so it must name the pixels, not the row."""
    digest = hashlib.blake2b(str(image.shape).encode(), digest_size=16)
    digest.update(np.ascontiguousarray(image).data)
    return digest.hexdigest()


def vllm_requests(batch: dict[str, np.ndarray], *, model: str, revision: str | None = None, sampling: dict,
                  renderer=None) -> dict[str, np.ndarray]:
    """Rows → vLLM requests, n rows per row for n samples, each with its `sampling_params`.

    Without a renderer, ray.data.llm's request columns: `tokenized_prompt` (the chat text's tokens), `multimodal_data`
    (the image at the model's grid) and `multimodal_uuids`; the engine's front end then neither tokenizes, resizes nor
    hashes, and what is left of its per-image work is the processor's patchify. With the engine's own renderer
    (`engine_renderer`), `engine_input`: the request as the engine's renderer makes it (tokens with the image's
    placeholders, the patchified pixels, content hashes), so nothing of the request is left for the engine's process.

    A row that already failed stays in the stream (a Ray Data stream cannot set rows aside and add them back without
    computing its source twice). Rendered, it has no `engine_input`, and one the renderer refuses (a prompt longer
    than the context) fails here with the renderer's reason; for ray.data.llm's stage it asks one token of its text
    alone, and the output stage keeps its error.
    """
    params = SamplingParams.model_validate(sampling)
    processor = _chat_processor(model, revision)
    rows = {k: v for k, v in batch.items() if k not in ("image", "prompt")}
    errors = np.array(batch["error"], dtype=object)
    request_columns = ["engine_input"] if renderer is not None else ["tokenized_prompt", "multimodal_data",
                                                                    "multimodal_uuids"]
    out: dict[str, list] = {k: [] for k in [*rows, *request_columns, "sampling_params", "sample"]}
    prompts: dict[tuple[str, bool], list[int]] = {}  # a benchmark asks one question per dataset: tokenized once
    for i, question in enumerate(batch["prompt"]):
        failed = bool(errors[i])
        if (str(question), failed) not in prompts:
            prompts[str(question), failed] = chat_tokens(processor, str(question), with_image=not failed)
        tokens = prompts[str(question), failed]
        image = None if failed else at_model_grid(batch["image"][i], processor.image_processor)
        if renderer is None:
            request = {"tokenized_prompt": tokens, "multimodal_data": None if failed else {"image": [image]},
                       "multimodal_uuids": None if failed else {"image": [image_uuid(image)]}}
        else:
            engine_input = None
            if not failed:
                engine_input, errors[i] = rendered(renderer, tokens, image)
                failed = bool(errors[i])
            request = {"engine_input": engine_input}
        for k in range(params.n):
            for key, column in rows.items():
                out[key].append(errors[i] if key == "error" else column[i])
            for key, value in request.items():
                out[key].append(value)
            out["sampling_params"].append({
                "temperature": params.temperature, "top_p": params.top_p,
                "max_tokens": 1 if failed else params.max_new_tokens,
                "seed": None if params.seed is None else params.seed + k,
            })
            out["sample"].append(k)
    return {k: object_array(v) for k, v in out.items()}


def engine_renderer(model: str, engine_kwargs: dict):
    """vLLM's renderer for an engine of `model` with `engine_kwargs`: the part of the engine that turns a prompt into
    its request (tokens, the multi-modal processor's output, content hashes), without the engine.

    Its multi-modal cache stays off (`rendered`): with it, a request may leave out an item the renderer has sent
    before, for the engine's own cache to fill in, and this renderer's engine is another process's."""
    from vllm.engine.arg_utils import EngineArgs
    from vllm.renderers import renderer_from_config

    return renderer_from_config(EngineArgs(model=model, **engine_kwargs).create_engine_config())


def rendered(renderer, token_ids: list[int], image: np.ndarray) -> tuple[object | None, str]:
    """One image request as the engine's renderer makes it (vLLM's `EngineInput`), or its error (a prompt longer than
    the context)."""
    from vllm.exceptions import VLLMClientError

    prompt = {"prompt_token_ids": token_ids, "multi_modal_data": {"image": [image]},
              "multi_modal_uuids": {"image": [image_uuid(image)]}}
    try:
        (engine_input,) = renderer.render_cmpl([prompt], skip_mm_cache=True)
    except (ValueError, VLLMClientError) as exc:
        return None, f"generation: {type(exc).__name__}: {exc}"
    return engine_input, ""


def pickled_request(request: object) -> bytes:
    """`request` pickled with its CPU tensors as numpy arrays (`TensorsAsArrays`); plain `pickle.loads` reads it."""
    buffer = io.BytesIO()
    TensorsAsArrays(buffer, protocol=pickle.HIGHEST_PROTOCOL).dump(request)
    return buffer.getvalue()


class TensorsAsArrays(pickle.Pickler):
    """Pickles each CPU tensor that numpy can hold as its array, rebuilt by `torch.from_numpy`. Torch's own pickling
    writes a tensor's whole storage with torch.save and reads it back with torch.load: a rendered request took 0.12 ms
    to write and 0.12-0.15 to read that way, 0.04-0.07 and 0.03 this way, and the reading is the engine's, between
    its model's steps (benchmarks/bench_throughput.py). Other tensors (bfloat16, on GPUs, needing grad) keep torch's
    own."""

    def __init__(self, *args, **kwargs):
        import torch

        super().__init__(*args, **kwargs)
        self.tensor, self.from_numpy = torch.Tensor, torch.from_numpy

    def reducer_override(self, obj):
        if type(obj) is not self.tensor or obj.device.type != "cpu" or obj.requires_grad:
            return NotImplemented
        try:
            return self.from_numpy, (obj.numpy(),)
        except (TypeError, RuntimeError):  # a dtype that numpy lacks (bfloat16, float8), a conjugated view
            return NotImplemented


class VLLMRequests:
    """The request stage as an actor: `vllm_requests` with the model's processor (and, for an engine in one process,
    the engine's renderer) loaded at start."""

    def __init__(self, *, model: str, revision: str | None, sampling: dict, engine_kwargs: dict | None = None):
        self.kwargs = {"model": model, "revision": revision, "sampling": sampling}
        _chat_processor(model, revision)
        if engine_kwargs is not None:
            self.kwargs["renderer"] = engine_renderer(model, engine_kwargs)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        requests = vllm_requests(batch, **self.kwargs)
        if "engine_input" in requests:  # for the engine's process: Ray Data would pickle them with cloudpickle, slower
            column = requests["engine_input"]  # a row's n samples share one request: pickled once
            pickled = {id(request): pickled_request(request) for request in column if request is not None}
            requests["engine_input"] = object_array([None if r is None else pickled[id(r)] for r in column])
        return requests


class OneProcessVLLM:
    """The engine stage of a CPU engine of one rank: one vLLM engine inside this actor's process, given a call's
    rendered requests (`batch_size` x `max_concurrent_batches` rows) at once, returning the columns of
    ray.data.llm's engine stage that `vllm_outputs` reads.

    ray.data.llm's engine stage holds an AsyncLLM, whose engine core always runs in a process of its own: on CPUs two
    busy processes per engine (its front end and its core, spinning while they wait for each other), which reached
    52-58% of one engine's items/s on 2 cores (docs/throughput.md). In one process the engine does all of its work
    on one core, and ends with its actor. Given `request_kwargs` (those of `vllm_requests`), it takes the decoded rows
    and renders them with its own renderer, handing the rendered requests to its engine as they are; otherwise
    (`render_ahead`) a request actor beside it has rendered them with the same renderer (`engine_renderer`) and
    pickled them, and the engine only schedules, runs the model and detokenizes. A request the engine refuses fails
    alone."""

    def __init__(self, *, model: str, engine_kwargs: dict, request_kwargs: dict | None = None):
        import vllm

        with vllm_env_applied(one_process=True):
            self.llm = vllm.LLM(model=model, **engine_kwargs)
        self.calls = itertools.count()
        self.request_kwargs = request_kwargs
        if request_kwargs is not None:
            _chat_processor(request_kwargs["model"], request_kwargs["revision"])

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from vllm.exceptions import VLLMClientError

        renders_here = self.request_kwargs is not None  # else a request actor rendered and pickled the rows
        if renders_here:
            batch = vllm_requests(batch, **self.request_kwargs, renderer=self.llm.renderer)
        n = len(batch["id"])
        texts, tokens, errors = [""] * n, [0] * n, [""] * n
        engine, call, rows = self.llm.llm_engine, next(self.calls), {}
        start = time.perf_counter()
        for i, (request, params) in enumerate(zip(batch["engine_input"], self._params(batch["sampling_params"]))):
            if request is None:  # failed before the engine: the row carries its error
                continue
            request_id = f"{call}-{i}"
            try:
                engine.add_request(request_id, request if renders_here else pickle.loads(request), params)
                rows[request_id] = i
            except (ValueError, VLLMClientError) as exc:
                errors[i] = f"{type(exc).__name__}: {exc}"
        while engine.has_unfinished_requests():
            for output in engine.step():
                if output.finished:
                    i = rows[output.request_id]
                    texts[i], tokens[i] = output.outputs[0].text, len(output.outputs[0].token_ids)
        elapsed = time.perf_counter() - start
        # The call's time per row: what an item costs at this many requests in flight.
        kept = {k: v for k, v in batch.items() if k not in ("engine_input", "sampling_params")}
        return kept | {"generated_text": object_array(texts), "num_generated_tokens": np.array(tokens),
                       "time_taken_llm": np.full(n, elapsed / max(n, 1)), "__inference_error__": object_array(errors)}

    @staticmethod
    def _params(column: np.ndarray) -> Iterator:
        """vLLM's sampling parameters of each row, one object per distinct setting (the engine copies them), and the
        final output only, as vLLM's LLM asks: nothing reads the partial ones."""
        import vllm
        from vllm.sampling_params import RequestOutputKind

        made: dict[tuple, object] = {}
        for params in column:
            key = tuple(sorted(params.items()))
            if key not in made:
                made[key] = vllm.SamplingParams(**params, output_kind=RequestOutputKind.FINAL_ONLY)
            yield made[key]


def chat_tokens(processor, question: str, *, with_image: bool) -> list[int]:
    """The token ids of one user turn's chat text (an image placeholder first when `with_image`), ending with the
    opened assistant turn. The chat template has written the special tokens already, so none are added."""
    from unifer_ray.engines.hf import chat_text

    text = {"type": "text", "text": question}
    content = [{"type": "image"}, text] if with_image else [text]
    chat = chat_text(processor, ChatRequest([{"role": "user", "content": content}]))
    return processor.tokenizer(chat, add_special_tokens=False)["input_ids"]


def vllm_outputs(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The engine stage's rows → ours: `responses`, `num_tokens`, `latency_s` (the request's time in the engine,
    which continuous batching shares with the requests beside it), `error`."""
    n = len(batch["id"])
    errors = np.array(batch["error"], dtype=object)
    failed = batch["__inference_error__"]
    texts = batch["generated_text"]
    for i in range(n):
        if not errors[i] and failed[i]:
            errors[i] = f"generation: {failed[i]}"
    ok = [not errors[i] for i in range(n)]
    out = {k: v for k, v in batch.items() if k not in VLLM_OUTPUT_COLUMNS and k != "prompt"}
    out["responses"] = object_array([[str(texts[i])] if ok[i] else [] for i in range(n)])
    out["num_tokens"] = np.array([int(batch["num_generated_tokens"][i]) if ok[i] else 0 for i in range(n)],
                                 dtype=np.int64)
    out["latency_s"] = np.array([float(batch["time_taken_llm"][i]) if ok[i] else 0.0 for i in range(n)])
    out["error"] = errors
    return out


def gather_samples(group: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The n sample rows of one id → one row: responses in sample order, tokens summed, the first error kept."""
    order = np.argsort(group["sample"])
    errors = [str(e) for e in group["error"][order] if e]
    first = order[0]
    per_sample = ("sample", "responses", "num_tokens", "latency_s", "error")
    out = {k: v[first : first + 1] for k, v in group.items() if k not in per_sample}
    out["responses"] = object_array([[] if errors else [r[0] for r in group["responses"][order]]])
    out["num_tokens"] = np.array([int(group["num_tokens"].sum())])
    out["latency_s"] = np.array([float(group["latency_s"].max())])
    out["error"] = np.array([errors[0] if errors else ""], dtype=object)
    return out

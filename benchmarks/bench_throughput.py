"""FERBench throughput on the tiny model, four ways in one process on the same items: the reference loop, the
transformers engine path, the vLLM path and one bare vLLM engine; then where the vLLM path's time goes.

- Reference: what the paper's inference scripts do, one item at a time: read the image, resize it, apply the chat
  template, `model.generate` with batch 1 (fp32), decode; one torch thread (its fastest setting on 2 cores).
- transformers path: `bench.runner.run_model` with engine `hf`: a decode/resize stage and a pool of batched hf engine
  actors (two: a core each) streaming through Ray Data, then parse/score and Parquet shards.
- vLLM path: the same runner with engine `vllm`: the decode/resize stage, the engine stage (on CPUs `vllm.LLM` in a
  Ray Data actor's process, given batch_size x max_concurrent_batches rows a call, rendering them with its own
  renderer: chat template and tokens, image at the model's grid, the processor's patches), then parse/score and
  Parquet. Engines and batches in flight are sized from the cluster and the run's length
  (`engines.batch.sized_workers`: on CPUs an engine per CPU but one, one per 2,048 items at most), as a user's run
  gets them, and an engine that sees at least 8,192 items runs vLLM's compiled model
  (`engines.batch.compiled_for_long_runs`): FERBench's 11,072 items, the default here, run eager on 2 engines.
- Bare engine: one `vllm.LLM` in this process with the same engine settings, given all items at once as the images
  decoded at 224 px and the chat text: the engine's own speed, without decoding the images (done beforehand and not
  counted) and without Ray. Twice: in vLLM's own processes (its default: an engine core and a model worker beside
  the front end) and in one process (the path's engine stage, `OneProcessVLLM`, called without Ray); the faster is
  the bar.
Each Ray Data time runs from the start of the dataset to the last shard written, so it includes starting its engines
(hf actors: imports and model loading; vLLM: engine processes, model loading, KV cache). It excludes what a long-lived
cluster has already done, as the reference's time excludes its imports and model loading: `ray.init` and Ray Data's
one-off helper actors. Engine start-up is a fixed cost, so ratios grow with the number of items; each path's start-up
is measured apart (a run of one batch; the bare engine: constructing `vllm.LLM`) and the rate without it printed too.
A compiled engine's start-up is measured with torch's compile cache filled (a first one-batch run fills it, as an
earlier run of the model on the machine would have). Same model, same items, greedy decoding with the same
max_new_tokens. The vLLM path's responses must equal the bare engine's item for item (asserted); both are compared
with the reference too (the hf path matches it exactly; vLLM's float32 kernels round differently, and a random-init
model's near-flat next-token distribution turns that into different tokens at near-ties).

The breakdown: each CPU step in front of the engine timed alone in this process, per item; the bare engine again on
the images at the model's grid with content ids (the requests that ray.data.llm's engine stage gets: what vLLM's
front end still does per image), on the chat text alone (no image: its model and scheduling, text only) and, in one
process, on the path's rendered requests (what the path's engine stage does per item); each path's CPU by process
(engine, request actor, Ray Data's tasks, the driver, Ray's own processes) over its run, and the items/s that its
CPU per item allows on this machine's cores; and Ray Data's own per-operator stats of the vLLM path's run.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np
import psutil
import ray
import torch

from unifer_ray.bench.config import BenchConfig, BenchFile, BenchModel
from unifer_ray.bench.items import ItemRows
from unifer_ray.bench.runner import ModelRun, read_all_items, run_model
from unifer_ray.data.convert import convert_ferbench
from unifer_ray.data.images import load_image
from unifer_ray.data.synthetic import write_synthetic_datasets
from unifer_ray.engines.base import ChatRequest
from unifer_ray.engines.batch import (
    COMPILE_FROM_REQUESTS,
    OneProcessVLLM,
    compiled_for_long_runs,
    engine_renderer,
    pickled_request,
    sized_workers,
    vllm_engine_kwargs,
    vllm_requests,
)
from unifer_ray.engines.hf import chat_text
from unifer_ray.engines.spec import EngineSpec
from unifer_ray.engines.vllm_env import vllm_env_applied
from unifer_ray.labels import DATASETS
from unifer_ray.models.loading import load_model_and_processor
from unifer_ray.models.tiny import build_tiny_model
from unifer_ray.ray_runtime import init_ray
from unifer_ray.records import object_array

CLASSES = 30  # the four synthetic datasets have 7 + 8 + 8 + 7 classes
IMAGE_TAG = "<|vision_start|><|image_pad|><|vision_end|>"  # the tiny model's image placeholder in the chat text


def one_at_a_time(model_dir: Path, items: list[dict], image_size: int, max_new_tokens: int,
                  threads: int) -> tuple[float, list[str], int]:
    """Seconds, responses and new tokens of the reference loop."""
    torch.set_num_threads(threads)
    model, processor = load_model_and_processor(model_dir)
    responses, new_tokens = [], 0
    start = time.perf_counter()
    for item in items:
        image = load_image(item["image_uri"], image_size)
        content = [{"type": "image", "image": image}, {"type": "text", "text": item["prompt"]}]
        messages = [{"role": "user", "content": content}]
        text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        inputs = processor(text=[text], images=[image], return_tensors="pt")
        with torch.inference_mode():
            out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        tokens = out[:, inputs["input_ids"].shape[1]:]
        new_tokens += tokens.shape[1]
        responses.append(processor.batch_decode(tokens, skip_special_tokens=True)[0])
    return time.perf_counter() - start, responses, new_tokens


class Identity:
    def __call__(self, batch: dict) -> dict:
        return batch


def load_average() -> str:
    return "load average {:.1f} {:.1f} {:.1f}".format(*os.getloadavg())


def bench_model(name: str, engine: EngineSpec, args, **workers) -> BenchModel:
    return BenchModel(name=name, engine=engine, sampling={"max_new_tokens": args.max_new_tokens},
                      image_size=args.image_size, batch_size=args.batch_size, num_cpus=1, torch_threads=1, **workers)


# Who a process of the local cluster is, by the titles Ray gives its workers (ray::MapWorker(MapBatches(Cls)) for
# an actor stage, ray::MapBatches(fn) for a task): the first role whose mark one of its titles has.
ROLES = (("OneProcessVLLM", "engine actor (vLLM)"), ("EngineActor", "engine actors (transformers)"),
         ("VLLMRequests", "request actor"), ("MapBatches(", "Ray Data's tasks (decode, outputs, score and write)"))


SAMPLE_S = 0.5


class CPUByProcess:
    """CPU seconds of this process and its descendants (the local Ray cluster: raylet, GCS, workers) while the
    block runs, by role. Sampled every SAMPLE_S (a sample costs this process 2-4 ms), so a worker that exits keeps
    its last sample: at most SAMPLE_S of its CPU is missed."""

    def __init__(self) -> None:
        self.driver = psutil.Process()
        self.titles: dict[int, set[str]] = defaultdict(set)
        self.last: dict[int, float] = {}
        self.start = self._sample()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> dict[int, float]:
        seconds = {}
        for process in [self.driver, *self.driver.children(recursive=True)]:
            try:
                times = process.cpu_times()
                title = (process.cmdline() or [""])[0]
            except psutil.Error:
                continue
            seconds[process.pid] = times.user + times.system
            self.titles[process.pid].add(title)
        return seconds

    def _run(self) -> None:
        while not self.stop.wait(SAMPLE_S):
            self.last.update(self._sample())

    def __enter__(self) -> CPUByProcess:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()
        self.last.update(self._sample())

    def by_role(self) -> dict[str, float]:
        roles: dict[str, float] = defaultdict(float)
        for pid, seconds in self.last.items():
            titles = " ".join(self.titles[pid])
            role = "driver (Ray Data's executor)" if pid == self.driver.pid else next(
                (name for mark, name in ROLES if mark in titles), "Ray's own processes (raylet, GCS, helpers)")
            roles[role] += seconds - self.start.get(pid, 0.0)
        return dict(roles)


def ray_data_path(model: BenchModel, items: ItemRows, config: BenchConfig) -> tuple[ModelRun, float, dict]:
    """The run over every item, the seconds of a one-batch run (the path's fixed start-up and one batch) and the
    run's CPU seconds by process role. A compiled engine's first one-batch run fills torch's compile cache, as any
    earlier run of the model on this machine would have; the start-up is the second's."""
    one_batch = ItemRows(rows=items.rows[: model.batch_size])
    runs = 2 if model.engine.vllm_kwargs.get("enforce_eager") is False else 1
    for attempt in range(runs):
        startup = run_model(model.model_copy(update={"name": f"{model.name}-startup{attempt}"}), one_batch,
                            config).seconds
    print(f"{model.name} starts, {load_average()}", flush=True)
    with CPUByProcess() as cpu:
        run = run_model(model, items, config)
    print(f"{model.name} done, {load_average()}", flush=True)
    return run, startup, cpu.by_role()


def print_cpu(label: str, cpu: dict[str, float], seconds: float, n: int) -> None:
    """Where a path's CPU went, and the items/s that its CPU per item, start-up included, allows on this machine's
    cores: a path near 100% of the cores' time is bound by its CPU, not by waiting."""
    total, cores = sum(cpu.values()), os.cpu_count() or 1
    print(f"\nCPU by process over the {label}'s run ({seconds:.1f} s on {cores} cores; start-up included):")
    for role, used in sorted(cpu.items(), key=lambda item: -item[1]):
        print(f"  {role}: {used:.1f} s ({1e3 * used / n:.2f} ms an item)")
    print(f"  all: {total:.1f} s, {total / (cores * seconds):.0%} of the cores' time ({1e3 * total / n:.2f} ms of CPU "
          f"an item: {n * cores / total:.0f} items/s if the cores did nothing else)")


def responses_of(run: ModelRun, items: ItemRows) -> list[str]:
    rows = {row["id"]: row for row in map(json.loads, open(run.results_path))}
    n = len(items.rows)
    assert run.generated == n and len(rows) == n, f"{run.model} scored {len(rows)} of {n} items ({run.errors} errors)"
    return [rows[item["id"]]["response"] for item in items.rows]


def rates(label: str, seconds: float, startup: float, n: int, base_rate: float, *, steady_s: float | None = None
          ) -> float:
    """Print a path's items/s with and without start-up; returns the rate without it."""
    steady = n / (steady_s if steady_s is not None else max(seconds - startup, 1e-9))
    print(f"{label}: {n / seconds:8.2f} items/s ({seconds:.1f}s incl. {startup:.1f}s start-up), "
          f"{steady:8.2f} items/s without it; {n / seconds / base_rate:.2f}x / {steady / base_rate:.2f}x the reference")
    return steady


def same(a: list[str], b: list[str]) -> str:
    return f"{sum(x == y for x, y in zip(a, b))}/{len(a)}"


def engine_inputs(model_dir: Path, engine: EngineSpec, workers: BenchModel, items: ItemRows, image_size: int,
                  max_new_tokens: int) -> dict:
    """What the bare engines are given, and the per-item seconds of the CPU steps in front of an engine: the images
    decoded at `image_size`, the chat texts, the vLLM path's requests for ray.data.llm's engine stage (token ids,
    images at the model's grid, content ids) and for its engine in one process (rendered by the engine's renderer)."""
    from transformers import AutoProcessor

    rows, sampling = items.rows, {"max_new_tokens": max_new_tokens}
    seconds: dict[str, float] = {}
    start = time.perf_counter()
    images = [load_image(row["image_uri"], image_size) for row in rows]
    seconds["decode"] = time.perf_counter() - start
    processor = AutoProcessor.from_pretrained(model_dir, local_files_only=True)
    start = time.perf_counter()
    texts = [chat_text(processor, ChatRequest([{"role": "user", "content": [
        {"type": "image"}, {"type": "text", "text": row["prompt"]}]}])) for row in rows]
    seconds["template"] = time.perf_counter() - start
    renderer = engine_renderer(str(model_dir), vllm_engine_kwargs(engine, workers))
    batches = [{"id": np.array([row["id"] for row in rows[i : i + workers.batch_size]], dtype=object),
                "prompt": np.array([row["prompt"] for row in rows[i : i + workers.batch_size]], dtype=object),
                "image": np.stack([np.asarray(image) for image in images[i : i + workers.batch_size]]),
                "error": np.full(len(rows[i : i + workers.batch_size]), "", dtype=object)}
               for i in range(0, len(rows), workers.batch_size)]
    requests: dict[str, dict[str, list]] = {"request_stage": {}, "rendering_request_stage": {}}
    for stage, kwargs in (("request_stage", {}), ("rendering_request_stage", {"renderer": renderer})):
        vllm_requests(batches[0], model=str(model_dir), sampling=sampling, **kwargs)  # loads the processor
        start = time.perf_counter()
        for batch in batches:
            for key, column in vllm_requests(batch, model=str(model_dir), sampling=sampling, **kwargs).items():
                requests[stage].setdefault(key, []).extend(column)
        seconds[stage] = time.perf_counter() - start
    seconds |= pickling_seconds(requests["rendering_request_stage"]["engine_input"])
    return {"seconds": seconds, "images": images, "texts": texts, "requests": requests["request_stage"],
            "rendered": requests["rendering_request_stage"]}


def pickling_seconds(requests: list) -> dict[str, float]:
    """Seconds to pickle the rendered requests and to read them back (what the engine stage does before adding each),
    with torch's own pickling of tensors and with the request stage's (`pickled_request`)."""
    seconds = {}
    for way, dumps in (("torch", lambda r: pickle.dumps(r, protocol=pickle.HIGHEST_PROTOCOL)),
                       ("ours", pickled_request)):
        start = time.perf_counter()
        pickled = [dumps(request) for request in requests]
        seconds[f"pickle_{way}"] = time.perf_counter() - start
        start = time.perf_counter()
        for data in pickled:
            pickle.loads(data)
        seconds[f"unpickle_{way}"] = time.perf_counter() - start
    return seconds


def bare_engines(model_dir: Path, engine: EngineSpec, workers: BenchModel, inputs: dict,
                 max_new_tokens: int) -> dict:
    """One vLLM engine in this process with the engine stage's settings, twice: in vLLM's own processes (an engine
    core and a model worker beside this front end: `vllm.LLM`'s default) and in this process alone (the vLLM path's
    engine stage, OneProcessVLLM, called here without Ray). Start-up, and the seconds and responses of each request
    form: the decoded images, the vLLM path's requests for ray.data.llm's stage, the chat text alone; in one process
    the images and the path's rendered requests, in calls of the stage's size."""
    import vllm

    seconds, responses = {}, {}
    params = vllm.SamplingParams(max_tokens=max_new_tokens, temperature=0.0)
    requests, n = inputs["requests"], len(inputs["texts"])
    images = [{"prompt": text, "multi_modal_data": {"image": image}}
              for text, image in zip(inputs["texts"], inputs["images"])]
    forms = {
        "images": images,
        "requests": [{"prompt_token_ids": requests["tokenized_prompt"][i],
                      "multi_modal_data": requests["multimodal_data"][i],
                      "multi_modal_uuids": requests["multimodal_uuids"][i]} for i in range(n)],
        "text": [{"prompt": text.replace(IMAGE_TAG, "")} for text in inputs["texts"]],
    }

    def generated(name: str, llm, prompts: list[dict]) -> None:
        start = time.perf_counter()
        outputs = llm.generate(prompts, params, use_tqdm=False)
        seconds[name] = time.perf_counter() - start
        responses[name] = [output.outputs[0].text for output in outputs]

    start = time.perf_counter()
    with vllm_env_applied(one_process=False):
        llm = vllm.LLM(model=str(model_dir), **vllm_engine_kwargs(engine, workers))
    seconds["startup"] = time.perf_counter() - start
    llm.generate(forms["text"][:8], params, use_tqdm=False)  # first-call costs out of the timings
    for form, prompts in forms.items():
        generated(form, llm, prompts)
    llm.llm_engine.engine_core.shutdown()

    start = time.perf_counter()
    stage = OneProcessVLLM(model=str(model_dir), engine_kwargs=vllm_engine_kwargs(engine, workers))
    seconds["one_process_startup"] = time.perf_counter() - start
    stage.llm.generate(forms["text"][:8], params, use_tqdm=False)
    generated("one_process_images", stage.llm, images)
    call = workers.batch_size * workers.max_concurrent_batches
    columns = {k: object_array(v) for k, v in inputs["rendered"].items()}
    # As a request actor hands them over (render_ahead); a stage that renders its rows skips this 0.03 ms an item.
    columns["engine_input"] = object_array([None if r is None else pickled_request(r) for r in columns["engine_input"]])
    start = time.perf_counter()
    calls = [stage({k: v[i : i + call] for k, v in columns.items()}) for i in range(0, n, call)]
    seconds["one_process_rendered"] = time.perf_counter() - start
    responses["one_process_rendered"] = [text for out in calls for text in out["generated_text"]]
    stage.llm.llm_engine.engine_core.shutdown()
    return {"seconds": seconds, "responses": responses}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, default=11072, help="default: FERBench's size")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=64, help="rows per engine call (vLLM: per batch in flight)")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--baseline-threads", type=int, default=1)
    parser.add_argument("--hf-actors", type=int, default=2, help="transformers path: actors, a core each")
    parser.add_argument("--vllm-engines", type=int, default=None,
                        help="vLLM path: engines (default: sized on the cluster and the items, as a user's run)")
    parser.add_argument("--render-ahead", action="store_true",
                        help="vLLM path: requests rendered by a request actor beside each engine, not by the engine")
    parser.add_argument("--vllm-kwargs", type=json.loads, default={},
                        help='JSON of vLLM engine arguments for the vLLM path and the bare engines, e.g. '
                             '\'{"enforce_eager": true}\' (eager: what runs shorter than '
                             f'{COMPILE_FROM_REQUESTS} items get on CPUs)')
    parser.add_argument("--cpus", type=int, default=(os.cpu_count() or 2) + 1,
                        help="the local Ray cluster's CPUs (default: the cores and one more, for the light stages)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        write_synthetic_datasets(tmp / "data", train_per_class=1, test_per_class=args.items // CLASSES + 1, seed=0)
        model_dir = build_tiny_model(tmp / "tiny", seed=0)
        files = []
        for spec in DATASETS.values():
            convert_ferbench(spec.key, tmp / "data" / spec.name, tmp / spec.ferbench_file)
            files.append(BenchFile(path=str(tmp / spec.ferbench_file), image_root=str(tmp / "data")))
        hf = bench_model("hf", EngineSpec(engine="hf", model=str(model_dir), max_batch_size=args.batch_size), args,
                         concurrency=args.hf_actors)
        vllm = bench_model("vllm", EngineSpec(engine="vllm", model=str(model_dir),
                                              vllm_kwargs={"max_model_len": 1024, **args.vllm_kwargs}), args,
                           concurrency=args.vllm_engines, render_ahead=args.render_ahead)
        config = BenchConfig(files=files, models=[hf], out_dir=str(tmp / "out"))
        items = read_all_items(config)
        items.rows = items.rows[: args.items]
        n = len(items.rows)
        print(f"items: {n} (4 datasets), image {args.image_size}px, greedy, max {args.max_new_tokens} new tokens; "
              f"{os.cpu_count()} cores, a Ray cluster of {args.cpus} CPUs")

        print(f"reference starts, {load_average()}", flush=True)
        base_s, base_responses, base_tokens = one_at_a_time(
            model_dir, items.rows, args.image_size, args.max_new_tokens, args.baseline_threads)
        print(f"reference done, {load_average()}", flush=True)
        base_rate = n / base_s

        init_ray(num_cpus=args.cpus)
        hf, vllm = sized_workers(hf, hf.engine, n), sized_workers(vllm, vllm.engine, n)
        # What the path's run of n items decides (compiled or eager), written out: its one-batch start-up run and the
        # bare engines get the same engine.
        vllm = vllm.model_copy(update={"engine": compiled_for_long_runs(vllm.engine, vllm, n)})
        eager = vllm.engine.vllm_kwargs.get("enforce_eager", True)
        print(f"vLLM engines: {'eager' if eager else 'compiled (torch.compile)'} for {n} items", flush=True)
        # Warm-up: one row through a one-actor pool starts Ray Data's cluster-wide helper actors.
        ray.data.range(1).map_batches(Identity, compute=ray.data.ActorPoolStrategy(size=1)).materialize()
        hf_run, hf_startup, hf_cpu = ray_data_path(hf, items, config)
        vllm_run, vllm_startup, vllm_cpu = ray_data_path(vllm, items, config)
        ray.shutdown()  # the bare engines get the machine to themselves, once the cluster's processes have ended
        psutil.wait_procs(psutil.Process().children(recursive=True), timeout=60)
        print(f"bare engines start, {load_average()}", flush=True)
        inputs = engine_inputs(model_dir, vllm.engine, vllm, items, args.image_size, args.max_new_tokens)
        bare = bare_engines(model_dir, vllm.engine, vllm, inputs, args.max_new_tokens)
        print(f"bare engines done, {load_average()}", flush=True)
        seconds, bare_responses = inputs["seconds"] | bare["seconds"], bare["responses"]
        hf_responses, vllm_responses = responses_of(hf_run, items), responses_of(vllm_run, items)

        print(f"\nreference (model.generate, batch 1, {args.baseline_threads} torch thread): {base_rate:8.2f} items/s "
              f"({base_s:.1f}s, {base_tokens} new tokens)")
        rates(f"transformers path ({hf.concurrency} hf actors x batch {hf.batch_size})", hf_run.seconds, hf_startup,
              n, base_rate)
        path = rates(f"vLLM path ({vllm.concurrency} engine(s), {vllm.max_concurrent_batches} batches of "
                     f"{vllm.batch_size} in flight each)", vllm_run.seconds, vllm_startup, n, base_rate)
        engines = {
            "vLLM's own processes": rates(
                "bare vLLM engine (one vllm.LLM in vLLM's own processes, no Ray, images decoded beforehand)",
                seconds["startup"] + seconds["images"], seconds["startup"], n, base_rate, steady_s=seconds["images"]),
            "one process": rates(
                "bare vLLM engine in one process (the path's engine stage without Ray, images decoded beforehand)",
                seconds["one_process_startup"] + seconds["one_process_images"], seconds["one_process_startup"], n,
                base_rate, steady_s=seconds["one_process_images"]),
        }
        bar, engine = max((rate, layout) for layout, rate in engines.items())
        with_startup = min(seconds["startup"] + seconds["images"],
                           seconds["one_process_startup"] + seconds["one_process_images"])
        print(f"vLLM path: {path / bar:.1%} of the faster bare engine's items/s without start-up ({engine}; "
              + "; ".join(f"{path / rate:.1%} of {layout}" for layout, rate in engines.items())
              + f"), {vllm_run.seconds / with_startup:.2f}x its time with start-up; "
              f"{hf_run.seconds / vllm_run.seconds:.2f}x the transformers path with start-up")
        print(f"identical responses: vLLM path = bare engine {same(vllm_responses, bare_responses['images'])}; "
              f"bare engine on the path's requests {same(bare_responses['requests'], bare_responses['images'])}, "
              f"in one process on its images {same(bare_responses['one_process_images'], bare_responses['images'])} "
              f"and on the path's rendered requests "
              f"{same(bare_responses['one_process_rendered'], bare_responses['images'])}; "
              f"transformers path = reference {same(hf_responses, base_responses)}; "
              f"vLLM = reference {same(bare_responses['images'], base_responses)}")

        ms = {k: 1e3 * v / n for k, v in seconds.items()}
        print("\nwhere the time goes, ms per item (CPU steps: in this process, one core; engines: wall time):")
        print(f"  decode + resize to {args.image_size} px (the decode stage): {ms['decode']:.2f}")
        print(f"  chat template, every item: {ms['template']:.2f}")
        print(f"  request stage for ray.data.llm's engine stage (template and tokens once per question, image to the "
              f"model's grid, content id): {ms['request_stage']:.2f}; for the engine in one process (the same, "
              f"rendered by the engine's renderer): {ms['rendering_request_stage']:.2f}")
        print(f"  bare engine in vLLM's own processes, decoded {args.image_size} px images: {ms['images']:.2f}; the "
              f"path's requests for ray.data.llm (nothing left to tokenize, resize or hash): {ms['requests']:.2f}; "
              f"chat text alone: {ms['text']:.2f} (so per image in the engine, front end and vision tower: "
              f"{ms['images'] - ms['text']:.2f} and {ms['requests'] - ms['text']:.2f})")
        print(f"  a rendered request pickled in a request actor and read in the engine stage (--render-ahead): "
              f"torch's own pickling "
              f"{ms['pickle_torch']:.3f} and {ms['unpickle_torch']:.3f}, the request stage's (tensors as numpy arrays) "
              f"{ms['pickle_ours']:.3f} and {ms['unpickle_ours']:.3f} "
              f"({ms['unpickle_torch'] / ms['unpickle_ours']:.1f}x faster to read)")
        print(f"  bare engine in one process, decoded images: {ms['one_process_images']:.2f}; the path's rendered "
              f"requests: {ms['one_process_rendered']:.2f}")
        # The engine stage's own work: generating, and rendering where the engines render their rows (the default),
        # shared by its engines, which run side by side.
        own = ms["one_process_rendered"] + (0.0 if args.render_ahead else ms["rendering_request_stage"])
        print(f"  vLLM path without start-up: {1e3 / path:.2f} (its {vllm.concurrency} engine(s)' own work: "
              f"{own:.2f} an item on one core, {own / vllm.concurrency:.2f} side by side; Ray Data's stages and "
              f"transfers around them: {1e3 / path - own / vllm.concurrency:.2f})")
        print_cpu("transformers path", hf_cpu, hf_run.seconds, n)
        print_cpu("vLLM path", vllm_cpu, vllm_run.seconds, n)
        print(f"\nRay Data's stats of the vLLM path's run:\n{vllm_run.stats}")
        assert vllm_responses == bare_responses["images"], "the vLLM path's responses differ from the bare engine's"


if __name__ == "__main__":
    main()

"""FERBench throughput on the tiny model, three ways in one process: the reference loop, the transformers engine path
and the vLLM path.

- Reference: what the paper's inference scripts do, one item at a time: read the image, resize it, apply the chat
  template, `model.generate` with batch 1 (fp32), decode; one torch thread (its fastest setting on 2 cores).
- transformers path: `bench.runner.run_model` with engine `hf`: a decode/resize stage and a pool of batched hf engine
  actors streaming through Ray Data, then parse/score and Parquet shards.
- vLLM path: the same runner with engine `vllm`: the decode/resize stage, then ray.data.llm's vLLM processor (the CPU
  build; continuous batching over several batches in flight per engine), then parse/score and Parquet.
Each Ray Data time runs from the start of the dataset to the last shard written, so it includes starting its engines
(hf actors: imports and model loading; vLLM: engine processes, model loading, torch.compile from its cache, KV cache).
It excludes what a long-lived cluster has already done, as the reference's time excludes its imports and model
loading: `ray.init` and Ray Data's one-off helper actors. Engine start-up is a fixed cost, so ratios grow with the
number of items; each path's start-up is measured apart (a run of one batch) and the rate without it printed too.
Same model, same items, greedy decoding with the same max_new_tokens; the responses are compared item by item with
the reference (the hf path matches it exactly; vLLM's float32 kernels round differently, and a random-init model's
near-flat next-token distribution turns that into different tokens at near-ties).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import ray
import torch

from unifer_ray.bench.config import BenchConfig, BenchFile, BenchModel
from unifer_ray.bench.items import ItemRows
from unifer_ray.bench.runner import ModelRun, read_all_items, run_model
from unifer_ray.data.convert import convert_ferbench
from unifer_ray.data.images import load_image
from unifer_ray.data.synthetic import write_synthetic_datasets
from unifer_ray.engines.spec import EngineSpec
from unifer_ray.labels import DATASETS
from unifer_ray.models.loading import load_model_and_processor
from unifer_ray.models.tiny import build_tiny_model
from unifer_ray.ray_utils import init_ray

CLASSES = 30  # the four synthetic datasets have 7 + 8 + 8 + 7 classes


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


def ray_data_path(name: str, engine: EngineSpec, items: ItemRows, config: BenchConfig, args) -> tuple[ModelRun, float]:
    """The run over every item, and the seconds of a one-batch run (the path's fixed start-up and one batch)."""
    model = BenchModel(name=name, engine=engine, sampling={"max_new_tokens": args.max_new_tokens},
                       image_size=args.image_size, batch_size=args.batch_size, concurrency=args.concurrency,
                       num_cpus=1, torch_threads=1, max_concurrent_batches=args.batch_in_flight)
    one_batch = ItemRows(rows=items.rows[: args.batch_size])
    startup = run_model(model.model_copy(update={"name": f"{name}-startup"}), one_batch, config).seconds
    print(f"{name} starts, {load_average()}", flush=True)
    run = run_model(model, items, config)
    print(f"{name} done, {load_average()}", flush=True)
    return run, startup


def report(label: str, run: ModelRun, startup: float, n: int, base_rate: float, base_responses: list[str],
           items: ItemRows) -> None:
    rows = {row["id"]: row for row in map(json.loads, open(run.results_path))}
    assert run.generated == n and len(rows) == n, f"{label} scored {len(rows)} of {n} items ({run.errors} errors)"
    same = sum(rows[item["id"]]["response"] == text for item, text in zip(items.rows, base_responses))
    rate, steady = n / run.seconds, n / max(run.seconds - startup, 1e-9)
    print(f"{label}: {rate:8.2f} items/s ({run.seconds:.1f}s incl. start-up; one-batch run {startup:.1f}s; "
          f"{steady:.2f} items/s without it); {rate / base_rate:.2f}x the reference ({steady / base_rate:.2f}x "
          f"without start-up); identical responses {same}/{n}; engine {next(iter(rows.values()))['engine']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, default=4096)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=64, help="rows per engine call (vLLM: per batch in flight)")
    parser.add_argument("--batch-in-flight", type=int, default=4, help="vLLM: batches in flight per engine")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--baseline-threads", type=int, default=1)
    parser.add_argument("--concurrency", type=int, default=2, help="engines, one CPU and one thread each")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        write_synthetic_datasets(tmp / "data", train_per_class=1, test_per_class=args.items // CLASSES + 1, seed=0)
        model_dir = build_tiny_model(tmp / "tiny", seed=0)
        files = []
        for spec in DATASETS.values():
            convert_ferbench(spec.key, tmp / "data" / spec.name, tmp / spec.ferbench_file)
            files.append(BenchFile(path=str(tmp / spec.ferbench_file), image_root=str(tmp / "data")))
        hf = EngineSpec(engine="hf", model=str(model_dir), max_batch_size=args.batch_size)
        vllm = EngineSpec(engine="vllm", model=str(model_dir), vllm_kwargs={"max_model_len": 1024})
        config = BenchConfig(files=files, models=[BenchModel(name="tiny", engine=hf)], out_dir=str(tmp / "out"))
        items = read_all_items(config)
        items.rows = items.rows[: args.items]
        n = len(items.rows)
        print(f"items: {n} (4 datasets), image {args.image_size}px, greedy, max {args.max_new_tokens} new tokens")

        print(f"reference starts, {load_average()}", flush=True)
        base_s, base_responses, base_tokens = one_at_a_time(
            model_dir, items.rows, args.image_size, args.max_new_tokens, args.baseline_threads)
        print(f"reference done, {load_average()}", flush=True)
        base_rate = n / base_s

        init_ray(num_cpus=args.concurrency + 1)  # the engines' CPUs, and one for decoding, scoring, writing
        # Warm-up: one row through a one-actor pool starts Ray Data's cluster-wide helper actors.
        ray.data.range(1).map_batches(Identity, compute=ray.data.ActorPoolStrategy(size=1)).materialize()
        hf_run, hf_startup = ray_data_path("hf", hf, items, config, args)
        vllm_run, vllm_startup = ray_data_path("vllm", vllm, items, config, args)

        print(f"reference (model.generate, batch 1, {args.baseline_threads} torch thread): {base_rate:8.2f} items/s "
              f"({base_s:.1f}s, {base_tokens} new tokens)")
        report(f"transformers path ({args.concurrency} hf actors x batch {args.batch_size})", hf_run, hf_startup, n,
               base_rate, base_responses, items)
        report(f"vLLM path ({args.concurrency} engines, {args.batch_in_flight} batches of {args.batch_size} in flight "
               "each)", vllm_run, vllm_startup, n, base_rate, base_responses, items)
        print(f"vLLM path vs transformers path: {hf_run.seconds / vllm_run.seconds:.2f}x")


if __name__ == "__main__":
    main()

"""FERBench throughput on the tiny model: the reference way vs our Ray Data path, in one process.

Baseline: what the paper's inference scripts do — one item at a time: read the image, resize it, apply the chat
template, `model.generate` with batch 1, decode; one torch thread (its fastest setting on this 2-core machine:
two threads are slower, and far slower when other work shares the cores).
Ours: `bench.runner.run_model` — a decode/resize stage and a pool of batched engine actors streaming through
Ray Data, then parse/score and Parquet shards. Its time runs from the start of the dataset to the last shard
written, so it includes starting the engine actors (their imports of torch and transformers, model loading).
It excludes what a long-lived cluster has already done, as the baseline's time excludes its imports and model
loading: `ray.init` and Ray Data's one-off cluster-wide helper actors (started by a one-row warm-up).
Start-up is a fixed cost (about 6 CPU-seconds per engine actor), so the ratio grows with the number of items;
the default, 4096 items (about a third of FERBench's 11,072), amortises it.
Same model, same items, greedy decoding with the same max_new_tokens; the responses are compared item by item.
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
from unifer_ray.bench.runner import read_all_items, run_model
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
        messages = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": item["prompt"]}]}]
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, default=4096)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=64, help="rows per engine call")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--baseline-threads", type=int, default=1)
    parser.add_argument("--concurrency", type=int, default=2, help="engine actors, one CPU and one torch thread each")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        write_synthetic_datasets(tmp / "data", train_per_class=1, test_per_class=args.items // CLASSES + 1, seed=0)
        model_dir = build_tiny_model(tmp / "tiny", seed=0)
        files = []
        for spec in DATASETS.values():
            convert_ferbench(spec.key, tmp / "data" / spec.name, tmp / spec.ferbench_file)
            files.append(BenchFile(path=str(tmp / spec.ferbench_file), image_root=str(tmp / "data")))
        model = BenchModel(
            name="tiny", engine=EngineSpec(engine="hf", model=str(model_dir), max_batch_size=args.batch_size),
            sampling={"max_new_tokens": args.max_new_tokens}, image_size=args.image_size,
            batch_size=args.batch_size, concurrency=args.concurrency, num_cpus=1, torch_threads=1,
        )
        config = BenchConfig(files=files, models=[model], out_dir=str(tmp / "out"))
        items = read_all_items(config)
        items.rows = items.rows[: args.items]
        n = len(items.rows)
        print(f"items: {n} (4 datasets), image {args.image_size}px, greedy, max {args.max_new_tokens} new tokens")

        print(f"baseline starts, {load_average()}", flush=True)
        base_s, base_responses, base_tokens = one_at_a_time(
            model_dir, items.rows, args.image_size, args.max_new_tokens, args.baseline_threads)
        print(f"baseline done, {load_average()}", flush=True)

        init_ray(num_cpus=args.concurrency + 1)  # the engine actors' CPUs, and one for decoding, scoring, writing
        # Warm-up: one row through a one-actor pool starts Ray Data's cluster-wide helper actors, and the cluster
        # has finished starting when it returns.
        ray.data.range(1).map_batches(Identity, compute=ray.data.ActorPoolStrategy(size=1)).materialize()
        print(f"ours starts, {load_average()}", flush=True)
        run = run_model(model, items, config)
        print(f"ours done, {load_average()}", flush=True)

        ours = {row["id"]: row for row in map(json.loads, open(run.results_path))}
        assert run.generated == n and len(ours) == n, f"ours scored {len(ours)} of {n} items ({run.errors} errors)"
        differ = [item["id"] for item, text in zip(items.rows, base_responses) if ours[item["id"]]["response"] != text]
        our_tokens = sum(row["num_tokens"] for row in ours.values())
        engine_s = sum(row["latency_s"] for row in ours.values()) / args.concurrency
        base_rate, our_rate = n / base_s, n / run.seconds

        print(f"one at a time (model.generate, batch 1, {args.baseline_threads} torch thread): "
              f"{base_rate:8.2f} items/s  ({base_s:.1f}s, {base_tokens} new tokens)")
        print(f"Ray Data path ({args.concurrency} engine actors x batch {args.batch_size}, 1 torch thread each): "
              f"{our_rate:8.2f} items/s  ({run.seconds:.1f}s incl. actor start-up; engines busy {engine_s:.1f}s "
              f"per actor; {our_tokens} new tokens)")
        print(f"ratio: {our_rate / base_rate:.2f}x; identical greedy responses: {n - len(differ)}/{n}"
              + (f" (differ: {differ[:3]})" if differ else ""))


if __name__ == "__main__":
    main()

"""FERBench throughput on the tiny model: the reference way vs our Ray Data path, in one process.

Baseline: what the paper's inference scripts do — one item at a time: read the image, resize it, apply the chat
template, `model.generate` with batch 1, decode. Ours: `bench.runner.run_model` — a decode/resize stage and a
batched engine actor pool streaming through Ray Data (actor start-up and model loading included in its time).
Same model, same items, same greedy decoding, same number of new tokens; both use the whole machine.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

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


def one_at_a_time(model_dir: Path, items: list[dict], image_size: int, max_new_tokens: int, threads: int) -> tuple[float, list[str]]:
    torch.set_num_threads(threads)
    model, processor = load_model_and_processor(model_dir)
    responses = []
    start = time.perf_counter()
    for item in items:
        image = load_image(item["image_uri"], image_size)
        messages = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": item["prompt"]}]}]
        text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        inputs = processor(text=[text], images=[image], return_tensors="pt")
        with torch.inference_mode():
            out = model.generate(**inputs, max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens, do_sample=False)
        responses.append(processor.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)[0])
    return time.perf_counter() - start, responses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--items", type=int, default=384)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--baseline-threads", type=int, default=1,
                        help="torch threads of the one-at-a-time loop (1 is its fastest setting for the tiny model)")
    parser.add_argument("--concurrency", type=int, default=2, help="engine actors (one core each, one thread)")
    args = parser.parse_args()
    threads = args.baseline_threads

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        per_class = max(1, args.items // 30 + 1)
        write_synthetic_datasets(tmp / "data", train_per_class=1, test_per_class=per_class, seed=0)
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

        base_s, base_responses = one_at_a_time(model_dir, items.rows, args.image_size, args.max_new_tokens, threads)
        init_ray(num_cpus=args.concurrency + 1)
        run = run_model(model, items, config)

        import json
        ours = {json.loads(line)["id"]: json.loads(line)["response"] for line in open(run.results_path)}
        same = sum(ours[item["id"]] == r for item, r in zip(items.rows, base_responses))
        base_rate, our_rate = n / base_s, run.generated / run.seconds
        print(f"items: {n}, new tokens per item: {args.max_new_tokens}, image {args.image_size}px; baseline torch "
              f"threads {threads}; ours {args.concurrency} engine actor(s) x 1 thread")
        print(f"one at a time (model.generate, batch 1): {base_rate:8.2f} items/s  ({base_s:.1f}s)")
        print(f"Ray Data path (batch {args.batch_size}):            {our_rate:8.2f} items/s  ({run.seconds:.1f}s, actor start-up included)")
        print(f"ratio: {our_rate / base_rate:.2f}x; identical greedy responses: {same}/{n}")


if __name__ == "__main__":
    main()

"""Which dtype a vLLM engine on this CPU should run in, what compiling costs, and what preloading tcmalloc and Intel
OpenMP gives: one bare vLLM engine (the CPU build, in this process) per setting, on the same FERBench-style items of
the tiny model.

Settings: float32 and bfloat16 with `enforce_eager` (no torch.compile); the chosen dtype compiled (vLLM's default);
the chosen dtype eager with tcmalloc and Intel OpenMP preloaded into the engine's processes (vLLM's CPU performance
guide; `--preload` names the libraries). For each: the engine's start (process start, model load, profiling,
compile, KV cache) and items/s of greedy generation over every item in one `generate` call (vLLM batches them
itself). Prints the ratios and what `dtype: auto` picks here (engines/platform.py: float32 without native bf16,
bfloat16 with it).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from unifer_ray.data.images import load_image
from unifer_ray.data.synthetic import write_synthetic_datasets
from unifer_ray.engines import ChatRequest, EngineSpec, SamplingParams
from unifer_ray.engines.platform import cpu_engine_dtype, platform_line
from unifer_ray.engines.vllm_engine import VLLMEngine
from unifer_ray.engines.vllm_env import preloads
from unifer_ray.models.tiny import build_tiny_model


def face_requests(data: Path, n: int, image_size: int) -> list[ChatRequest]:
    images = sorted((data / "RAF-DB" / "aligned").glob("test_*.jpg"))[:n]
    question = "What is the facial expression? Answer with one word."
    return [ChatRequest.single_image(load_image(str(path), image_size), question) for path in images]


def measure(model_dir: Path, requests: list[ChatRequest], dtype: str, eager: bool, max_new_tokens: int,
            preload: str = "") -> dict:
    # vLLM starts its engine processes with this process's environment.
    os.environ["LD_PRELOAD"] = preload
    started = time.perf_counter()
    engine = VLLMEngine(EngineSpec(engine="vllm", model=str(model_dir), dtype=dtype,
                                   vllm_kwargs={"max_model_len": 1024, "enforce_eager": eager}))
    start_s = time.perf_counter() - started
    try:
        engine.generate(requests[:2], SamplingParams(max_new_tokens=4))  # first-call allocations out of the timing
        started = time.perf_counter()
        out = engine.generate(requests, SamplingParams(max_new_tokens=max_new_tokens))
        seconds = time.perf_counter() - started
    finally:
        engine.close()
    tokens = sum(len(group[0].token_ids) for group in out)
    return {"start_s": start_s, "items_per_s": len(requests) / seconds, "seconds": seconds, "tokens": tokens}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, default=64)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--preload", default=preloads(), help="LD_PRELOAD of the last setting (default: the engines' "
                        "own, engines/vllm_env.py)")
    args = parser.parse_args()
    print(platform_line(), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        write_synthetic_datasets(tmp / "data", train_per_class=1, test_per_class=args.items // 7 + 1, seed=0)
        model_dir = build_tiny_model(tmp / "tiny", seed=0)
        requests = face_requests(tmp / "data", args.items, args.image_size)
        chosen = cpu_engine_dtype()
        settings = [("float32", True, ""), ("bfloat16", True, ""), (chosen, False, ""), (chosen, True, args.preload)]
        results = {}
        for dtype, eager, preload in settings:
            result = measure(model_dir, requests, dtype, eager, args.max_new_tokens, preload)
            results[(dtype, eager, preload)] = result
            print(f"{dtype:>8} {'eager' if eager else 'compiled':>8}{' preloaded' if preload else ''}: "
                  f"start {result['start_s']:6.1f}s, "
                  f"{len(requests)} items in {result['seconds']:6.2f}s = {result['items_per_s']:7.2f} items/s "
                  f"({result['tokens']} tokens)", flush=True)
    fp32, bf16 = results[("float32", True, "")], results[("bfloat16", True, "")]
    compiled, eager = results[(chosen, False, "")], results[(chosen, True, "")]
    preloaded = results[(chosen, True, args.preload)]
    print(f"float32 / bfloat16 items/s (eager): {fp32['items_per_s'] / bf16['items_per_s']:.2f}x; "
          f"dtype auto picks {chosen} here")
    print(f"{chosen} compiled / eager items/s: {compiled['items_per_s'] / eager['items_per_s']:.2f}x; "
          f"start {compiled['start_s']:.1f}s compiled vs {eager['start_s']:.1f}s eager")
    print(f"{chosen} eager, preloaded / not: {preloaded['items_per_s'] / eager['items_per_s']:.2f}x items/s")


if __name__ == "__main__":
    main()

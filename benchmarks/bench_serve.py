"""Serving throughput on the tiny model: dynamic batching vs batch size 1, at the same client concurrency.

Two copies of the Serve app (`unifer_ray.serve`) run side by side in this process on a local Ray cluster: one
batches up to --max-batch-size requests into one generate call, the other runs batches of one. --clients
concurrent HTTP clients send the same FER requests (synthetic faces, `POST /v1/fer`, greedy decoding, the same
number of new tokens) to each in turn, in alternating rounds (A B B A ...), so that both see the same background
load on a shared machine. Printed: requests/s, p50 and p99 latency of both, and the throughput ratio.
Each app has one model replica with one torch thread.

The batched app's batch_wait_timeout_s (--batch-wait-s) is about one batch's generation time: long enough for a
batch to wait for the clients whose answers just went out, so that batches stay full under closed-loop load.
"""

from __future__ import annotations

import argparse
import base64
import io
import os
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")

import httpx
import numpy as np

from unifer_ray.data.synthetic import render_face, sample_params
from unifer_ray.labels import CANONICAL
from unifer_ray.models.tiny import build_tiny_model
from unifer_ray.ray_utils import init_ray
from unifer_ray.serve.config import ServeConfig


def face_payloads(count: int, size: int, seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    payloads = []
    for i in range(count):
        image = render_face(sample_params(CANONICAL[i % len(CANONICAL)], rng), rng, size)
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        payloads.append({"image": base64.b64encode(buffer.getvalue()).decode("ascii"), "dataset": "affectnet"})
    return payloads


def measure(url: str, payloads: list[dict], clients: int) -> tuple[float, list[float]]:
    """Every payload sent once by `clients` threads, each with one keep-alive connection: (seconds, latencies)."""
    latencies: list[float] = []

    def client(share: list[dict]) -> None:
        with httpx.Client(base_url=url, timeout=300) as http:
            for payload in share:
                start = time.perf_counter()
                http.post("/v1/fer", json=payload).raise_for_status()
                latencies.append(time.perf_counter() - start)

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(client, [payloads[k::clients] for k in range(clients)]))
    return time.perf_counter() - start, latencies


def app_config(model_dir: Path, batch_size: int, batch_wait_s: float, args: argparse.Namespace) -> ServeConfig:
    return ServeConfig.model_validate({
        "engine": {"engine": "hf", "model": str(model_dir)},
        "batching": {"max_batch_size": batch_size, "batch_wait_timeout_s": batch_wait_s},
        "max_ongoing_requests": 4 * batch_size if batch_size > 1 else args.clients,
        "resources": {"num_cpus": 1},
        "torch_threads": 1,
        "fer": {"image_size": args.image_size, "max_new_tokens": args.max_new_tokens},
    })


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--requests", type=int, default=192, help="measured requests per app (after a warm-up)")
    parser.add_argument("--rounds", type=int, default=4, help="alternating measurement rounds")
    parser.add_argument("--max-batch-size", type=int, default=16)
    parser.add_argument("--batch-wait-s", type=float, default=0.4, help="batch_wait_timeout_s of the batched app")
    parser.add_argument("--max-new-tokens", type=int, default=128, help="as /v1/fer in configs/serve.yaml")
    parser.add_argument("--image-size", type=int, default=224)
    args = parser.parse_args()

    from ray import serve

    from unifer_ray.serve.app import build_app
    from unifer_ray.serve.run import free_port

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build_tiny_model(Path(tmp) / "tiny", seed=0)
        payloads = face_payloads(args.requests, args.image_size, seed=0)
        rounds = [payloads[r :: args.rounds] for r in range(args.rounds)]
        warmup = face_payloads(2 * args.clients, args.image_size, seed=1)
        init_ray(num_cpus=4)  # logical CPUs: both apps fit, while only the one being measured works
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        apps = {"batched": app_config(model_dir, args.max_batch_size, args.batch_wait_s, args),
                "batch-1": app_config(model_dir, 1, 0.0, args)}
        try:
            for name, config in apps.items():
                serve.run(build_app(config), name=name, route_prefix=f"/{name}")
            urls = {name: f"http://127.0.0.1:{port}/{name}" for name in apps}
            for url in urls.values():
                measure(url, warmup, args.clients)
            seconds = {name: 0.0 for name in apps}
            latencies: dict[str, list[float]] = {name: [] for name in apps}
            for r, share in enumerate(rounds):
                order = list(apps) if r % 2 == 0 else list(reversed(apps))
                for name in order:
                    spent, observed = measure(urls[name], share, args.clients)
                    seconds[name] += spent
                    latencies[name] += observed
        finally:
            serve.shutdown()

    print(f"tiny model, POST /v1/fer, {args.requests} requests per app in {args.rounds} alternating rounds, "
          f"{args.clients} concurrent clients, {args.image_size}px faces, greedy, {args.max_new_tokens} new tokens; "
          f"1 model replica, 1 torch thread; batched: max_batch_size {args.max_batch_size}, "
          f"batch_wait_timeout_s {args.batch_wait_s:g}")
    rps = {name: args.requests / seconds[name] for name in apps}
    for name in apps:
        p50, p99 = (1000 * float(np.percentile(latencies[name], q)) for q in (50, 99))
        print(f"{name:<8} {rps[name]:7.2f} req/s   p50 {p50:8.1f} ms   p99 {p99:8.1f} ms   ({seconds[name]:.1f}s)")
    print(f"throughput ratio (batched / batch 1): {rps['batched'] / rps['batch-1']:.2f}x")


if __name__ == "__main__":
    main()

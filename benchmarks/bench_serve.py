"""Serving on the tiny model: vLLM's continuous batching vs the same server limited to one sequence at a time.

Two copies of the Serve app (`unifer_ray.serve`: Ray Serve LLM's LLMServer on vLLM behind our ingress) run side by
side on a local Ray cluster, both from configs/serve.yaml (the shipped settings) with a random-init tiny model: one as
shipped (`max_num_seqs` 16: up to 16 sequences share every engine step), the other with `max_num_seqs: 1`.
--clients concurrent HTTP clients send the same FER requests (synthetic faces, `POST /v1/fer`, greedy, the shipped
128 new tokens) to each in turn, in alternating rounds (A B B A ...), so that both see the same background load on a
shared machine. Printed: requests/s, p50 and p99 latency of both and the throughput ratio; then the time to first
token of streamed chat completions (the same FER question through `/v1/chat/completions` with `stream: true`),
p50 and p99 at the same concurrency, for both apps.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
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
from unifer_ray.labels import CANONICAL, DATASETS
from unifer_ray.models.tiny import build_tiny_model
from unifer_ray.prompts import ferbench_prompt
from unifer_ray.ray_runtime import free_port
from unifer_ray.serve.config import ServeConfig, load_serve_file
from unifer_ray.serve.run import DEFAULT_SERVE_CONFIG, with_model


def face_pngs(count: int, size: int, seed: int) -> list[str]:
    """Base64 PNGs of synthetic faces, one expression after the other."""
    rng = np.random.default_rng(seed)
    pngs = []
    for i in range(count):
        image = render_face(sample_params(CANONICAL[i % len(CANONICAL)], rng), rng, size)
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        pngs.append(base64.b64encode(buffer.getvalue()).decode("ascii"))
    return pngs


def run_clients(clients: int, jobs: list, send) -> tuple[float, list[float]]:
    """Every job sent once by `clients` threads, each with one keep-alive connection: (seconds, per-job values)."""
    values: list[float] = []

    def client(share: list) -> None:
        with httpx.Client(timeout=600) as http:
            values.extend(send(http, job) for job in share)

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(client, [jobs[k::clients] for k in range(clients)]))
    return time.perf_counter() - start, values


def fer_latency(url: str, tokens: list[int]):
    """Seconds per `/v1/fer` request; each answer's number of tokens goes to `tokens`."""
    def send(http: httpx.Client, png: str) -> float:
        start = time.perf_counter()
        response = http.post(f"{url}/v1/fer", json={"image": png, "dataset": "affectnet"})
        response.raise_for_status()
        tokens.append(response.json()["usage"]["completion_tokens"])
        return time.perf_counter() - start
    return send


def first_token_time(url: str, model: str, max_tokens: int):
    """Seconds from sending a streamed chat completion to its first chunk with text."""
    prompt = ferbench_prompt(DATASETS["affectnet"].labels)

    def send(http: httpx.Client, png: str) -> float:
        body = {"model": model, "stream": True, "max_tokens": max_tokens, "temperature": 0,
                "messages": [{"role": "user", "content": [
                    {"type": "image_url", "image_url": {"url": "data:image/png;base64," + png}},
                    {"type": "text", "text": prompt}]}]}
        start = time.perf_counter()
        with http.stream("POST", f"{url}/v1/chat/completions", json=body) as response:
            response.raise_for_status()
            first = None
            for line in response.iter_lines():
                if first is None and line.startswith("data: {"):
                    choices = json.loads(line[6:])["choices"]
                    if choices and choices[0]["delta"].get("content"):
                        first = time.perf_counter() - start
        return first
    return send


def percentiles(values: list[float]) -> str:
    p50, p99 = (1000 * float(np.percentile(values, q)) for q in (50, 99))
    return f"p50 {p50:8.1f} ms   p99 {p99:8.1f} ms"


def app_configs(model_dir: Path, image_size: int) -> dict[str, ServeConfig]:
    """The shipped config on `model_dir`, and the same limited to one sequence at a time."""
    shipped = with_model(load_serve_file(DEFAULT_SERVE_CONFIG).config, model_dir)
    shipped = shipped.model_copy(update={"fer": shipped.fer.model_copy(update={"image_size": image_size})})
    engine = shipped.llm_config["engine_kwargs"] | {"max_num_seqs": 1}
    one = shipped.model_copy(update={"llm_config": shipped.llm_config | {"engine_kwargs": engine}})
    return {"continuous": shipped, "one-seq": one}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--requests", type=int, default=192, help="measured /v1/fer requests per app (after a warm-up)")
    parser.add_argument("--rounds", type=int, default=4, help="alternating measurement rounds")
    parser.add_argument("--stream-requests", type=int, default=48, help="streamed requests per app, for the TTFT")
    parser.add_argument("--image-size", type=int, default=224)
    args = parser.parse_args()

    import ray
    from ray import serve

    from unifer_ray.serve.app import build_app

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build_tiny_model(Path(tmp) / "tiny", seed=0)
        pngs = face_pngs(args.requests, args.image_size, seed=0)
        rounds = [pngs[r :: args.rounds] for r in range(args.rounds)]
        warmup = face_pngs(args.clients, args.image_size, seed=1)
        streamed = face_pngs(args.stream_requests, args.image_size, seed=2)
        # Logical CPUs: both apps fit (2 + 0.5 each), while only the one being measured works.
        ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1")
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        apps = app_configs(model_dir, args.image_size)
        try:
            for name, config in apps.items():
                serve.run(build_app(config), name=name, route_prefix=f"/{name}")
            urls = {name: f"http://127.0.0.1:{port}/{name}" for name in apps}
            for url in urls.values():
                run_clients(args.clients, warmup, fer_latency(url, []))
            seconds = {name: 0.0 for name in apps}
            latencies: dict[str, list[float]] = {name: [] for name in apps}
            tokens: dict[str, list[int]] = {name: [] for name in apps}
            for r, share in enumerate(rounds):
                for name in (list(apps) if r % 2 == 0 else list(reversed(apps))):
                    spent, observed = run_clients(args.clients, share, fer_latency(urls[name], tokens[name]))
                    seconds[name] += spent
                    latencies[name] += observed
            max_tokens = apps["continuous"].fer.max_new_tokens
            ttft = {name: run_clients(args.clients, streamed,
                                      first_token_time(urls[name], config.model_name, max_tokens))[1]
                    for name, config in apps.items()}
        finally:
            serve.shutdown()
            ray.shutdown()

    engine = apps["continuous"].llm_config["engine_kwargs"]
    print(f"tiny model (random init) on vLLM's CPU build via Ray Serve LLM; POST /v1/fer, {args.requests} requests per "
          f"app in {args.rounds} alternating rounds, {args.clients} concurrent clients, {args.image_size}px faces, "
          f"greedy, up to {apps['continuous'].fer.max_new_tokens} new tokens; 1 replica each, configs/serve.yaml "
          f"(max_num_seqs {engine['max_num_seqs']}) vs the same with max_num_seqs 1")
    rps = {name: args.requests / seconds[name] for name in apps}
    for name in apps:
        print(f"{name:<10} {rps[name]:7.2f} req/s   {percentiles(latencies[name])}   ({seconds[name]:.1f}s, "
              f"{np.mean(tokens[name]):.1f} tokens per answer)")
    print(f"throughput ratio (continuous batching / one sequence at a time): {rps['continuous'] / rps['one-seq']:.2f}x")
    print(f"time to first token, streamed /v1/chat/completions, {args.stream_requests} requests, "
          f"{args.clients} concurrent clients:")
    for name, values in ttft.items():
        print(f"{name:<10} {percentiles(values)}")


if __name__ == "__main__":
    main()

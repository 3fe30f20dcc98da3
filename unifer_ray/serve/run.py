"""Starting the Serve application: `unifer serve`, and a running app for the demo, the tests and the benchmark."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from PIL import Image

from unifer_ray.config import packaged_config
from unifer_ray.data.images import model_input
from unifer_ray.labels import CANONICAL
from unifer_ray.ray_runtime import free_port, init_ray
from unifer_ray.serve.config import ServeConfig, load_serve_file

DEFAULT_SERVE_CONFIG = packaged_config("serve.yaml")


def with_model(config: ServeConfig, model: str | Path) -> ServeConfig:
    """`config` serving `model` (a local directory, or an s3:// prefix or hub id, which Ray Serve LLM downloads)."""
    loading = config.llm_config["model_loading_config"] | {"model_source": str(model)}
    return config.model_copy(update={"llm_config": config.llm_config | {"model_loading_config": loading}})


@contextmanager
def running_app(config: ServeConfig, *, host: str = "127.0.0.1", port: int | None = None,
                name: str = "unifer", route_prefix: str = "/") -> Iterator[str]:
    """Run the app on the connected Ray cluster and yield its base URL (http://host:port); Serve is shut down
    on exit. The HTTP proxy listens on `host` (loopback by default) and `port` (a free one when None)."""
    from ray import serve

    from unifer_ray.serve.app import build_app

    port = port or free_port()
    serve.start(http_options={"host": host, "port": port})
    try:
        serve.run(build_app(config), name=name, route_prefix=route_prefix)
        yield f"http://{host}:{port}{route_prefix.rstrip('/')}"
    finally:
        serve.shutdown()


def serve_model(model: str | Path | None, config_path: str | Path = DEFAULT_SERVE_CONFIG) -> None:
    """`unifer serve --model DIR --config FILE`: run the app from a Serve config file until Ctrl-C.

    `model` (a local directory, an s3:// prefix or a hub id) replaces the file's `model_source`. Ray is joined at
    RAY_ADDRESS, or started locally.
    """
    from ray import serve

    from unifer_ray.serve.app import build_app

    file = load_serve_file(config_path)
    config = file.config if model is None else with_model(file.config, model)
    init_ray()
    serve.start(proxy_location=file.proxy_location, http_options=file.http_options)
    host, port = file.http_options.get("host", "0.0.0.0"), file.http_options.get("port", 8000)
    app = build_app(config)
    print(f"serving {config.model_name} ({config.model_source}) at http://{host}:{port}{file.route_prefix.rstrip('/')}/v1",
          flush=True)
    try:
        serve.run(app, name=file.app_name, route_prefix=file.route_prefix, blocking=True)
    except KeyboardInterrupt:
        serve.shutdown()


def ask_served_model(config: ServeConfig, image: Image.Image, *,
                     candidate_labels: list[str] | tuple[str, ...] = CANONICAL) -> dict:
    """Serve the app of `config` on the connected (or a new local) Ray cluster, ask it one FERBench question about
    `image` (`ask_fer_question`), and shut Serve down."""
    api_key = os.environ.get(config.api_key_env, "") if config.api_key_env else "unused"  # build_app checks it
    init_ray()
    with running_app(config) as base_url:
        return ask_fer_question(base_url, config, image, api_key=api_key, candidate_labels=candidate_labels)


def ask_fer_question(base_url: str, config: ServeConfig, image: Image.Image, *, api_key: str,
                     candidate_labels: list[str] | tuple[str, ...] = CANONICAL) -> dict:
    """Ask the app at `base_url` one FERBench question about `image` through the OpenAI Python client, streamed.

    The image is resized as FERBench resizes it. Returns url, model, response (the text), label (parsed strictly;
    None when unparsable), chunks (streamed chunks with text), usage (from the stream's last chunk),
    ttft_s (time to the first text) and latency_s (the whole round trip).
    """
    import openai

    from unifer_ray.parsing import parse_strict
    from unifer_ray.prompts import ferbench_prompt
    from unifer_ray.serve.app import png_data_url

    image = model_input(image, config.fer.image_size)
    client = openai.OpenAI(base_url=f"{base_url}/v1", api_key=api_key, max_retries=0)
    start = time.perf_counter()
    stream = client.chat.completions.create(
        model=config.model_name,
        messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": png_data_url(image)}},
            {"type": "text", "text": ferbench_prompt(candidate_labels)},
        ]}],
        max_tokens=config.fer.max_new_tokens, temperature=0.0, stream=True,
        stream_options={"include_usage": True},
    )
    pieces, ttft, usage, model = [], None, None, None
    for chunk in stream:
        model = chunk.model
        if chunk.usage is not None:
            usage = chunk.usage.model_dump(include={"prompt_tokens", "completion_tokens", "total_tokens"})
        text = chunk.choices[0].delta.content if chunk.choices else None
        if text:
            ttft = ttft if ttft is not None else time.perf_counter() - start
            pieces.append(text)
    latency = time.perf_counter() - start
    client.close()
    text = "".join(pieces)
    return {"url": f"{base_url}/v1", "model": model, "response": text,
            "label": parse_strict(text, list(candidate_labels)), "chunks": len(pieces), "usage": usage, "ttft_s": ttft,
            "latency_s": latency}

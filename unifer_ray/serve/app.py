"""The Serve application: Ray Serve LLM's `LLMServer` (vLLM: continuous batching, streaming, usage, prefix caching,
autoscaling, metrics) behind `FerIngress`, our subclass of Ray's `OpenAiIngress`.

The ingress adds what Ray's does not have: `POST /v1/fer` (the FERBench prompt, strict answer parsing), `GET /healthz`,
the bearer-key check on every `/v1` route, and the limits and hostile-input checks of `checks.py` and `images.py`.
Only requests that pass reach the model replicas; images reach vLLM only as data URLs the ingress has decoded and
checked, so vLLM never fetches a URL or opens a file.
"""

# No `from __future__ import annotations`: FastAPI must see the real `Request` annotations of the routes.
import asyncio
import base64
import hashlib
import hmac
import io
import os
import re
import time
from pathlib import Path
from typing import Any

import ray
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field
from ray import serve
from ray.llm._internal.common.callbacks.base import CallbackBase
from ray.llm._internal.serve.core.configs.openai_api_models import (
    ChatCompletionRequest,
    CompletionRequest,
    ErrorResponse,
    to_model_metadata,
)
from ray.llm._internal.serve.core.ingress.ingress import init as new_ingress_api
from ray.serve import Application
from ray.serve.llm import LLMConfig, build_llm_deployment
from ray.serve.llm.ingress import OpenAiIngress, make_fastapi_ingress
from starlette.exceptions import HTTPException

from unifer_ray import placement
from unifer_ray.config import ConfigError
from unifer_ray.engines.platform import CPU_ENGINE_DEFAULTS, resolved_dtype
from unifer_ray.engines.vllm_env import vllm_env
from unifer_ray.labels import CANONICAL, DATASETS
from unifer_ray.parsing import parse_strict
from unifer_ray.prompts import ferbench_prompt
from unifer_ray.serve.checks import (
    ApiError,
    ImagePart,
    Message,
    check_messages,
    check_prompt,
    check_sampling,
    check_texts,
    json_object,
    read_body,
    refuse_fields,
    validate,
)
from unifer_ray.serve.config import FerConfig, LimitsConfig, ServeConfig
from unifer_ray.serve.images import (
    FORMATS,
    ImageRejected,
    data_url_bytes,
    decode_base64,
    decode_image,
    image_bytes,
)

HEALTH_TIMEOUT_S = 5.0
_THINK = re.compile(r"<think>(.*?)</think>", re.DOTALL)


class FerRequest(BaseModel):
    """`POST /v1/fer`. Ours, so strict: an unknown field or a wrong JSON type is refused, naming the field."""

    model_config = ConfigDict(extra="forbid", strict=True)

    image: str = Field(min_length=1)  # base64, or a base64 data URL
    dataset: str | None = None  # a FERBench dataset key: its label list, in its order
    candidate_labels: list[str] | None = Field(None, min_length=2, max_length=16)


class IngressSettings(BaseModel):
    """What each ingress replica gets: the limits, the FER route's settings and the API key's digest (never the key)."""

    model_config = ConfigDict(extra="forbid")

    limits: LimitsConfig
    fer: FerConfig
    api_key_sha256: str | None


def think_text(response: str) -> str | None:
    """The reasoning between the first <think></think> tags, stripped; None when there is none."""
    match = _THINK.search(response)
    return match.group(1).strip() if match else None


def sha256_hex(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def png_data_url(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=1)  # the bytes only travel to a replica: speed over size
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def fer_image_url(data: bytes, limits: LimitsConfig, size: int) -> str:
    """The `/v1/fer` image for vLLM, as FERBench sees it (RGB, size×size), from encoded bytes within the limits.

    Bytes that already decode to an RGB image of that size go as they are (vLLM decodes them to the same pixels):
    re-encoding a 224-pixel face as PNG takes about 5 ms, a quarter of the ingress's CPU time per request. Others
    are converted, resized and sent as a PNG."""
    image = decode_image(data, limits, size)
    original = Image.open(io.BytesIO(data), formats=FORMATS)  # the header only; decode_image checked the rest
    if original.mode == "RGB" and original.size == image.size:
        return f"data:{original.get_format_mimetype()};base64,{base64.b64encode(data).decode('ascii')}"
    return png_data_url(image)


class FerIngress(OpenAiIngress):
    """Ray's OpenAI ingress with auth, limits, checked images, `/v1/fer` and `/healthz`. The routes read the raw
    body themselves, so that the key and the body size are checked before any parsing."""

    def __init__(self, llm_deployments, model_cards, *, lora_paths=None, settings: IngressSettings):
        super().__init__(llm_deployments, model_cards, lora_paths=lora_paths)
        [self.model_id] = model_cards
        self.limits, self.fer_config, self.api_key_sha256 = settings.limits, settings.fer, settings.api_key_sha256

    # ------------------------------------------------------------------ routes

    async def healthz(self) -> dict:
        """200 when the model replica answers its engine health check (needs no key); else 503."""
        try:
            handle = self._default_serve_handles[self.model_id]
            await asyncio.wait_for(handle.check_health.remote(), HEALTH_TIMEOUT_S)
        except Exception as exc:  # noqa: BLE001 - any failure to answer means "not ready"
            raise ApiError(503, f"no model replica answered: {type(exc).__name__}", "service_unavailable") from None
        return {"status": "ok", "model": self.model_id}

    async def list_models(self, request: Request):
        self.authorize(request)
        return await self.models()

    async def get_model(self, model: str, request: Request):
        self.authorize(request)
        return await self.model_data(model)

    async def chat_completions(self, request: Request) -> Response:
        self.authorize(request)
        data = json_object(await read_body(request, self.limits.max_body_bytes))
        refuse_fields(data)
        messages = check_messages(data, self.limits)
        body = check_sampling(validate(ChatCompletionRequest, data), self.limits)
        body = body.model_copy(update={"messages": await self.checked_images(messages)})
        return await self._process_llm_request(body, call_method="chat", raw_request=request)

    async def completions_route(self, request: Request) -> Response:
        self.authorize(request)
        data = json_object(await read_body(request, self.limits.max_body_bytes))
        refuse_fields(data)
        check_prompt(data, self.limits)
        body = check_sampling(validate(CompletionRequest, data), self.limits)
        return await self._process_llm_request(body, call_method="completions", raw_request=request)

    async def fer(self, request: Request) -> dict:
        start = time.perf_counter()
        self.authorize(request)
        fer = validate(FerRequest, json_object(await read_body(request, self.limits.max_body_bytes)))
        labels = self.candidate_labels(fer)
        try:
            data = (data_url_bytes(fer.image, self.limits.max_image_bytes) if fer.image[:5].lower() == "data:"
                    else decode_base64(fer.image, self.limits.max_image_bytes))
            # Off the event loop: decoding (and any re-encoding) takes milliseconds that other requests would wait.
            url = await asyncio.to_thread(fer_image_url, data, self.limits, self.fer_config.image_size)
        except ImageRejected as exc:
            raise ApiError(400, f"image: {exc}", param="image") from None
        # FERBench's conversation: the image (resized as the benchmark resizes it), then the prompt; greedy.
        chat = ChatCompletionRequest(
            model=self.model_id, max_tokens=self.fer_config.max_new_tokens, temperature=0.0,
            messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                   {"type": "text", "text": ferbench_prompt(labels)}]}],
        )
        response = await anext(self._get_response(body=chat, call_method="chat"))
        if isinstance(response, ErrorResponse):
            raise ApiError(response.error.code, response.error.message, response.error.type)
        text = response.choices[0].message.content or ""
        return {
            "label": parse_strict(text, labels),
            "reasoning": think_text(text),
            "raw": text,
            "model": self.model_id,
            "usage": response.usage.model_dump(include={"prompt_tokens", "completion_tokens", "total_tokens"}),
            "latency_ms": round((time.perf_counter() - start) * 1000, 2),
        }

    # ------------------------------------------------------------------ checks

    def authorize(self, request: Request) -> None:
        if self.api_key_sha256 is None:
            return
        scheme, _, key = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise ApiError(401, "missing API key: send the header 'Authorization: Bearer <key>'",
                           "authentication_error")
        if not hmac.compare_digest(sha256_hex(key.strip()), self.api_key_sha256):
            raise ApiError(401, "invalid API key", "authentication_error")

    async def checked_images(self, messages: list[Message]) -> list[dict[str, Any]]:
        """The messages for vLLM, every image as a data URL of bytes the limits were checked on."""
        converted = []
        for i, message in enumerate(messages):
            dumped = message.model_dump(exclude_unset=True)
            if isinstance(message.content, list):
                for j, part in enumerate(message.content):
                    if isinstance(part, ImagePart):
                        url = await self.image_url(part.image_url.url, f"messages.{i}.content.{j}.image_url.url")
                        dumped["content"][j]["image_url"]["url"] = url
            converted.append(dumped)
        return converted

    async def image_url(self, url: str, param: str) -> str:
        try:
            data = await image_bytes(url, self.limits)
            image = await asyncio.to_thread(decode_image, data, self.limits)
        except ImageRejected as exc:
            raise ApiError(400, f"{param}: {exc}", param=param) from None
        if url[:5].lower() == "data:":
            return url
        return await asyncio.to_thread(png_data_url, image)  # a fetched image: vLLM gets its pixels, never the URL

    def candidate_labels(self, fer: FerRequest) -> list[str]:
        if fer.dataset is not None and fer.candidate_labels is not None:
            raise ApiError(400, "give either dataset or candidate_labels, not both", param="candidate_labels")
        if fer.dataset is not None:
            if fer.dataset not in DATASETS:
                raise ApiError(400, f"dataset {fer.dataset!r} is unknown; expected one of {sorted(DATASETS)}",
                               param="dataset")
            return list(DATASETS[fer.dataset].labels)
        if fer.candidate_labels is None:
            return list(CANONICAL)
        for k, label in enumerate(fer.candidate_labels):
            if not label.strip() or len(label) > 64:
                raise ApiError(400, f"candidate_labels.{k}: a label must be 1 to 64 characters, not blank",
                               param=f"candidate_labels.{k}")
        check_texts([(f"candidate_labels.{k}", label) for k, label in enumerate(fer.candidate_labels)], self.limits,
                    "candidate_labels")
        if len({label.strip().lower() for label in fer.candidate_labels}) < len(fer.candidate_labels):
            raise ApiError(400, "candidate_labels must not repeat a label", param="candidate_labels")
        return fer.candidate_labels


# Method name -> route. Ray's other routes (embeddings, score, tokenize, transcriptions) are not served.
ENDPOINTS = {
    "healthz": lambda app: app.get("/healthz"),
    "list_models": lambda app: app.get("/v1/models"),
    "get_model": lambda app: app.get("/v1/models/{model:path}"),
    "chat_completions": lambda app: app.post("/v1/chat/completions"),
    "completions_route": lambda app: app.post("/v1/completions"),
    "fer": lambda app: app.post("/v1/fer"),
}


def ingress_api() -> FastAPI:
    """Ray's ingress FastAPI app (its error middleware, CORS, HTTP metrics, request ids), answering our errors
    in OpenAI's shape."""
    api = new_ingress_api()
    # Ray's app publishes its OpenAPI schema and docs pages to anyone; ours publishes neither.
    hidden = {api.openapi_url, api.docs_url, api.redoc_url, api.swagger_ui_oauth2_redirect_url}
    api.router.routes = [route for route in api.router.routes if getattr(route, "path", None) not in hidden]

    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status)

    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:  # e.g. Ray's 404 for a model
        return await api_error(request, ApiError(exc.status_code, str(exc.detail), "not_found_error"
                                                 if exc.status_code == 404 else "invalid_request_error"))

    api.add_exception_handler(ApiError, api_error)
    api.add_exception_handler(HTTPException, http_error)
    return api


def api_key_digest(api_key_env: str | None) -> str | None:
    """The SHA-256 of the key in $api_key_env, read where the app is built: replicas never hold the key."""
    if api_key_env is None:
        return None
    key = os.environ.get(api_key_env, "").strip()
    if not key:
        raise ConfigError(f"api_key_env: the API key variable ${api_key_env} is not set where the app is built")
    return sha256_hex(key)


class LocalModelNodeInit(CallbackBase):
    """Ray Serve LLM's node initialization, skipped where it has nothing to fetch. Before the engine starts, it runs a
    task on every node of the replica's placement group to download the model's files there: a worker process of its
    own that imports torch, transformers and Ray's LLM stack (about 15 s of CPU on a 2-core AVX2 EPYC, on the path of
    the app's start). A model in a local directory, with every bundle on this replica's node, is there already; any
    other source (s3://, a hub id, bundles on other nodes) is initialized as Ray does it."""

    async def on_before_node_init(self) -> None:
        source = self.llm_config.model_loading_config.model_source
        nodes = set(ray.util.placement_group_table(self.ctx.placement_group)["bundles_to_node_id"].values())
        if isinstance(source, str) and Path(source).is_dir() and nodes == {ray.get_runtime_context().get_node_id()}:
            self.ctx.run_init_node = False


def llm_config(config: ServeConfig) -> LLMConfig:
    """Ray's LLMConfig of the app, with the vLLM defaults every stage shares (on CPUs the CPU's fast dtype unless the
    file names one; the CPU variables in the replicas' environment, set ones winning), a local model path made
    absolute (replicas run in other directories), Ray's node initialization skipped for such a path unless the file
    names a callback of its own (`LocalModelNodeInit`) and, on a role-labelled cluster, the replicas on serve nodes
    (`unifer_ray.placement`)."""
    values = dict(config.llm_config)
    loading = dict(values["model_loading_config"])
    source = loading.get("model_source")
    if isinstance(source, str) and "://" not in source and Path(source).exists():
        loading["model_source"] = str(Path(source).resolve())
    engine_kwargs = dict(values.get("engine_kwargs") or {})
    bundles = (values.get("placement_group_config") or {}).get("bundles") or [{}]
    on_cpu = not values.get("accelerator_type") and not any(bundle.get("GPU") for bundle in bundles)
    engine_kwargs["dtype"] = resolved_dtype(engine_kwargs.get("dtype", "auto"), on_cpu=on_cpu)
    if on_cpu:
        engine_kwargs = CPU_ENGINE_DEFAULTS | engine_kwargs
    runtime_env = dict(values.get("runtime_env") or {})
    runtime_env["env_vars"] = vllm_env() | runtime_env.get("env_vars", {})
    deployment = dict(values.get("deployment_config") or {})
    if serve_nodes := placement.selector("serve"):
        # Ray Serve LLM's placement_group_config takes no label selector, but Serve's deployment options do and
        # LLMServer passes deployment_config on: every bundle of a replica's placement group (the replica and its
        # vLLM engine) goes on a serve node, never on a spot rollout node that has the same GPU.
        deployment.setdefault("placement_group_bundle_label_selector", [serve_nodes])
    callbacks = values.get("callback_config") or {"callback_class": f"{__name__}.{LocalModelNodeInit.__name__}"}
    return LLMConfig.model_validate(values | {"model_loading_config": loading, "engine_kwargs": engine_kwargs,
                                              "runtime_env": runtime_env, "deployment_config": deployment,
                                              "callback_config": callbacks})


def ingress_settings(config: ServeConfig) -> IngressSettings:
    """What every ingress replica checks requests against; the key's digest from the file or, where the app is
    built, from $api_key_env."""
    digest = config.api_key_sha256 or api_key_digest(config.api_key_env)
    return IngressSettings(limits=config.limits, fer=config.fer, api_key_sha256=digest)


def ingress_options(config: ServeConfig, llm: LLMConfig) -> dict:
    """FerIngress's Serve deployment options: Ray's defaults for an LLM ingress, our replica counts and CPUs, on
    serve nodes where the cluster labels its node types."""
    options = FerIngress.get_deployment_options([llm])
    options["ray_actor_options"] = {"num_cpus": config.ingress.num_cpus} | placement.actor_options("serve")
    options["autoscaling_config"] |= {"min_replicas": config.ingress.min_replicas,
                                      "max_replicas": config.ingress.max_replicas}
    return options


def build_app(config: ServeConfig) -> Application:
    """The Serve application builder (`import_path: unifer_ray.serve.app:build_app`; the args are a ServeConfig):
    one LLMServer deployment (vLLM, autoscaled by its deployment_config) behind FerIngress, both on serve nodes
    where the cluster labels its node types."""
    settings = ingress_settings(config)
    llm = llm_config(config)
    ingress = make_fastapi_ingress(FerIngress, endpoint_map=ENDPOINTS, app=ingress_api())
    return serve.deployment(ingress, **ingress_options(config, llm)).bind(
        llm_deployments={llm.model_id: build_llm_deployment(llm)},
        model_cards={llm.model_id: to_model_metadata(llm.model_id, llm)},
        settings=settings,
    )

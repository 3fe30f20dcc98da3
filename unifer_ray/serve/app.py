"""The Serve application: OpenAI-compatible chat completions and `/v1/fer` in front of the Generator deployment.

Two deployments: `APIServer` (the FastAPI ingress, CPU) checks requests in order of cost — API key, body size,
schema, limits, images — and decodes the images; only valid requests reach `Generator` (one batched
GenerationEngine per replica, GPU where there is one), which autoscales on its own. A bad request gets a 4xx
naming what was wrong; a failed generation a 500 with its message; neither takes a replica down.
"""

# No `from __future__ import annotations`: FastAPI must see the real `Request` annotations of the routes.
import asyncio
import hashlib
import hmac
import os
import re
import time
from typing import TypeVar

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from PIL import Image
from pydantic import BaseModel, ValidationError
from ray import serve
from ray.serve import Application
from ray.serve.handle import DeploymentHandle

from unifer_ray.config import ConfigError
from unifer_ray.engines import ChatRequest, Completion, SamplingParams
from unifer_ray.labels import CANONICAL, DATASETS
from unifer_ray.parsing import parse_strict
from unifer_ray.prompts import ferbench_prompt
from unifer_ray.serve.config import ServeConfig
from unifer_ray.serve.images import ImageRejected, data_url_bytes, decode_base64, decode_image, image_bytes
from unifer_ray.serve.generator import GenerationFailed, Generator
from unifer_ray.serve.protocol import (
    ChatCompletionRequest,
    FerRequest,
    ImagePart,
    Message,
    chat_completion,
    error_body,
    model_list,
    think_text,
)

T = TypeVar("T", bound=BaseModel)

# Chat-template control tokens (<|im_start|>, <|image_pad|>, ...) in user text would forge turns or break the
# image-token count; they are refused.
_SPECIAL_TOKEN = re.compile(r"<\|[^<>|\s]{1,64}\|>")

HEALTH_TIMEOUT_S = 5.0

api = FastAPI(title="UniFER", docs_url=None, redoc_url=None, openapi_url=None)


class ApiError(Exception):
    """An HTTP error answered in OpenAI's error shape."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param = status, message, kind, param


@api.exception_handler(ApiError)
async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
    return JSONResponse(error_body(exc.message, exc.kind, exc.param), status_code=exc.status)


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with a 413 as soon as it is known to exceed `limit` bytes."""
    too_large = ApiError(413, f"request body exceeds the limit of {limit} bytes")
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise too_large
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise too_large
    return bytes(body)


def parse_body(model: type[T], body: bytes) -> T:
    try:
        return model.model_validate_json(body)
    except ValidationError as exc:
        problems = [f"{'.'.join(str(p) for p in err['loc']) or 'body'}: {err['msg']}" for err in exc.errors()]
        first = ".".join(str(p) for p in exc.errors()[0]["loc"]) or None
        raise ApiError(422, "invalid request: " + "; ".join(problems), param=first) from None


def refuse_special_tokens(text: str, param: str) -> None:
    if match := _SPECIAL_TOKEN.search(text):
        raise ApiError(400, f"{param}: contains the control token {match.group()!r}, which requests may not use", param=param)


def sha256_hex(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


@serve.deployment
@serve.ingress(api)
class APIServer:
    """The HTTP ingress: checks and decodes requests, then hands them to the Generator deployment."""

    def __init__(self, config: ServeConfig, generator: DeploymentHandle, api_key_sha256: str | None):
        self.config = config
        self.limits = config.limits
        self.generator = generator
        self.api_key_sha256 = api_key_sha256
        self.created = int(time.time())

    # ------------------------------------------------------------------ routes

    @api.get("/healthz")
    async def healthz(self) -> dict:
        """200 when a Generator replica answers: the whole path from proxy to model is up; else 503."""
        try:
            model = await asyncio.wait_for(self.generator.ready.remote(), HEALTH_TIMEOUT_S)
        except Exception as exc:  # noqa: BLE001 - any failure to answer means "not ready"
            raise ApiError(503, f"no model replica answered: {type(exc).__name__}", "service_unavailable") from None
        return {"status": "ok", "model": model}

    @api.get("/v1/models")
    async def models(self, request: Request) -> dict:
        self.authorize(request)
        return model_list(self.config.model_name, self.created)

    @api.post("/v1/chat/completions")
    async def chat_completions(self, request: Request) -> dict:
        self.authorize(request)
        chat = parse_body(ChatCompletionRequest, await read_body(request, self.limits.max_body_bytes))
        if chat.stream:
            raise ApiError(400, "streaming is not supported: send stream: false or leave it out", param="stream")
        if chat.model != self.config.model_name:
            raise ApiError(404, f"model {chat.model!r} is not served here; the model is {self.config.model_name!r}",
                           "not_found_error", "model")
        params = self.sampling_params(chat)
        messages = await self.chat_messages(chat.messages)
        completions = await self.generate(ChatRequest(messages), params)
        return chat_completion(self.config.model_name, completions)

    @api.post("/v1/fer")
    async def fer(self, request: Request) -> dict:
        start = time.perf_counter()
        self.authorize(request)
        fer = parse_body(FerRequest, await read_body(request, self.limits.max_body_bytes))
        labels = self.candidate_labels(fer)
        try:
            data = (data_url_bytes(fer.image, self.limits.max_image_bytes) if fer.image[:5].lower() == "data:"
                    else decode_base64(fer.image, self.limits.max_image_bytes))
            image = await asyncio.to_thread(decode_image, data, self.limits, self.config.fer.image_size)
        except ImageRejected as exc:
            raise ApiError(400, f"image: {exc}", param="image") from None
        params = SamplingParams(max_new_tokens=self.config.fer.max_new_tokens, temperature=0.0)
        [completion] = await self.generate(ChatRequest.single_image(image, ferbench_prompt(labels)), params)
        return {
            "label": parse_strict(completion.text, labels),
            "reasoning": think_text(completion.text),
            "raw": completion.text,
            "model": self.config.model_name,
            "latency_ms": round((time.perf_counter() - start) * 1000, 2),
        }

    # ------------------------------------------------------------------ checks

    def authorize(self, request: Request) -> None:
        if self.api_key_sha256 is None:
            return
        scheme, _, key = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise ApiError(401, "missing API key: send the header 'Authorization: Bearer <key>'", "authentication_error")
        if not hmac.compare_digest(sha256_hex(key.strip()), self.api_key_sha256):
            raise ApiError(401, "invalid API key", "authentication_error")

    def sampling_params(self, chat: ChatCompletionRequest) -> SamplingParams:
        max_tokens = chat.max_completion_tokens or chat.max_tokens or self.limits.default_max_tokens
        if max_tokens > self.limits.max_tokens:
            raise ApiError(400, f"max_tokens {max_tokens} exceeds the limit of {self.limits.max_tokens}", param="max_tokens")
        if chat.n > self.limits.max_n:
            raise ApiError(400, f"n {chat.n} exceeds the limit of {self.limits.max_n}", param="n")
        return SamplingParams(max_new_tokens=max_tokens, temperature=chat.temperature, top_p=chat.top_p, n=chat.n,
                              seed=chat.seed)

    async def chat_messages(self, messages: list[Message]) -> list[dict]:
        """Messages in the engines' format, images decoded; limits on text and images checked first."""
        parts = [(i, j, part) for i, m in enumerate(messages) if isinstance(m.content, list) for j, part in enumerate(m.content)]
        num_images = sum(isinstance(part, ImagePart) for _, _, part in parts)
        if num_images > self.limits.max_images:
            raise ApiError(400, f"{num_images} images exceed the limit of {self.limits.max_images} per request", param="messages")
        texts = [(f"messages.{i}.content", m.content) for i, m in enumerate(messages) if isinstance(m.content, str)]
        texts += [(f"messages.{i}.content.{j}.text", part.text) for i, j, part in parts if not isinstance(part, ImagePart)]
        if sum(len(text) for _, text in texts) > self.limits.max_text_chars:
            raise ApiError(400, f"the messages' text exceeds the limit of {self.limits.max_text_chars} characters",
                           param="messages")
        for param, text in texts:
            refuse_special_tokens(text, param)

        converted = []
        for i, message in enumerate(messages):
            content = message.content
            if not isinstance(content, str):
                content = [
                    {"type": "image", "image": await self.load_image(part.image_url.url, f"messages.{i}.content.{j}.image_url.url")}
                    if isinstance(part, ImagePart) else {"type": "text", "text": part.text}
                    for j, part in enumerate(content)
                ]
            converted.append({"role": message.role, "content": content})
        return converted

    async def load_image(self, url: str, param: str) -> Image.Image:
        try:
            data = await image_bytes(url, self.limits)
            return await asyncio.to_thread(decode_image, data, self.limits)
        except ImageRejected as exc:
            raise ApiError(400, f"{param}: {exc}", param=param) from None

    def candidate_labels(self, fer: FerRequest) -> list[str]:
        if fer.dataset is not None and fer.candidate_labels is not None:
            raise ApiError(400, "give either dataset or candidate_labels, not both", param="candidate_labels")
        if fer.dataset is not None:
            if fer.dataset not in DATASETS:
                raise ApiError(400, f"dataset {fer.dataset!r} is unknown; expected one of {sorted(DATASETS)}", param="dataset")
            return list(DATASETS[fer.dataset].labels)
        if fer.candidate_labels is None:
            return list(CANONICAL)
        for k, label in enumerate(fer.candidate_labels):
            if not label.strip():
                raise ApiError(400, f"candidate_labels.{k}: a label must not be blank", param=f"candidate_labels.{k}")
            refuse_special_tokens(label, f"candidate_labels.{k}")
        if len({label.strip().lower() for label in fer.candidate_labels}) < len(fer.candidate_labels):
            raise ApiError(400, "candidate_labels must not repeat a label", param="candidate_labels")
        return fer.candidate_labels

    # ------------------------------------------------------------------ generation

    async def generate(self, request: ChatRequest, params: SamplingParams) -> list[Completion]:
        try:
            return await self.generator.generate.remote(request, params)
        except GenerationFailed as exc:  # the engine failed on this request
            raise ApiError(500, f"generation failed: {exc.args[0]}", "server_error") from None
        except Exception as exc:  # noqa: BLE001 - e.g. the model replica died mid-request
            raise ApiError(500, f"generation failed: {type(exc).__name__}", "server_error") from None


def build_app(config: ServeConfig) -> Application:
    """The Serve application builder (`import_path: unifer_ray.serve.app:build_app`; the args are a ServeConfig).

    The API key is read here, where the app is built, from the variable `config.api_key_env` names; replicas get
    only its SHA-256 digest, so the key itself is never stored in the cluster's deployment state.
    """
    key_digest = None
    if config.api_key_env is not None:
        key = os.environ.get(config.api_key_env, "").strip()
        if not key:
            raise ConfigError(f"api_key_env: the API key variable ${config.api_key_env} is not set where the app is built")
        key_digest = sha256_hex(key)
    generator = Generator.options(
        autoscaling_config=config.autoscaling.model_dump(),
        max_ongoing_requests=config.max_ongoing_requests,
        ray_actor_options=config.resources.model_dump(exclude_none=True),
    ).bind(config)
    return APIServer.options(
        num_replicas=config.ingress.num_replicas,
        max_ongoing_requests=config.ingress.max_ongoing_requests,
        ray_actor_options={"num_cpus": config.ingress.num_cpus},
    ).bind(config, generator, key_digest)

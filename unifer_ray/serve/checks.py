"""What a request must be before it reaches the model, checked in the ingress in order of cost.

The OpenAI routes take vLLM's own request models (so clients may send every field vLLM's server accepts, and
unknown ones are ignored as vLLM ignores them), with four additions: a body-size limit, the refusal of the few vLLM
fields that change how the server processes a request, strict message content (text and `image_url` parts only,
limited in number and length, without chat-template control tokens), and limits on `max_tokens` and `n`.
Every refusal is an `ApiError` whose message and `param` name the field.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal, TypeVar

import pydantic_core
from fastapi import Request
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from unifer_ray.serve.config import LimitsConfig

T = TypeVar("T", bound=BaseModel)

# Chat-template control tokens (<|im_start|>, <|image_pad|>, ...) in user text would forge turns or break the
# image-token count; they are refused.
_SPECIAL_TOKEN = re.compile(r"<\|[^<>|\s]{1,64}\|>")

# vLLM request fields that change how the server processes a request, not what it generates: a client's chat
# template or template kwargs, processor kwargs (Qwen2.5-VL's min_pixels would blow any image up to thousands of
# tokens), media-loader kwargs, KV/EC transfer parameters, its own request id (it could collide with another
# client's and abort it), prompt embeddings (tensors deserialised from the client) and extra engine arguments.
REFUSED_FIELDS = ("chat_template", "chat_template_kwargs", "mm_processor_kwargs", "media_io_kwargs",
                  "kv_transfer_params", "ec_transfer_params", "request_id", "prompt_embeds", "vllm_xargs")


class ApiError(Exception):
    """An HTTP error answered in OpenAI's error shape."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param = status, message, kind, param

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.status}}


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with a 413 as soon as it is known to exceed `limit` bytes."""
    too_large = ApiError(413, f"request body exceeds the limit of {limit} bytes", param="body")
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise too_large
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise too_large
    return bytes(body)


def json_object(body: bytes) -> dict[str, Any]:
    """The body as a JSON object. pydantic's parser bounds nesting depth, where `json.loads` would recurse."""
    try:
        data = pydantic_core.from_json(body)
    except ValueError as exc:
        raise ApiError(400, f"the body is not valid JSON: {exc}", param="body") from None
    if not isinstance(data, dict):
        raise ApiError(400, f"the body must be a JSON object, not {type(data).__name__}", param="body")
    return data


def validate(model: type[T], data: Any) -> T:
    """`model` from `data`, or a 400 naming every invalid field."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        errors = exc.errors(include_url=False)
        names = [".".join(str(p) for p in err["loc"]) or "body" for err in errors]
        problems = "; ".join(f"{name}: {err['msg']}" for name, err in zip(names, errors))
        raise ApiError(400, f"invalid request: {problems}", param=names[0]) from None


def refuse_fields(data: dict[str, Any]) -> None:
    for name in REFUSED_FIELDS:
        if name in data:
            raise ApiError(400, f"{name}: this server does not accept the field {name!r}", param=name)


def refuse_special_tokens(text: str, param: str) -> None:
    if match := _SPECIAL_TOKEN.search(text):
        raise ApiError(400, f"{param}: contains the control token {match.group()!r}, which requests may not use",
                       param=param)


# ------------------------------------------------------------------------------------ chat messages

_STRICT = ConfigDict(extra="forbid", strict=True)


class TextPart(BaseModel):
    model_config = _STRICT

    type: Literal["text"]
    text: str


class ImageURL(BaseModel):
    model_config = _STRICT

    url: str = Field(min_length=1)
    detail: Literal["auto", "low", "high"] | None = None  # accepted for compatibility; the processor sizes images


class ImagePart(BaseModel):
    model_config = _STRICT

    type: Literal["image_url"]
    image_url: ImageURL


class Message(BaseModel):
    """A chat message. Its content is strict (no audio, video, embeddings or files); other keys (name, tool_calls)
    go to vLLM as they are."""

    model_config = ConfigDict(extra="allow", strict=True)

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[Annotated[TextPart | ImagePart, Field(discriminator="type")]] | None = None

    @model_validator(mode="after")
    def _check_content(self) -> Message:
        if self.content is None and self.role != "assistant":  # only an assistant's tool call may leave it out
            raise ValueError(f"a {self.role} message needs content")
        return self


class Messages(BaseModel):
    model_config = ConfigDict(extra="ignore")

    messages: list[Message] = Field(min_length=1)


def check_messages(data: dict[str, Any], limits: LimitsConfig) -> list[Message]:
    """The request's messages, checked: structure, number of images, total text length, control tokens."""
    messages = validate(Messages, {"messages": data.get("messages")}).messages
    parts = [(f"messages.{i}.content.{j}", part) for i, m in enumerate(messages) if isinstance(m.content, list)
             for j, part in enumerate(m.content)]
    images = sum(isinstance(part, ImagePart) for _, part in parts)
    if images > limits.max_images:
        raise ApiError(400, f"{images} images exceed the limit of {limits.max_images} per request", param="messages")
    texts = [(f"messages.{i}.content", m.content) for i, m in enumerate(messages) if isinstance(m.content, str)]
    texts += [(f"{name}.text", part.text) for name, part in parts if isinstance(part, TextPart)]
    check_texts(texts, limits, "messages")
    return messages


def check_texts(texts: list[tuple[str, str]], limits: LimitsConfig, param: str) -> None:
    if sum(len(text) for _, text in texts) > limits.max_text_chars:
        raise ApiError(400, f"{param}: the text exceeds the limit of {limits.max_text_chars} characters", param=param)
    for name, text in texts:
        refuse_special_tokens(text, name)


def check_prompt(data: dict[str, Any], limits: LimitsConfig) -> None:
    """`/v1/completions`: text prompts only (token ids could name the image placeholder), within the text limit."""
    prompt = data.get("prompt")
    prompts = [prompt] if isinstance(prompt, str) else prompt
    if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) for p in prompts):
        raise ApiError(400, "prompt: must be a string or a non-empty list of strings", param="prompt")
    check_texts([(f"prompt.{k}", p) for k, p in enumerate(prompts)], limits, "prompt")


# ------------------------------------------------------------------------------------ sampling


def check_sampling(body: T, limits: LimitsConfig) -> T:
    """Refuse `max_tokens` (or `max_completion_tokens`), `n` and `best_of` above the limits; a request that names
    no token budget gets `default_max_tokens` instead of everything the context leaves."""
    for name in ("max_tokens", "max_completion_tokens"):
        value = getattr(body, name, None)
        if value is not None and value > limits.max_tokens:
            raise ApiError(400, f"{name} {value} exceeds the limit of {limits.max_tokens}", param=name)
    for name in ("n", "best_of"):
        value = getattr(body, name, None)
        if value is not None and value > limits.max_n:
            raise ApiError(400, f"{name} {value} exceeds the limit of {limits.max_n}", param=name)
    if body.max_tokens is None and getattr(body, "max_completion_tokens", None) is None:
        return body.model_copy(update={"max_tokens": limits.default_max_tokens})
    return body

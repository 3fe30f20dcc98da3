"""Request and response bodies: the OpenAI chat-completions subset we serve, and `/v1/fer`.

Requests are strict: unknown fields and wrong JSON types are refused (a silently ignored `stop` or a "5" read as
5 would hide client bugs), and the error names the field.
"""

from __future__ import annotations

import re
import time
import uuid
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from unifer_ray.engines.base import Completion

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
    model_config = _STRICT

    role: Literal["system", "user", "assistant"]
    content: str | list[Annotated[TextPart | ImagePart, Field(discriminator="type")]]


class ChatCompletionRequest(BaseModel):
    model_config = _STRICT

    model: str
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(None, gt=0)
    max_completion_tokens: int | None = Field(None, gt=0)  # the newer name of max_tokens
    temperature: float = Field(1.0, ge=0.0, le=2.0)  # OpenAI's default; 0 is greedy
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, gt=0)
    seed: int | None = None
    stream: bool | None = False


class FerRequest(BaseModel):
    model_config = _STRICT

    image: str = Field(min_length=1)  # base64, or a base64 data URL
    dataset: str | None = None  # a FERBench dataset key: its label list, in its order
    candidate_labels: list[Annotated[str, Field(min_length=1, max_length=64)]] | None = Field(
        None, min_length=2, max_length=16
    )


_THINK = re.compile(r"<think>(.*?)</think>", re.DOTALL)


def think_text(response: str) -> str | None:
    """The reasoning between the first <think></think> tags, stripped; None when there is none."""
    match = _THINK.search(response)
    return match.group(1).strip() if match else None


def chat_completion(model: str, completions: list[Completion]) -> dict:
    """An OpenAI `chat.completion` object. `usage` is left out: the engines do not count prompt tokens."""
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": i,
                "message": {"role": "assistant", "content": c.text},
                "finish_reason": c.finish_reason,
                "logprobs": None,
            }
            for i, c in enumerate(completions)
        ],
    }


def model_list(model: str, created: int) -> dict:
    return {"object": "list", "data": [{"id": model, "object": "model", "created": created, "owned_by": "unifer"}]}


def error_body(message: str, kind: str, param: str | None = None) -> dict:
    """OpenAI's error shape, which the SDKs turn into exception messages."""
    return {"error": {"message": message, "type": kind, "param": param, "code": None}}

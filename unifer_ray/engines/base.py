"""The one generation interface shared by FERBench, curation teachers, RL rollouts and serving."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

from PIL import Image
from pydantic import BaseModel, ConfigDict, Field


class SamplingParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    max_new_tokens: int = Field(256, gt=0)
    temperature: float = Field(0.0, ge=0.0)  # 0 means greedy decoding
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, gt=0)  # completions per request
    seed: int | None = None
    logprobs: bool = False  # return the sampled tokens' log-probabilities


@dataclass
class ChatRequest:
    """One conversation in the transformers chat format.

    `messages` is a list of {"role": ..., "content": [parts]}, where a part is
    {"type": "text", "text": str} or {"type": "image", "image": PIL.Image.Image}.
    """

    messages: list[dict[str, Any]]

    @classmethod
    def single_image(cls, image: Image.Image, text: str) -> ChatRequest:
        return cls([{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": text}]}])

    def images(self) -> list[Image.Image]:
        return [p["image"] for m in self.messages if isinstance(m["content"], list)
                for p in m["content"] if p["type"] == "image"]


@dataclass
class Completion:
    text: str
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] | None = None  # one per token id, when requested
    finish_reason: str = "stop"  # "stop" (end of turn) or "length"


class GenerationEngine(ABC):
    """Batched chat generation. `generate` returns, per request, `params.n` completions."""

    @abstractmethod
    def generate(self, requests: list[ChatRequest], params: SamplingParams) -> list[list[Completion]]: ...

    def close(self) -> None:
        """Release devices and connections; the default holds none."""

"""Generation through an OpenAI-compatible chat-completions endpoint (API models, or a vLLM/SGLang server)."""

from __future__ import annotations

import base64
import io
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from PIL import Image

from unifer_ray.engines.base import ChatRequest, Completion, GenerationEngine, SamplingParams
from unifer_ray.engines.spec import EngineSpec


class RequestFailed(RuntimeError):
    """One request of a batch failed (after the SDK's retries); `index` is its position in the batch."""

    def __init__(self, index: int, cause: Exception):
        super().__init__(f"request {index} failed: {type(cause).__name__}: {cause}")
        self.index = index


def image_data_url(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def openai_messages(request: ChatRequest) -> list[dict[str, Any]]:
    """Messages in the OpenAI format: images become base64 PNG data URLs in `image_url` parts."""
    messages = []
    for message in request.messages:
        content = message["content"]
        if not isinstance(content, str):
            content = [
                {"type": "image_url", "image_url": {"url": image_data_url(part["image"])}}
                if part["type"] == "image"
                else {"type": "text", "text": part["text"]}
                for part in content
            ]
        messages.append({"role": message["role"], "content": content})
    return messages


class OpenAIEngine(GenerationEngine):
    """Requests run concurrently, at most `spec.max_concurrency` at a time; the SDK retries transient errors.

    The API returns no token ids, so `token_ids` stays empty; `logprobs` (when requested and returned) has one
    value per returned token.
    """

    def __init__(self, spec: EngineSpec, *, max_retries: int = 2):
        import openai

        api_key = os.environ.get(spec.api_key_env)
        if api_key is None:
            raise RuntimeError(f"engine 'openai' reads its API key from ${spec.api_key_env}, which is not set")
        self.spec = spec
        self._omit = openai.omit  # leaves a parameter out of the request body
        self.client = openai.OpenAI(base_url=spec.base_url, api_key=api_key, timeout=spec.timeout_s,
                                    max_retries=max_retries)

    def generate(self, requests: list[ChatRequest], params: SamplingParams) -> list[list[Completion]]:
        with ThreadPoolExecutor(max_workers=self.spec.max_concurrency) as pool:
            futures = [pool.submit(self._complete, request, params) for request in requests]
            results = []
            for index, future in enumerate(futures):
                try:
                    results.append(future.result())
                except Exception as exc:
                    pool.shutdown(cancel_futures=True)
                    raise RequestFailed(index, exc) from exc
        return results

    def _complete(self, request: ChatRequest, params: SamplingParams) -> list[Completion]:
        response = self.client.chat.completions.create(
            model=self.spec.model,
            messages=openai_messages(request),
            n=params.n,
            temperature=params.temperature,
            top_p=params.top_p,
            max_tokens=params.max_new_tokens,
            seed=self._omit if params.seed is None else params.seed,
            logprobs=params.logprobs,
        )
        return [
            Completion(
                text=choice.message.content or "",
                logprobs=[token.logprob for token in choice.logprobs.content]
                if params.logprobs and choice.logprobs and choice.logprobs.content
                else None,
                finish_reason=choice.finish_reason,
            )
            for choice in sorted(response.choices, key=lambda choice: choice.index)
        ]

    def close(self) -> None:
        self.client.close()

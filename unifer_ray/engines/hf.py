"""Generation with transformers: batched, left-padded, on CPU or one GPU."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from transformers import GenerationConfig, PreTrainedModel

from unifer_ray.engines.base import ChatRequest, Completion, GenerationEngine, SamplingParams
from unifer_ray.engines.spec import EngineSpec
from unifer_ray.models.loading import load_model_and_processor


def chat_text(processor: Any, request: ChatRequest) -> str:
    """The prompt string of one conversation, ending with the opened assistant turn."""
    return processor.apply_chat_template(request.messages, add_generation_prompt=True, tokenize=False)


class HFEngine(GenerationEngine):
    """`model.generate` over chunks of `max_batch_size` requests.

    Sampling uses exactly the given parameters (temperature, top_p; no top-k, no repetition penalty), whatever the
    checkpoint's generation_config suggests. With a seed, request i draws its n samples from seed + i * n alone, the
    seed vLLMEngine gives request i (whose k-th sample vLLM then seeds with + k): a request's samples do not depend
    on the requests beside it, so a batch split over rollout workers draws what it draws whole. Seeded sampling
    therefore generates one request (its n samples) at a time.
    Token ids include the closing end-of-turn token when the model emitted one (as vLLM reports them);
    texts are decoded without special tokens. Log-probabilities are those of the sampled tokens under
    softmax(logits / temperature) (temperature 1 when greedy), before top-p truncation.
    """

    def __init__(self, model: PreTrainedModel, processor: Any, *, max_batch_size: int = 16):
        self.model = model
        self.processor = processor
        self.max_batch_size = max_batch_size
        tokenizer = processor.tokenizer
        eos = model.generation_config.eos_token_id
        if eos is None:
            eos = tokenizer.eos_token_id
        self.stop_ids = set(eos) if isinstance(eos, list) else {eos}
        pad = model.generation_config.pad_token_id
        self.pad_id = pad if pad is not None else tokenizer.pad_token_id

    @classmethod
    def from_spec(cls, spec: EngineSpec) -> HFEngine:
        model, processor = load_model_and_processor(spec.model, dtype=spec.dtype)
        return cls(model, processor, max_batch_size=spec.max_batch_size)

    def load_state_dict(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        """Copy new weights into the model in place; a partial state dict (one bucket of weights) is fine."""
        result = self.model.load_state_dict(state_dict, strict=False)
        if result.unexpected_keys:
            raise KeyError(f"weights not in the model: {sorted(result.unexpected_keys)[:5]}")

    def generate(self, requests: list[ChatRequest], params: SamplingParams) -> list[list[Completion]]:
        if params.seed is not None and params.temperature > 0:
            return [self._seeded(request, params, params.seed + i * params.n) for i, request in enumerate(requests)]
        results: list[list[Completion]] = []
        for start in range(0, len(requests), self.max_batch_size):
            results += self._generate_batch(requests[start : start + self.max_batch_size], params)
        return results

    def _seeded(self, request: ChatRequest, params: SamplingParams, seed: int) -> list[Completion]:
        with torch.random.fork_rng(devices=self._rng_devices()):
            torch.manual_seed(seed)
            return self._generate_batch([request], params)[0]

    def _rng_devices(self) -> list[int]:
        device = self.model.device
        return [device.index or 0] if device.type == "cuda" else []

    def _generation_config(self, params: SamplingParams, num_sequences: int) -> GenerationConfig:
        if params.temperature > 0:
            sampler = {"do_sample": True, "temperature": params.temperature, "top_p": params.top_p, "top_k": 0}
        else:
            # Greedy: transformers' neutral values, so that no checkpoint default (e.g. top_k=1) leaks in.
            sampler = {"do_sample": False, "temperature": 1.0, "top_p": 1.0, "top_k": 50}
        return GenerationConfig(
            **sampler,
            max_new_tokens=params.max_new_tokens,
            repetition_penalty=1.0,
            num_return_sequences=num_sequences,
            eos_token_id=sorted(self.stop_ids),
            pad_token_id=self.pad_id,
            return_dict_in_generate=True,
            output_logits=params.logprobs,
        )

    @torch.inference_mode()
    def _generate_batch(self, requests: list[ChatRequest], params: SamplingParams) -> list[list[Completion]]:
        texts = [chat_text(self.processor, r) for r in requests]
        images = [image for r in requests for image in r.images()]
        inputs = self.processor(
            text=texts, images=images or None, padding=True, padding_side="left", return_tensors="pt"
        ).to(self.model.device)
        # Greedy decoding gives one answer per prompt: decode once, repeat it n times.
        per_prompt = params.n if params.temperature > 0 else 1
        out = self.model.generate(**inputs, generation_config=self._generation_config(params, per_prompt))
        new_tokens = out.sequences[:, inputs["input_ids"].shape[1] :].tolist()
        logprobs = self._token_logprobs(out, params) if params.logprobs else None

        # Request i's samples are rows i*per_prompt ... ; greedy rows are read n times, as separate completions.
        rows = [[i * per_prompt + j % per_prompt for j in range(params.n)] for i in range(len(requests))]
        return [[self._completion(new_tokens[row], None if logprobs is None else logprobs[row]) for row in group]
                for group in rows]

    def _completion(self, tokens: list[int], logprobs: list[float] | None) -> Completion:
        end = next((i + 1 for i, token in enumerate(tokens) if token in self.stop_ids), None)
        kept = tokens[:end]  # a copy; after the stop token come only pad tokens
        return Completion(
            text=self.processor.tokenizer.decode(kept, skip_special_tokens=True),
            token_ids=kept,
            logprobs=None if logprobs is None else logprobs[: len(kept)],
            finish_reason="length" if end is None else "stop",
        )

    @staticmethod
    def _token_logprobs(out: Any, params: SamplingParams) -> list[list[float]]:
        logits = torch.stack(out.logits, dim=1).float()  # (sequences, new tokens, vocab), before any processing
        if params.temperature > 0:
            logits = logits / params.temperature
        chosen = out.sequences[:, -logits.shape[1] :]
        return torch.log_softmax(logits, dim=-1).gather(-1, chosen.unsqueeze(-1)).squeeze(-1).tolist()

"""Generation with vLLM (GPU): the same chat prompts as the hf engine, images as multi-modal data."""

from __future__ import annotations

import gc
from pathlib import Path

from transformers import AutoProcessor

from unifer_ray.engines.base import ChatRequest, Completion, GenerationEngine, SamplingParams
from unifer_ray.engines.hf import chat_text
from unifer_ray.engines.spec import EngineSpec


class VLLMEngine(GenerationEngine):
    """`vllm.LLM.generate` over all requests at once (vLLM batches and schedules them itself).

    With a seed, request i gets seed + i * n and vLLM gives its k-th sample seed + i * n + k, so no two samples
    share a seed. Log-probabilities are what vLLM reports for the sampled tokens: by default (logprobs_mode
    "raw_logprobs") they are taken before temperature; set `logprobs_mode: processed_logprobs` in `vllm_kwargs`
    to get them after temperature and top-p.
    """

    def __init__(self, spec: EngineSpec):
        try:
            import vllm
        except ImportError as exc:
            raise ImportError(
                "engine 'vllm' needs the vllm package and a CUDA GPU (pip install 'unifer-ray[vllm]'); "
                "on machines without them use engine 'hf' (or 'auto', which picks hf there)"
            ) from exc
        if not Path(spec.model).is_dir():
            raise FileNotFoundError(f"model directory {spec.model} does not exist (engine 'vllm' loads local directories)")
        self._vllm = vllm
        self.processor = AutoProcessor.from_pretrained(spec.model, local_files_only=True)
        llm_kwargs = {"dtype": spec.dtype, "limit_mm_per_prompt": {"image": 1}} | spec.vllm_kwargs
        self.llm = vllm.LLM(model=spec.model, **llm_kwargs)

    def generate(self, requests: list[ChatRequest], params: SamplingParams) -> list[list[Completion]]:
        prompts = []
        for request in requests:
            prompt = {"prompt": chat_text(self.processor, request)}
            if images := request.images():
                prompt["multi_modal_data"] = {"image": images}
            prompts.append(prompt)
        sampling = [
            self._vllm.SamplingParams(
                n=params.n,
                temperature=params.temperature,
                top_p=params.top_p,
                max_tokens=params.max_new_tokens,
                seed=None if params.seed is None else params.seed + i * params.n,
                logprobs=0 if params.logprobs else None,  # 0: only the sampled token's log-probability
            )
            for i in range(len(requests))
        ]
        outputs = self.llm.generate(prompts, sampling, use_tqdm=False)
        return [[self._completion(sample, params.logprobs) for sample in output.outputs] for output in outputs]

    @staticmethod
    def _completion(sample, with_logprobs: bool) -> Completion:
        token_ids = list(sample.token_ids)
        logprobs = None
        if with_logprobs:
            logprobs = [step[token].logprob for step, token in zip(sample.logprobs, token_ids)]
        return Completion(
            text=sample.text,
            token_ids=token_ids,
            logprobs=logprobs,
            finish_reason=sample.finish_reason,  # "stop", "length" (or "abort")
        )

    def close(self) -> None:
        # vLLM releases its GPU memory when the LLM object is collected.
        self.llm = None
        gc.collect()

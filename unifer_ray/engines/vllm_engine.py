"""Generation with vLLM 0.29 in this process: the CPU build here, the GPU build that Ray's LLM stack pins on clusters.

FERBench and curation batches do not come through here: they run vLLM in the Ray Data engine stage of
`engines/batch.py`. This class serves the callers that hold an engine themselves (RL rollout actors, tests). On CPUs
an engine of one rank runs inside the caller's process (5.6 s from `vllm.LLM(...)` to ready here, against 19.0 s with
vLLM's engine core and worker processes beside it: engines/vllm_env.py ONE_PROCESS_ENV); `EngineSpec.one_process`
says otherwise.
"""

from __future__ import annotations

import gc
from pathlib import Path

from transformers import AutoProcessor

from unifer_ray.engines.base import ChatRequest, Completion, GenerationEngine, SamplingParams
from unifer_ray.engines.hf import chat_text
from unifer_ray.engines.platform import CPU_ENGINE_DEFAULTS, NO_WHEEL_HINT, resolved_dtype
from unifer_ray.engines.spec import EngineSpec
from unifer_ray.engines.vllm_env import runs_in_one_process, vllm_env_applied

# Log-probabilities after temperature and top-p, i.e. of the distribution the tokens were sampled from: what
# importance sampling against the learner needs (vLLM's default is the raw logits' log-softmax).
DEFAULT_LLM_KWARGS = {"logprobs_mode": "processed_logprobs", "limit_mm_per_prompt": {"image": 1}}


def vllm_llm_kwargs(spec: EngineSpec, *, on_cpu: bool, seeded: bool = False) -> dict:
    """Keyword arguments for `vllm.LLM` / `engine_kwargs` of a spec: our defaults, then the spec's own.

    `on_cpu`: `dtype: auto` becomes the CPU's fast dtype, and the engine runs eager (engines/platform.py:
    `CPU_ENGINE_DEFAULTS`). `seeded` on a CPU: vLLM 0.29's CPU runner rewinds a seeded request's sampler after a
    partial (chunked) prefill, which CPU generators refuse ("CPU Generator does not use offset") and the engine dies;
    such engines prefill whole prompts."""
    kwargs = {"dtype": resolved_dtype(spec.dtype, on_cpu=on_cpu), **DEFAULT_LLM_KWARGS}
    if on_cpu:
        kwargs |= CPU_ENGINE_DEFAULTS
    if spec.revision is not None:  # a hub id's revision, for vLLM's own download (ray.data.llm's engine stage)
        kwargs |= {"revision": spec.revision, "tokenizer_revision": spec.revision}
    if seeded and on_cpu:
        whole = max(int(spec.vllm_kwargs.get("max_model_len", 0)), 16384)
        kwargs |= {"enable_chunked_prefill": False, "max_num_batched_tokens": whole}
    return kwargs | spec.vllm_kwargs


def sampling_params(params: SamplingParams, seed: int | None):
    """vLLM's sampling parameters for one request; the k-th of its n samples gets seed + k (vLLM's own rule)."""
    import vllm

    return vllm.SamplingParams(
        n=params.n,
        temperature=params.temperature,
        top_p=params.top_p,
        max_tokens=params.max_new_tokens,
        seed=seed,
        logprobs=0 if params.logprobs else None,  # 0: only the sampled token's log-probability
    )


class VLLMEngine(GenerationEngine):
    """`vllm.LLM.generate` over all requests at once (vLLM batches and schedules them itself).

    With a seed, request i gets seed + i * n and its k-th sample seed + i * n + k, so no two samples share a seed.
    Greedy decoding with n > 1 gives n equal completions. Token ids include the end-of-turn token when the model
    emitted one, and texts are decoded without special tokens, as the hf engine reports them.
    """

    def __init__(self, spec: EngineSpec):
        try:
            import vllm
        except ImportError as exc:
            raise ImportError(f"engine 'vllm' needs the vllm package ({exc}). {NO_WHEEL_HINT}; "
                              "elsewhere use engine 'hf' (or 'auto', which picks hf there)") from exc
        if not Path(spec.model).is_dir():
            raise FileNotFoundError(
                f"model directory {spec.model} does not exist (engine 'vllm' loads local directories)")
        self.processor = AutoProcessor.from_pretrained(spec.model, local_files_only=True)
        import torch

        # Requests here may be seeded (rollouts, tests): on CPUs whole-prompt prefill (see vllm_llm_kwargs).
        on_cpu = not torch.cuda.is_available()
        kwargs = vllm_llm_kwargs(spec, on_cpu=on_cpu, seeded=True)
        one_process = spec.one_process if spec.one_process is not None else runs_in_one_process(kwargs, on_cpu=on_cpu)
        with vllm_env_applied(one_process=one_process):
            self.llm = vllm.LLM(model=spec.model, **kwargs)

    def generate(self, requests: list[ChatRequest], params: SamplingParams) -> list[list[Completion]]:
        prompts = []
        for request in requests:
            prompt = {"prompt": chat_text(self.processor, request)}
            if images := request.images():
                prompt["multi_modal_data"] = {"image": images}
            prompts.append(prompt)
        sampling = [sampling_params(params, None if params.seed is None else params.seed + i * params.n)
                    for i in range(len(requests))]
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
        """Stop the engine's processes now and wait for them, rather than whenever the LLM object is collected."""
        if self.llm is not None:
            self.llm.llm_engine.engine_core.shutdown()
        self.llm = None
        gc.collect()

"""What an engine is made from: one typed spec, shared by every stage that generates."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class EngineSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    engine: Literal["auto", "hf", "vllm", "openai"] = "auto"  # auto: vllm wherever it is installed, else hf
    model: str  # hf/vllm: a local model directory, an s3:// prefix or a hub id (org/name); openai: the served name
    revision: str | None = None  # hf/vllm with a hub id: its branch, tag or commit (default: main)
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    max_batch_size: int = Field(16, gt=0)  # hf: requests per forward pass
    # openai: an OpenAI-compatible chat-completions endpoint
    base_url: str | None = None
    api_key_env: str = "OPENAI_API_KEY"  # the name of the variable holding the key, never the key
    max_concurrency: int = Field(8, gt=0)
    timeout_s: float = Field(120.0, gt=0)
    # vllm: extra keyword arguments for vllm.LLM / ray.data.llm's engine_kwargs (tensor_parallel_size,
    # gpu_memory_utilization, max_model_len, enable_prefix_caching...); they override DEFAULT_LLM_KWARGS
    vllm_kwargs: dict[str, Any] = Field(default_factory=dict)
    # vllm: the engine inside the process that holds it (a rollout actor, the Ray Data engine stage's actor), or in
    # vLLM's engine processes beside it. None: inside on CPUs with one rank (engines/vllm_env.py ONE_PROCESS_ENV),
    # beside it on GPUs; FERBench and curation with `false` run on ray.data.llm's engine stage (as GPU engines do).
    one_process: bool | None = None

"""One generation interface, three engines: vllm (the default, CPU or GPU), hf (the reference), openai (HTTP)."""

from __future__ import annotations

from unifer_ray.engines.base import ChatRequest, Completion, GenerationEngine, SamplingParams
from unifer_ray.engines.spec import EngineSpec

__all__ = ["ChatRequest", "Completion", "EngineSpec", "GenerationEngine", "SamplingParams", "create_engine",
           "engine_description", "engine_label", "resolve_engine"]


def resolve_engine(spec: EngineSpec) -> str:
    """The engine a spec names; `auto` is vllm wherever vLLM imports (its CPU or GPU build), else hf."""
    if spec.engine != "auto":
        return spec.engine
    from unifer_ray.engines.platform import vllm_version

    return "vllm" if vllm_version() is not None else "hf"


def engine_label(spec: EngineSpec) -> str:
    """What generated a result row: `vllm 0.29.0`, `hf` or `openai`."""
    kind = resolve_engine(spec)
    if kind == "vllm":
        from unifer_ray.engines.platform import vllm_version

        return f"vllm {vllm_version()}"
    return kind


def engine_description(spec: EngineSpec, *, on_cpu: bool) -> str:
    """What a stage generated with, for people: the engine and, for vLLM, the dtype it runs in."""
    label = engine_label(spec)
    if resolve_engine(spec) != "vllm":
        return label
    from unifer_ray.engines.platform import resolved_dtype

    dtype = resolved_dtype(spec.dtype, on_cpu=on_cpu)
    return f"{label} {dtype}" if dtype != "auto" else label


def create_engine(spec: EngineSpec) -> GenerationEngine:
    """The engine `spec` names; a local engine's s3:// model is copied to local disk first, and a hub id resolved to
    its snapshot in the Hugging Face cache (downloaded there unless offline)."""
    kind = resolve_engine(spec)
    if kind in ("hf", "vllm"):
        from unifer_ray.models.model_dir import local_model_dir

        spec = spec.model_copy(update={"model": local_model_dir(spec.model, revision=spec.revision), "revision": None})
    if kind == "hf":
        from unifer_ray.engines.hf import HFEngine

        return HFEngine.from_spec(spec)
    if kind == "vllm":
        from unifer_ray.engines.vllm_engine import VLLMEngine

        return VLLMEngine(spec)
    from unifer_ray.engines.openai_api import OpenAIEngine

    return OpenAIEngine(spec)

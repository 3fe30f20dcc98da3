"""One generation interface, three engines: hf (transformers), vllm (GPU), openai (HTTP API models)."""

from __future__ import annotations

from unifer_ray.engines.base import ChatRequest, Completion, GenerationEngine, SamplingParams
from unifer_ray.engines.spec import EngineSpec

__all__ = ["ChatRequest", "Completion", "EngineSpec", "GenerationEngine", "SamplingParams", "create_engine", "resolve_engine"]


def _vllm_importable() -> bool:
    try:
        import vllm  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_engine(spec: EngineSpec) -> str:
    """The engine a spec names; `auto` is vllm where vLLM and a CUDA GPU are present, else hf."""
    if spec.engine != "auto":
        return spec.engine
    import torch

    return "vllm" if torch.cuda.is_available() and _vllm_importable() else "hf"


def create_engine(spec: EngineSpec) -> GenerationEngine:
    """The engine `spec` names; a local engine's s3:// model is copied to local disk first."""
    kind = resolve_engine(spec)
    if kind in ("hf", "vllm"):
        from unifer_ray.models.model_dir import local_model_dir

        spec = spec.model_copy(update={"model": local_model_dir(spec.model)})
    if kind == "hf":
        from unifer_ray.engines.hf import HFEngine

        return HFEngine.from_spec(spec)
    if kind == "vllm":
        from unifer_ray.engines.vllm_engine import VLLMEngine

        return VLLMEngine(spec)
    from unifer_ray.engines.openai_api import OpenAIEngine

    return OpenAIEngine(spec)

"""Load a model and its processor from a local checkpoint directory: a real Qwen2.5-VL or the tiny model alike."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForImageTextToText, AutoProcessor, PreTrainedModel
from transformers.integrations import is_deepspeed_zero3_enabled

from unifer_ray.models.model_dir import local_model_dir

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """`auto` is bfloat16 on CUDA and float32 on CPU (CPU kernels for bf16 are slow and less exact)."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    try:
        return DTYPES[dtype]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; expected 'auto' or one of {sorted(DTYPES)}") from None


def load_model_and_processor(
    path: str | Path, *, dtype: str = "auto", device: str = "auto", revision: str | None = None
) -> tuple[PreTrainedModel, Any]:
    """The model (in eval mode, on `device`) and its processor, with left padding for batched generation.

    `path` is a local directory, an s3:// prefix copied to local disk once, or a hub id (at `revision`) resolved
    to its snapshot in the Hugging Face cache (models/model_dir.py).
    """
    path = Path(local_model_dir(str(path), revision=revision))
    if not path.is_dir():
        raise FileNotFoundError(
            f"model directory {path} does not exist (models are loaded from local directories only)")
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"model directory {path} has no config.json: not a saved transformers checkpoint")
    target = resolve_device(device)
    processor = AutoProcessor.from_pretrained(path, local_files_only=True)
    # Generation appends to the right end of every row, so prompts are padded on the left.
    processor.tokenizer.padding_side = "left"
    model = AutoModelForImageTextToText.from_pretrained(
        path, dtype=resolve_dtype(dtype, target), local_files_only=True
    )
    if not is_deepspeed_zero3_enabled():  # built partitioned, on this rank's device, by deepspeed.zero.Init
        model = model.to(target)
    return model.eval(), processor

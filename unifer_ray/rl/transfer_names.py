"""What the learners, the rollout actors and vLLM's side of the weight transfer (`vllm_transfer`) share, in a module
that imports no vLLM: `vllm_transfer` imports vLLM, and is loaded only where vLLM runs or NCCL sends.

- `SHM_BACKEND`: our CPU backend's name in vLLM's weight-transfer registry;
- `TRANSFER_REGISTRAR`: the class vLLM imports in every engine worker, which registers that backend;
- `file_format`: the weights under the names of the model's files, the names vLLM maps.
"""

from __future__ import annotations

from typing import Any

import torch

SHM_BACKEND = "unifer_shm"
TRANSFER_REGISTRAR = "unifer_ray.rl.vllm_transfer.RegisterTransferEngines"


def file_format(module: Any, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`state` named (and laid out) as in the model's files, as `save_pretrained` writes it. transformers 5 renames
    some weights on load (Qwen2.5-VL: visual.* → model.visual.*) and vLLM maps only the files' names: under the
    in-memory names it would load the language model and silently skip the vision tower."""
    from transformers.core_model_loading import revert_weight_conversion

    return revert_weight_conversion(module, state)

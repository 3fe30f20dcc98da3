"""What several test modules share."""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch

from unifer_ray.curate.config import CurateSource
from unifer_ray.curate.rlvr import make_tasks
from unifer_ray.curate.samples import source_rows
from unifer_ray.engines.base import ChatRequest
from unifer_ray.engines.hf import HFEngine, chat_text
from unifer_ray.engines.platform import vllm_installed
from unifer_ray.engines.processes import is_engine

# Installed but failing to import is not absence: such a machine fails the vLLM tests instead of skipping them.
NO_VLLM = "vLLM is not installed here (no vLLM wheel for this platform, or built with `make VLLM=no`)"
needs_vllm = pytest.mark.skipif(not vllm_installed(), reason=NO_VLLM)


# CPU engines run eager by default (one test keeps the compiled path: test_vllm_engine.py's greedy parity).
VLLM_TEST_KWARGS = {"max_model_len": 1024}


RUN_MARK = "UNIFER_TEST_RUN"  # set by conftest to the test run's pid: inherited by every process the run starts


def this_runs_engines() -> set[int]:
    """The pids of the vLLM engine processes this test run started (Ray's workers and their engines included)."""
    found = set()
    for process in psutil.process_iter():
        try:
            if is_engine(process) and process.environ().get(RUN_MARK) == os.environ[RUN_MARK]:
                found.add(process.pid)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


def wait_for_engines_to_end(timeout_s: float = 20.0) -> list[psutil.Process]:
    """This run's engine processes still alive after `timeout_s` (exits may be under way)."""
    survivors = []
    for pid in this_runs_engines():
        with contextlib.suppress(psutil.NoSuchProcess):
            survivors.append(psutil.Process(pid))
    return psutil.wait_procs(survivors, timeout=timeout_s)[1]


# ---------------------------------------------------------------- RLVR runs of the tests

PROMPTS, GROUP = 2, 4
# Prefix caching on (vLLM's default, said out loud): a push that left old KV in the cache would show in the outputs.
VLLM = {"enable_prefix_caching": True, "max_model_len": 1024}


def write_rlvr_set(synthetic_root: Path, path: Path) -> Path:
    """RLVR items (the released format) for the synthetic RAF-DB train images, one multiple-choice question each."""
    rows, errors = source_rows(CurateSource(dataset="rafdb", root=str(synthetic_root / "RAF-DB")))
    assert not errors
    rng = np.random.default_rng(0)
    with open(path, "w") as f:
        for row in rows:
            [task] = make_tasks(row["label"], row["candidate_labels"], ["mc"], rng)
            f.write(json.dumps({"image_path": row["image_path"], "problem": task["problem"],
                                "solution": task["solution"], "id": row["id"], "task": "mc"}) + "\n")
    return path


def rl_config(tmp: Path, model_dir: Path, synthetic_root: Path, **changes) -> dict:
    data = write_rlvr_set(synthetic_root, tmp / "rlvr.jsonl")
    config = {
        "model": str(model_dir),
        "data": {"paths": [str(data)], "image_root": str(synthetic_root), "image_size": 56},
        "output_dir": str(tmp / "model"), "checkpoint_dir": str(tmp / "checkpoints"), "log_dir": str(tmp / "logs"),
        "steps": 2, "seed": 0,
        # auto: vLLM wherever it is installed, else transformers
        "rollout": {"num_workers": 1, "engine": {"engine": "auto", "vllm_kwargs": VLLM}, "num_cpus": 1},
        "learner": {"num_workers": 1, "num_cpus": 1, "strategy": "ddp", "micro_batch_size": 8,
                    "optimizer": {"lr": 1e-3, "warmup_ratio": 0.0}},
        "grpo": {"group_size": GROUP, "prompts_per_step": PROMPTS, "max_new_tokens": 12, "beta": 0.04},
        "checkpoint_every": 1, "sample_log_every": 1,
    }
    for key, value in changes.items():
        config[key] = config[key] | value if isinstance(value, dict) else value
    return config


# ---------------------------------------------------------------- engines

def recomputed_logprobs(engine: HFEngine, request: ChatRequest, token_ids: list[int], temperature: float
                        ) -> list[float]:
    """Log-probabilities of `token_ids` after the prompt, from one plain forward pass."""
    inputs = engine.processor(text=[chat_text(engine.processor, request)], images=request.images() or None,
                              return_tensors="pt")
    prompt_len = inputs["input_ids"].shape[1]
    inputs["input_ids"] = torch.cat([inputs["input_ids"], torch.tensor([token_ids])], dim=1)
    inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
    generated_types = torch.zeros(1, len(token_ids), dtype=torch.long)
    inputs["mm_token_type_ids"] = torch.cat([inputs["mm_token_type_ids"], generated_types], dim=1)
    with torch.inference_mode():
        logits = engine.model(**inputs).logits[0, prompt_len - 1 : -1].float()
    logprobs = torch.log_softmax(logits / temperature, dim=-1)
    return logprobs.gather(-1, torch.tensor(token_ids).unsqueeze(-1)).squeeze(-1).tolist()

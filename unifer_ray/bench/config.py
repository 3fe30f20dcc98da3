"""FERBench run configuration."""

from __future__ import annotations

import re

from pydantic import BaseModel, ConfigDict, Field, field_validator

from unifer_ray.engines.base import SamplingParams
from unifer_ray.engines.batch import EngineWorkers
from unifer_ray.engines.spec import EngineSpec


class BenchFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    path: str  # a FERBench file: the reference JSON array, or JSONL; local or s3://
    image_root: str  # items' image_path is read below this root
    dataset: str | None = None  # inferred from the candidate labels when absent
    limit: int | None = Field(None, gt=0)  # the first N valid items only (smoke runs)


class BenchModel(EngineWorkers):
    """One model of the benchmark: its engine, decoding, and the workers that run it (batch_size, concurrency...)."""

    name: str  # the model's name in results and the leaderboard
    engine: EngineSpec
    sampling: SamplingParams = SamplingParams(max_new_tokens=512)
    image_size: int = Field(224, gt=0)  # the paper resizes every image to 224×224
    # Only the first N items of each dataset (None: all): a glance, e.g. at a random-init base model, whose
    # 128-token answers say nothing more on 900 items than on 60.
    items_per_dataset: int | None = Field(None, gt=0)

    @field_validator("name")
    @classmethod
    def _safe_name(cls, name: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9._-]+", name):
            raise ValueError(f"model name {name!r} may use letters, digits, '.', '_' and '-' only (it names files)")
        return name


class BenchConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    files: list[BenchFile] = Field(min_length=1)
    models: list[BenchModel] = Field(min_length=1)
    out_dir: str  # local or s3://
    load_num_cpus: float = Field(0.5, gt=0)  # per image-decoding task (one per engine batch)
    # Models benchmarked at once, each its own Ray Data run: their engines start side by side. Every run's engines,
    # request actors AND a decode task must fit in the cluster together, or the runs wait on each other for ever
    # (the demo's three on 4 logical CPUs did: 3 x (1 + 0.25) left no 0.5 CPU for decoding): run_bench runs only as
    # many at once as fit the cluster's CPUs (runner.models_side_by_side).
    models_at_once: int = Field(1, gt=0)

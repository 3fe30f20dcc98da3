"""SFT configuration: the `sft:` section of a YAML file."""

from __future__ import annotations

import posixpath
import re

from pydantic import Field, model_validator

from unifer_ray import storage
from unifer_ray.parallel import ParallelConfig


class SFTConfig(ParallelConfig):
    """The workers, parallelism and optimizer fields are ParallelConfig's (shared with the RL learners)."""

    # What to train on what, and where the result goes.
    # The starting checkpoint (a real Qwen2.5-VL or the tiny model): a Hugging Face directory, local or s3://, or a
    # hub id (org/name) at `revision` (a branch, tag or commit; default main).
    model: str
    revision: str | None = None
    data: list[str] = Field(min_length=1)  # CoT files or directories of them (.json/.jsonl/.parquet, local or s3://)
    image_root: str | None = None  # items' image_path is read below this root (local or s3://)
    output_dir: str  # the final model, a Hugging Face directory (model + processor); local or s3://
    # Ray Train's run directory (checkpoints), local or s3://; a rerun with the same directory resumes.
    checkpoint_dir: str
    log_dir: str | None = None  # metrics.jsonl + tensorboard/ (local); default <checkpoint_dir>/logs

    # Batches and schedule. One optimizer step sees micro_batch_size × num_workers × grad_accum_steps rows.
    grad_accum_steps: int = Field(1, gt=0)
    epochs: int = Field(1, gt=0)
    max_steps: int | None = Field(None, gt=0)  # optimizer steps to run, overriding epochs (data repeats)
    image_size: int = Field(224, gt=0)  # images are resized to image_size × image_size, as in FERBench
    max_seq_len: int = Field(4096, gt=0)  # longer rows are skipped as errors, never truncated
    shuffle_buffer: int = Field(10_000, gt=0)  # rows in each epoch's seeded local shuffle
    seed: int = 0

    # Checkpoints, failures, logs.
    checkpoint_every: int = Field(100, gt=0)  # optimizer steps; the last step is always checkpointed
    keep_checkpoints: int = Field(2, gt=0)  # the best k by training loss (the latest is kept as well)
    max_failures: int = Field(0, ge=-1)  # worker-group restarts from the latest checkpoint; -1: unlimited
    report_every: int = Field(1, gt=0)  # steps per ray.train.report (every step is logged either way)

    @model_validator(mode="after")
    def _check(self) -> SFTConfig:
        if self.log_dir is None and storage.is_s3(self.checkpoint_dir):
            raise ValueError("log_dir: required when checkpoint_dir is s3:// (TensorBoard writes local files)")
        if not re.fullmatch(r"[A-Za-z0-9._-]+", self.run_name):
            raise ValueError(f"checkpoint_dir: its last component {self.run_name!r} names the Ray Train run: "
                             "letters, digits, '.', '_' or '-' only")
        return self

    @property
    def global_batch_size(self) -> int:
        return self.micro_batch_size * self.num_workers * self.grad_accum_steps

    @property
    def storage_path(self) -> str:
        """Ray Train's storage_path: checkpoint_dir's parent (the run's name is its last component)."""
        return posixpath.dirname(self.checkpoint_dir.rstrip("/")) or "."

    @property
    def run_name(self) -> str:
        return posixpath.basename(self.checkpoint_dir.rstrip("/"))

    @property
    def metrics_dir(self) -> str:
        return self.log_dir or storage.join(self.checkpoint_dir, "logs")

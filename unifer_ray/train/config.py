"""SFT configuration: the `sft:` section of a YAML file."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from unifer_ray import storage


class OptimizerConfig(BaseModel):
    """AdamW with linear warmup, then cosine decay to `min_lr_ratio` × lr at the last step."""

    model_config = ConfigDict(extra="forbid")

    lr: float = Field(1e-5, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = Field(1e-8, gt=0)
    warmup_ratio: float = Field(0.03, ge=0, lt=1)  # share of the optimizer steps spent warming up
    min_lr_ratio: float = Field(0.0, ge=0, le=1)
    max_grad_norm: float = Field(1.0, gt=0)  # gradients are clipped to this global norm
    # The vision tower (blocks and merger) trains at lr × vision_lr_ratio. A randomly initialised tower trained at
    # the full rate collapses its image tokens into one shared vector the language model uses as context; slower,
    # it keeps the per-image information while the language model learns to read it.
    vision_lr_ratio: float = Field(1.0, ge=0)


class SFTConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # What to train on what, and where the result goes.
    model: str  # the starting checkpoint: a local Hugging Face directory (a real Qwen2.5-VL or the tiny model)
    data: list[str] = Field(min_length=1)  # CoT files or directories of them (.json/.jsonl/.parquet, local or s3://)
    image_root: str | None = None  # items' image_path is read below this root (local or s3://)
    output_dir: str  # the final model, a Hugging Face directory (model + processor); local or s3://
    storage_path: str  # Ray Train's run directory: checkpoints, local or s3://
    run_name: str = Field("sft", pattern=r"^[A-Za-z0-9._-]+$")  # a rerun with the same name resumes
    log_dir: str | None = None  # metrics.jsonl + tensorboard/ (local); default <storage_path>/<run_name>/logs

    # Workers and parallelism.
    num_workers: int = Field(1, gt=0)
    use_gpu: bool = False
    cpus_per_worker: float = Field(1.0, gt=0)  # fractional on small machines
    torch_threads: int = Field(1, gt=0)  # CPU threads per worker (ignored on GPU)
    strategy: Literal["deepspeed", "ddp"] = "deepspeed"
    zero_stage: Literal[2, 3] = 2  # deepspeed only
    precision: Literal["auto", "bf16", "fp32"] = "auto"  # auto: bf16 on GPU, fp32 on CPU
    gradient_checkpointing: bool = False
    freeze_vision_tower: bool = False  # the vision blocks stay fixed; the merger (projector) still trains

    # Batches and schedule. One optimizer step sees micro_batch_size × num_workers × grad_accum_steps rows.
    micro_batch_size: int = Field(1, gt=0)  # rows per worker per forward pass
    grad_accum_steps: int = Field(1, gt=0)
    epochs: int = Field(1, gt=0)
    max_steps: int | None = Field(None, gt=0)  # optimizer steps to run, overriding epochs (data repeats)
    image_size: int = Field(224, gt=0)  # images are resized to image_size × image_size, as in FERBench
    max_seq_len: int = Field(4096, gt=0)  # longer rows are skipped as errors, never truncated
    shuffle_buffer: int = Field(10_000, gt=0)  # rows in each epoch's seeded local shuffle
    optimizer: OptimizerConfig = OptimizerConfig()
    seed: int = 0

    # Checkpoints, failures, logs.
    checkpoint_every: int = Field(100, gt=0)  # optimizer steps; the last step is always checkpointed
    keep_checkpoints: int = Field(2, gt=0)  # the best k by training loss (the latest is kept as well)
    max_failures: int = Field(0, ge=-1)  # worker-group restarts from the latest checkpoint; -1: unlimited
    report_every: int = Field(1, gt=0)  # steps per ray.train.report (every step is logged either way)

    @model_validator(mode="after")
    def _check(self) -> SFTConfig:
        if self.log_dir is None and storage.is_s3(self.storage_path):
            raise ValueError("log_dir: required when storage_path is s3:// (TensorBoard writes local files)")
        if self.precision == "bf16" and not self.use_gpu:
            raise ValueError("precision: bf16 needs use_gpu (CPU training runs in fp32)")
        return self

    @property
    def global_batch_size(self) -> int:
        return self.micro_batch_size * self.num_workers * self.grad_accum_steps

    @property
    def bf16(self) -> bool:
        return self.precision == "bf16" or (self.precision == "auto" and self.use_gpu)

    @property
    def metrics_dir(self) -> str:
        return self.log_dir or storage.join(self.storage_path, self.run_name, "logs")

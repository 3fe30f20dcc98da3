"""`unifer sft`: cold-start SFT as one Ray Train run, ending with the model as a Hugging Face directory.

    CoT set (Ray Data, seeded shuffle) → TorchTrainer workers (DeepSpeed ZeRO or DDP)
    → checkpoints in checkpoint_dir → the final checkpoint's model/ copied to output_dir

A rerun with the same checkpoint_dir resumes from the latest checkpoint.
"""

from __future__ import annotations

import logging
import os
import posixpath
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import ray
from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from unifer_ray import placement, storage
from unifer_ray.data.training_sets import read_cot
from unifer_ray.progress import Progress, polling
from unifer_ray.ray_runtime import THREAD_ENV
from unifer_ray.runlog import ERRORS_FILE, METRICS_FILE, read_run_log
from unifer_ray.train.config import SFTConfig
from unifer_ray.train.loop import COLUMNS, MODEL_DIR, StepPlan, train_loop_per_worker
from unifer_ray.train.reports import LogReports

log = logging.getLogger(__name__)


@dataclass
class SFTResult:
    model_dir: str  # the exported Hugging Face directory (output_dir)
    steps: int
    loss: float  # mean training loss over the last reported steps
    seconds: float
    checkpoint: str  # the final checkpoint: a directory (local or s3://) in checkpoint_dir
    metrics_path: str
    errors_path: str


def follow_run_log(log_dir: str, progress: Progress) -> Callable[[], None]:
    """A poll (for `polling`) that moves `progress` to the last step logged in `log_dir`."""
    def poll() -> None:
        records = read_run_log(log_dir)
        if records and records[-1]["step"] != progress.n:
            record = records[-1]
            progress.update(record["step"], loss=record["loss"], lr=f"{record['lr']:.2e}",
                            tok_s=round(record["tokens_per_s"]))

    return poll


def training_rows(config: SFTConfig) -> ray.data.Dataset:
    """The CoT rows workers read, shuffled once with the run's seed and held in the object store. A curation run writes
    its rows in the order its tasks end, in as many shards as it likes, and a seeded shuffle's order depends on the
    order and blocks it starts from: so the same rows start as one block in id order, whatever the files."""
    ds = read_cot(config.data, config.image_root).select_columns(list(COLUMNS))
    # One block sorted in place: the same order as a distributed sort's, without its sample and shuffle tasks
    # (15.0 s against 20.3 on a fresh 2-core AVX2 EPYC's cluster, the demo's CoT set).
    return ds.repartition(1).sort("id").random_shuffle(seed=config.seed).materialize()


def scaling_config(config: SFTConfig) -> ScalingConfig:
    """The workers on learner nodes, placed by the config's strategy (STRICT_PACK: one node's NVLink)."""
    return ScalingConfig(num_workers=config.num_workers, use_gpu=config.use_gpu,
                         resources_per_worker={"CPU": config.num_cpus}, placement_strategy=config.placement_strategy,
                         **placement.actor_options("learner"))


def run_sft(config: SFTConfig) -> SFTResult:
    started = time.perf_counter()
    rows = training_rows(config)
    num_rows = rows.count()
    plan = StepPlan.of(config, num_rows)
    log.info("SFT: %d rows, %d steps of %d rows (%d per epoch), %s on %d worker(s)", num_rows, plan.total_steps,
             config.global_batch_size, plan.steps_per_epoch, config.strategy, config.num_workers)

    fs, storage_dir = storage.filesystem(config.storage_path)
    finished = finished_run(config, plan)
    if finished is not None:
        log.info("SFT: %s already ran its %d steps: no training, its final model is exported again",
                 config.checkpoint_dir, plan.total_steps)
        return exported_result(config, finished, started, plan)
    execution = DataConfig.default_ingest_options()
    execution.preserve_order = True  # every worker, every attempt: the same order of rows
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"sft": config.model_dump(), "num_rows": num_rows},
        scaling_config=scaling_config(config),
        run_config=RunConfig(
            name=config.run_name,
            storage_path=storage_dir,
            storage_filesystem=fs,
            failure_config=FailureConfig(max_failures=config.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=config.keep_checkpoints,
                                               checkpoint_score_attribute="loss", checkpoint_score_order="min"),
            callbacks=[LogReports(config.metrics_dir)],
            worker_runtime_env={"env_vars": THREAD_ENV},
        ),
        datasets={"train": rows},
        # Not split: each worker takes its slice of every global batch (see train/loop.py).
        dataset_config=DataConfig(datasets_to_split=[], execution_options=execution),
    )
    with Progress("sft", plan.total_steps, "step") as progress, polling(follow_run_log(config.metrics_dir, progress)):
        result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"SFT run {config.run_name} ended without a checkpoint")
    return exported_result(config, result, started, plan)


def finished_run(config: SFTConfig, plan: StepPlan) -> ray.train.Result | None:
    """The result of an earlier run in checkpoint_dir whose latest checkpoint is its last step, as Ray Train
    recorded it; None when there is none. Such a run has nothing left to train: starting Ray Train's controller and
    workers only to have them find that out costs a few seconds of processes a worker."""
    fs, path = storage.filesystem(config.checkpoint_dir)
    try:
        result = ray.train.Result.from_path(path, storage_filesystem=fs)
    except RuntimeError:  # no such directory, or none Ray Train recorded a checkpoint in
        return None
    if result.checkpoint is None or (result.metrics or {}).get("step") != plan.total_steps:
        return None
    return result


def exported_result(config: SFTConfig, result: ray.train.Result, started: float, plan: StepPlan) -> SFTResult:
    """Copy the model exported in `result`'s final checkpoint to output_dir."""
    with result.checkpoint.as_directory() as directory:
        exported = Path(directory) / MODEL_DIR
        if not exported.is_dir():
            raise RuntimeError(f"the final checkpoint {result.checkpoint.path} holds no {MODEL_DIR}/ directory")
        storage.copy_tree(exported, config.output_dir)
    metrics = result.metrics or {}
    return SFTResult(
        model_dir=config.output_dir,
        steps=int(metrics.get("step", plan.total_steps)),
        loss=float(metrics.get("loss", float("nan"))),
        seconds=time.perf_counter() - started,
        checkpoint=storage.join(config.checkpoint_dir, posixpath.basename(result.checkpoint.path)),
        metrics_path=os.path.join(config.metrics_dir, METRICS_FILE),
        errors_path=os.path.join(config.metrics_dir, ERRORS_FILE),
    )

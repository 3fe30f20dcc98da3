"""The training loop every Ray Train worker runs: stream, collate, step, report, checkpoint, resume.

Data: every worker streams the same seeded order of CoT rows (text only, cheap) and takes its own slice of each
global micro-batch, then loads just its slice's images. A global batch is therefore the same rows whatever the
number of workers (while shuffle_buffer holds the whole set: Ray Data's local shuffle starts each new shuffled
generation at a batch boundary, and the batch size is micro_batch_size × workers), and a resumed run skips exactly
the rows it already trained on: the data position is the step.
"""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
import torch.nn.functional as F

from unifer_ray.parallel import DataParallel, load_trainable, prepare_model, seed_everything
from unifer_ray.train.collate import IGNORE, Batch, SFTCollator
from unifer_ray.train.config import SFTConfig

COLUMNS = ("id", "image_uri", "question", "response", "source", "row")  # what a worker reads of a CoT row
TRAIN_STATE = "train_state.json"  # the step (= data position) inside a checkpoint
MODEL_DIR = "model"  # the exported Hugging Face model inside the final checkpoint


@dataclass(frozen=True)
class StepPlan:
    steps_per_epoch: int
    total_steps: int

    @classmethod
    def of(cls, config: SFTConfig, num_rows: int) -> StepPlan:
        per_epoch = num_rows // config.global_batch_size  # the remainder of an epoch is dropped
        if per_epoch == 0:
            raise ValueError(f"{num_rows} training rows make no global batch of {config.global_batch_size} "
                             "(micro_batch_size × num_workers × grad_accum_steps)")
        return cls(per_epoch, config.max_steps or per_epoch * config.epochs)


def step_groups(shard, config: SFTConfig, *, epoch: int, skip_steps: int, rank: int,
                world: int) -> Iterator[list[list[dict]]]:
    """One epoch's optimizer steps from `skip_steps` on; each step is `grad_accum_steps` micro-batches of this
    worker's rows. The order is seeded per epoch, the same on every worker and in every attempt."""
    micro = config.micro_batch_size
    batches = shard.iter_batches(batch_size=micro * world, batch_format="pyarrow", drop_last=True,
                                 local_shuffle_buffer_size=config.shuffle_buffer,
                                 local_shuffle_seed=config.seed + epoch)
    group: list[list[dict]] = []
    for index, batch in enumerate(batches):
        if index < skip_steps * config.grad_accum_steps:
            continue
        group.append(batch.select(COLUMNS).slice(rank * micro, micro).to_pylist())
        if len(group) == config.grad_accum_steps:
            yield group
            group = []


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.tolist()


def token_loss_sum(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """Summed next-token cross-entropy over the labelled tokens (labels are -100 elsewhere).

    Logits are computed only from the position before the batch's first labelled token on: the prompt's positions
    (system and user turns, image tokens) need none, and a 150k-word vocabulary makes them the largest tensor.
    """
    labels = inputs["labels"]
    first = max(1, int((labels != IGNORE).int().argmax(dim=1).min()))
    keep = labels.shape[1] - first + 1  # positions first-1 … end; position p predicts token p+1
    logits = model(**{k: v for k, v in inputs.items() if k != "labels"}, use_cache=False, logits_to_keep=keep).logits
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, first:].flatten(),
                           ignore_index=IGNORE, reduction="sum")


def restore(parallel: DataParallel, checkpoint: ray.train.Checkpoint | None) -> int:
    """Load the latest checkpoint's weights, optimizer and scheduler; the step to continue from (0 when fresh)."""
    if checkpoint is None:
        return 0
    with checkpoint.as_directory() as directory:
        parallel.load(Path(directory))
        return json.loads((Path(directory) / TRAIN_STATE).read_text())["step"]


class Stepper:
    """One optimizer step over this worker's micro-batches: the loss is the mean over every labelled token of the
    global batch (all workers, all micro-batches), whatever the number of workers."""

    def __init__(self, parallel: DataParallel, collator: SFTCollator, device: torch.device, rank: int):
        self.parallel, self.collator, self.device, self.rank = parallel, collator, device, rank
        self.fallback: Batch | None = None  # a worker left with an empty micro-batch replays this one, unweighted

    def __call__(self, group: list[list[dict]], step: int) -> tuple[dict, list[dict]]:
        """The step's record (loss, lr, grad norm, tokens/s...) and the rows it had to drop."""
        started = time.perf_counter()
        batches = [self.collator(rows) for rows in group]
        label_tokens, tokens, rows = all_reduce_sum(
            [sum(b.num_label_tokens for b in batches), sum(b.num_tokens for b in batches),
             sum(len(b.ids) for b in batches)], self.device)
        if label_tokens == 0:
            raise RuntimeError(f"step {step}: no usable row in the whole global batch; see the errors")
        lr = self.parallel.lr()  # this step's: DeepSpeed schedules the next one inside the last micro-step
        loss_sum = 0.0
        for i, batch in enumerate(batches):
            weight = 1.0 / label_tokens  # the micro-batch's share of the global batch's mean token loss
            if not batch.ids:  # every collective must still meet: replay an earlier batch, without gradient
                if self.fallback is None:
                    raise RuntimeError(f"rank {self.rank}: no usable row in its first micro-batch; see the errors")
                batch, weight = self.fallback, 0.0
            self.fallback = batch
            inputs = {k: v.to(self.device) for k, v in batch.inputs.items()}

            def loss_fn(model, inputs=inputs, weight=weight):
                loss = token_loss_sum(model, inputs)
                return loss * weight, loss.item()

            loss = self.parallel.micro_step(loss_fn, last=i == len(batches) - 1)
            loss_sum += loss if weight else 0.0
        grad_norm = self.parallel.step()
        (loss_sum,) = all_reduce_sum([loss_sum], self.device)
        seconds = time.perf_counter() - started
        record = {"step": step, "loss": loss_sum / label_tokens, "lr": lr, "grad_norm": grad_norm,
                  "tokens_per_s": tokens / seconds, "rows": int(rows), "label_tokens": int(label_tokens),
                  "step_time_s": seconds}
        return record, [error for batch in batches for error in batch.errors]


def train_loop_per_worker(loop_config: dict) -> None:
    config = SFTConfig.model_validate(loop_config["sft"])
    plan = StepPlan.of(config, loop_config["num_rows"])
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    if device.type == "cpu":
        torch.set_num_threads(config.torch_threads)
    seed_everything(config.seed)

    settings = config.settings(grad_accum_steps=config.grad_accum_steps, total_steps=plan.total_steps)
    model, processor = load_trainable(config.model, settings, device, revision=config.revision)
    prepare_model(model, config)
    parallel = DataParallel(model, settings)
    start_step = step = restore(parallel, ray.train.get_checkpoint())
    stepper = Stepper(parallel, SFTCollator(processor, image_size=config.image_size, max_seq_len=config.max_seq_len),
                      device, rank)
    shard = ray.train.get_dataset_shard("train")

    records: list[dict] = []
    errors: list[dict] = []
    while step < plan.total_steps:
        epoch, in_epoch = divmod(step, plan.steps_per_epoch)
        for group in step_groups(shard, config, epoch=epoch, skip_steps=in_epoch, rank=rank, world=world):
            step += 1
            record, dropped = stepper(group, step)
            records.append(record | {"epoch": epoch})
            errors += dropped

            final = step == plan.total_steps
            checkpoint_now = final or step % config.checkpoint_every == 0
            if checkpoint_now or step % config.report_every == 0:
                report = {"step": step, "total_steps": plan.total_steps, "start_step": start_step,
                          "loss": float(np.mean([r["loss"] for r in records])), "records": records,
                          "errors": errors}
                if checkpoint_now:
                    save_and_report(parallel, processor, report, rank=rank, export=final)
                else:
                    ray.train.report(report)
                records, errors = [], []
            if final or step % plan.steps_per_epoch == 0:
                break
        else:
            raise RuntimeError(f"epoch {epoch} ran out of rows at step {step}; {plan.steps_per_epoch} steps expected")


def checkpoint_dir_name(step: int) -> str:
    """A checkpoint's directory in checkpoint_dir, named by its step.

    A worker killed while the checkpoint of step s is being written leaves a directory Ray Train never registered,
    so never prunes. The next attempt resumes from an earlier step and writes step s again: with the name fixed by
    the step, that write replaces the leftover, and the directory is pruned like any other checkpoint.
    """
    return f"checkpoint_{step:08d}"


def save_and_report(parallel: DataParallel, processor, report: dict, *, rank: int, export: bool) -> None:
    """Save this worker's part of the training state (with `export`, also the Hugging Face model) and report it.

    Ray Train merges the workers' directories into one checkpoint in checkpoint_dir.
    """
    with tempfile.TemporaryDirectory(prefix="sft-checkpoint-") as tmp:
        directory = Path(tmp)
        parallel.save(directory)
        state = parallel.full_state() if export else None  # collective under ZeRO-3
        if rank == 0:
            (directory / TRAIN_STATE).write_text(json.dumps({"step": report["step"]}))
            if export:
                parallel.module.save_pretrained(directory / MODEL_DIR, state_dict=state)
                processor.save_pretrained(directory / MODEL_DIR)
        checkpoint = ray.train.Checkpoint.from_directory(tmp)  # every rank saved its part (at least its RNG state)
        ray.train.report(report, checkpoint=checkpoint, checkpoint_dir_name=checkpoint_dir_name(report["step"]))

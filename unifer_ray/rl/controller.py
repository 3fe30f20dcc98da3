"""`unifer rlvr`: GRPO with separate rollout and learner actors, driven by one loop that reads like one process.

    rollouts = RolloutGroup(...)   N actors, each one GenerationEngine
    learners = LearnerGroup(...)   M actors, one torch.distributed group, DeepSpeed or DDP
    sync = WeightSync.create(...)  vLLM's weight-transfer API (shared memory or NCCL), versioned, caches reset
    for each step: generate → score → advantages → train → sync → log → checkpoint

`one_step_off` changes only when a step's generation is asked for: before the previous step trains, so rollouts and
training overlap and each sample is at most one policy version old (the lag is recorded per step).
"""

from __future__ import annotations

import logging
import time
from contextlib import ExitStack
from dataclasses import dataclass

import numpy as np

from unifer_ray import storage
from unifer_ray.engines import SamplingParams
from unifer_ray.progress import Progress
from unifer_ray.rl.checkpoint import RunState, commit, latest, learner_uri, step_uri
from unifer_ray.rl.config import RLVRConfig
from unifer_ray.rl.grpo import group_advantages, sequence_weights
from unifer_ray.rl.learner import LearnerGroup, TrainRow
from unifer_ray.rl.prompts import PromptSource
from unifer_ray.rl.rewards import RewardSet, accuracy_reward, format_reward
from unifer_ray.rl.rollout import PendingRollout, Rollout, RolloutGroup
from unifer_ray.rl.weight_sync import WeightSync
from unifer_ray.runlog import METRICS_FILE, RunLog

log = logging.getLogger(__name__)


@dataclass
class RLVRResult:
    model_dir: str  # the final policy, a Hugging Face directory
    steps: int
    policy_version: int
    seconds: float
    metrics_path: str


@dataclass
class ScoredBatch:
    rows: list[TrainRow]  # what the learners train on, one row per completion
    record: dict  # the step's sample metrics
    samples: list[dict]  # per-completion log rows


def rollout_seed(seed: int, step: int, batch_size: int) -> int:
    """The first seed of step `step`'s batch: the rollouts give prompt i's k-th sample this + i * G + k, so every
    (run seed, step, prompt, sample) has a seed of its own (runs' seeds are 2**32 apart)."""
    return seed * 2**32 + step * batch_size


def score(rollout: Rollout, rewards: RewardSet, config: RLVRConfig, *, learner_version: int, step: int) -> ScoredBatch:
    """Rewards, group-normalised advantages and loss weights of a generated batch."""
    grpo = config.grpo
    completions = [c for group in rollout.completions for c in group]
    items = [item for item, group in zip(rollout.items, rollout.completions) for _ in group]
    texts = [c.text for c in completions]
    total, per_function = rewards.score(texts, items)
    advantages, all_equal = group_advantages(total.reshape(len(rollout.items), grpo.group_size), grpo.advantage,
                                             eps=grpo.std_eps)
    advantages = advantages.reshape(-1)
    lengths = np.array([len(c.token_ids) for c in completions])
    weights = sequence_weights(lengths, grpo.aggregation, grpo.max_new_tokens)
    versions = np.repeat(rollout.versions, grpo.group_size)
    lags = learner_version - versions
    if lags.max() > (0 if config.mode == "sync" else 1) or lags.min() < 0:
        raise RuntimeError(f"step {step}: samples of policy versions {sorted(set(versions.tolist()))} for learner "
                           f"version {learner_version} break the {config.mode} staleness bound")

    correct = np.asarray(accuracy_reward(texts, [i["solution"] for i in items], answers=[i["answer"] for i in items]))
    tasks = np.array([item.get("task") or "untyped" for item in items])
    rows = [TrainRow(image_uri=item["image_uri"], problem=item["problem"], completion_ids=c.token_ids,
                     advantage=float(a), weight=float(w), rollout_logprobs=c.logprobs)
            for item, c, a, w in zip(items, completions, advantages, weights)]
    record = {
        "prompts": len(rollout.items),
        "samples": len(completions),
        "reward/mean": float(total.mean()),
        "reward/std": float(total.std()),
        "accuracy": float(correct.mean()),
        "format_rate": float(np.mean(format_reward(texts, [i["solution"] for i in items]))),
        "groups_all_equal": int(all_equal.sum()),
        "groups_all_equal_fraction": float(all_equal.mean()),
        "response_length/mean": float(lengths.mean()),
        "response_length/max": int(lengths.max()),
        "truncated_fraction": float(np.mean([c.finish_reason == "length" for c in completions])),
        "version_lag/mean": float(lags.mean()),
        "version_lag/max": int(lags.max()),
    }
    for task in sorted(set(tasks)):  # the task types (mc, binary, ...) learn at their own rates
        record[f"accuracy/{task}"] = float(correct[tasks == task].mean())
    for name, scores in per_function.items():
        record[f"reward/{name}/mean"] = float(scores.mean())
        record[f"reward/{name}/std"] = float(scores.std())
    samples = [{"step": step, "id": item["id"], "version": int(v), "completion": c.text, "tokens": len(c.token_ids),
                "answer": item["answer"], "reward": float(r), "advantage": float(a),
                "rewards": {name: float(s[i]) for name, s in per_function.items()}}
               for i, (item, c, v, r, a) in enumerate(zip(items, completions, versions, total, advantages))]
    return ScoredBatch(rows, record, samples)


def run_rlvr(config: RLVRConfig, *, resume: bool = False) -> RLVRResult:
    started = time.perf_counter()
    state = RunState()
    found = latest(config.checkpoint_dir)
    if found is not None and not resume:
        raise ValueError(f"{config.checkpoint_dir} already holds checkpoints: pass --resume to continue that run, "
                         "or choose another checkpoint_dir")
    if found is not None:
        state = found[1]
        log.info("resuming from %s: step %d, policy version %d", found[0], state.step, state.version)
    elif resume:
        log.info("no checkpoint in %s: --resume starts from step 0", config.checkpoint_dir)

    prompts = PromptSource(config.data, prompts_per_step=config.grpo.prompts_per_step, seed=config.seed)
    rewards = RewardSet(config.rewards)
    with ExitStack() as ends:  # what has started ends, last first, however the run ends (a failed start too)
        learners = LearnerGroup(config, config.model)
        ends.callback(learners.shutdown)
        try:
            rollouts = RolloutGroup(config.rollout, model=config.model, revision=config.revision,
                                    image_size=config.data.image_size,
                                    max_prompt_tokens=config.grpo.max_prompt_tokens, nccl=config.sync.kind == "nccl")
            ends.callback(rollouts.shutdown)
        finally:
            # Their setup ran while the rollout engines started; a learner's error (a missing model, say) comes
            # first, as the cause of a rollout start that failed with it.
            learners.wait_ready()
        run_log = RunLog(config.metrics_dir, start_step=state.step)
        ends.callback(run_log.close)
        if state.step == 0:
            run_log.errors(prompts.errors)
        sync = WeightSync.create(config.sync, learners, rollouts)
        if found is not None:
            learners.load(learner_uri(found[0]))
            sync.push(state.version)  # the rollouts serve the checkpoint's policy
        log.info("RLVR: %d prompts, steps %d..%d of %d prompts x %d, %s mode, %d rollout worker(s), %d learner(s)",
                 len(prompts), state.step + 1, config.steps, config.grpo.prompts_per_step, config.grpo.group_size,
                 config.mode, config.rollout.num_workers, config.learner.num_workers)
        run_steps(config, state, prompts, rewards, learners, rollouts, sync, run_log)
        learners.export(config.output_dir)
    log.info("RLVR done: policy version %d exported to %s", state.version, config.output_dir)
    return RLVRResult(model_dir=config.output_dir, steps=state.step, policy_version=state.version,
                      seconds=time.perf_counter() - started,
                      metrics_path=storage.join(config.metrics_dir, METRICS_FILE))


def rows_with_gradient(rows: list[TrainRow], beta: float) -> list[TrainRow]:
    """The rows the learners train on. Without a KL term (beta 0) a completion of advantage 0 (every completion of
    a group whose rewards are all equal) has a loss of 0 whatever the weights: it is skipped. The others keep their
    weights, which `sequence_weights` computed over the whole batch, so the update is the whole batch's."""
    if beta > 0:
        return rows
    return [row for row in rows if row.advantage != 0.0] or [rows[0].filler()]  # an optimizer step all the same


def submit_batch(config: RLVRConfig, prompts: PromptSource, rollouts: RolloutGroup, sampling: SamplingParams,
                 step: int) -> PendingRollout:
    """Ask the rollouts for step `step`'s batch (0-based), seeded by the step; `rollouts.collect` returns it."""
    return rollouts.submit(prompts.batch(step), sampling, rollout_seed(config.seed, step, config.batch_size))


def step_record(state: RunState, rollout: Rollout, batch: ScoredBatch, stats: dict, timings: dict, *, step_s: float,
                replacements: int, rollout_dtype: str) -> dict:
    """A step's line in metrics.jsonl: where the run is, the samples' metrics, the learners' statistics (`stats`,
    LearnerGroup.train), timings and throughput."""
    stats = dict(stats)
    logprob_s, train_s = stats.pop("time_logprob_s"), stats.pop("time_train_s")
    generated = sum(len(r.completion_ids) for r in batch.rows)
    return {
        "step": state.step, "epoch": state.epoch, "policy_version": state.version, **batch.record, **stats,
        "time/generate_s": rollout.generate_s, "time/generate_wait_s": rollout.wait_s,
        "time/logprob_s": logprob_s, "time/train_s": train_s, **{f"time/{k}": v for k, v in timings.items()},
        "time/step_s": step_s,
        "tokens_per_s/generate": generated / rollout.generate_s if rollout.generate_s else 0.0,
        "tokens_per_s/train": stats["train_tokens"] / train_s if train_s else 0.0,
        "rollout_replacements": replacements, "prompt_errors": len(rollout.errors), "rollout_dtype": rollout_dtype,
    }


def run_steps(config: RLVRConfig, state: RunState, prompts: PromptSource, rewards: RewardSet, learners: LearnerGroup,
          rollouts: RolloutGroup, sync: WeightSync, run_log: RunLog) -> None:
    """The loop: generate → score → train → sync → log → checkpoint, from `state.step` to config.steps."""
    grpo = config.grpo
    sampling = SamplingParams(n=grpo.group_size, temperature=grpo.temperature, top_p=grpo.top_p,
                              max_new_tokens=grpo.max_new_tokens, logprobs=True)
    pending = None
    progress = Progress("rlvr", config.steps, "step", initial=state.step)
    for step in range(state.step, config.steps):
        step_started = time.perf_counter()
        replacements = rollouts.replacements
        if pending is None:
            pending = submit_batch(config, prompts, rollouts, sampling, step)
        rollout = rollouts.collect(pending)
        pending = None
        if config.mode == "one_step_off" and step + 1 < config.steps:
            # Generation of the next batch overlaps this step's training, with the weights the workers hold.
            pending = submit_batch(config, prompts, rollouts, sampling, step + 1)
        run_log.errors(rollout.errors)
        if not rollout.items:
            raise RuntimeError(f"step {step + 1}: no prompt of the batch could be used; see errors.jsonl")

        batch = score(rollout, rewards, config, learner_version=state.version, step=step + 1)
        stats = learners.train(rows_with_gradient(batch.rows, grpo.beta))
        state.version += 1
        timings = sync.push(state.version, wait=config.mode == "sync")
        state.step = step + 1
        state.epoch, state.index = prompts.position(state.step)

        record = step_record(state, rollout, batch, stats, timings, step_s=time.perf_counter() - step_started,
                             replacements=rollouts.replacements - replacements, rollout_dtype=rollouts.dtype)
        run_log.step(record)
        if config.sample_log_every and state.step % config.sample_log_every == 0:
            run_log.samples(batch.samples)
        kl = {"kl": record["kl"]} if grpo.beta > 0 else {}  # beta 0: no reference, nothing measured
        progress.update(state.step, reward=record["reward/mean"], accuracy=record["accuracy"],
                        format=record["format_rate"], **kl)

        if state.step % config.checkpoint_every == 0 or state.step == config.steps:
            directory = step_uri(config.checkpoint_dir, state.step)
            learners.save(learner_uri(directory))
            commit(config.checkpoint_dir, state, keep=config.keep_checkpoints)
    progress.close()

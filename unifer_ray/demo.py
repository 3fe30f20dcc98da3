"""`unifer demo`: the whole system on the embedded default — synthetic faces, tiny model, CPU only.

    synthetic faces → tiny model → FERBench files → the pipeline (curate CoT + RLVR → SFT → RLVR →
    FERBench SFT vs RLVR → Serve + one OpenAI-client request) → stage table and report

The pipeline is `unifer_ray.pipeline`, the code `jobs/pipeline.py` runs on a cluster; the demo only makes its inputs.
Every path in the config file starts with `runs/demo`; `--out DIR` moves them all below DIR.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, PositiveFloat, PositiveInt

from unifer_ray.config import ConfigError, packaged_config, parse_config, read_yaml
from unifer_ray.engines import resolve_engine
from unifer_ray.records import read_log

DEFAULT_CONFIG = packaged_config("tiny.yaml")
DEMO_PREFIX = "runs/demo"


class DemoConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    seed: int = 0
    train_per_class: int = Field(50, gt=0)
    test_per_class: int = Field(10, gt=0)
    data_root: str = f"{DEMO_PREFIX}/data"  # the four synthetic datasets, in their original layouts
    num_cpus: float | None = None  # the local Ray cluster's logical CPUs (None: all cores)
    # Once SFT has run, RLVR gets the steps that fit what is left of this many seconds (from the demo's start), as
    # predicted from SFT's median step: at most rlvr.steps, at least min_rlvr_steps. None: rlvr.steps, however long.
    time_budget_s: PositiveFloat | None = None
    min_rlvr_steps: PositiveInt = 20


# What a RLVR step (by its rollouts' engine), and the demo's work after RLVR's steps (RLVR's start and export,
# FERBench, Serve, the report), cost in SFT steps: the most measured on the 2-core machines the demo ran on
# (docs/post-training.md). CPU-bound alike, they scale with the machine. Transformers generates a step's samples
# about twice as slowly as vLLM.
RLVR_STEP_IN_SFT_STEPS = {"vllm": 5.0, "hf": 10.0}
AFTER_RLVR_IN_SFT_STEPS = 600


def rlvr_steps_within(budget_s: float, elapsed_s: float, sft_step_s: float, rollout_engine: str) -> int:
    """The RLVR steps predicted to fit the budget left after `elapsed_s` on a machine whose SFT step takes
    `sft_step_s`, with rollouts on `rollout_engine` (0 when none do)."""
    left = budget_s - elapsed_s - AFTER_RLVR_IN_SFT_STEPS * sft_step_s
    return max(0, int(left // (RLVR_STEP_IN_SFT_STEPS[rollout_engine] * sft_step_s)))


def moved_below(value, out_dir: Path):
    """`value` with every string path that starts with runs/demo moved below out_dir."""
    if isinstance(value, dict):
        return {k: moved_below(v, out_dir) for k, v in value.items()}
    if isinstance(value, list):
        return [moved_below(v, out_dir) for v in value]
    if isinstance(value, str) and (value == DEMO_PREFIX or value.startswith(DEMO_PREFIX + "/")):
        return str(out_dir / value[len(DEMO_PREFIX) + 1:]) if value != DEMO_PREFIX else str(out_dir)
    return value


def run_demo(config_path: str | None, out: str) -> Path:
    """Run the demo; returns the report's path."""
    started = time.monotonic()
    from unifer_ray.data.convert import convert_ferbench
    from unifer_ray.data.synthetic import write_synthetic_datasets
    from unifer_ray.engines.platform import platform_line
    from unifer_ray.labels import DATASETS
    from unifer_ray.models.tiny import build_tiny_model
    from unifer_ray.pipeline import Pipeline, StageTable, write_report
    from unifer_ray.ray_runtime import init_ray

    print(platform_line(), flush=True)
    path = Path(config_path) if config_path else DEFAULT_CONFIG
    sections = moved_below(read_yaml(path) or {}, Path(out).resolve())
    if "demo" not in sections:
        raise ConfigError(f"{path}: has no 'demo' section")
    config = parse_config(sections["demo"], DemoConfig, source=f"{path} [demo]")
    pipeline = Pipeline(sections, source=str(path))
    if pipeline.sft is None:
        raise ConfigError(f"{path}: the demo needs the sft stage (its `model` is where the tiny model is built)")
    data_root = Path(config.data_root)
    stages = StageTable()

    def synthetic():
        summary = write_synthetic_datasets(data_root, train_per_class=config.train_per_class,
                                           test_per_class=config.test_per_class, seed=config.seed)
        counts = {k: v["counts"] for k, v in summary["datasets"].items()}
        print(counts)
        return None, {"note": f"{sum(c['train'] + c['test'] for c in counts.values())} images in {data_root}"}

    def tiny_model():
        model_dir = build_tiny_model(pipeline.sft.model, seed=config.seed)
        return model_dir, {"note": f"random-init Qwen2.5-VL in {model_dir}"}

    def ferbench_files():
        for file in pipeline.config.ferbench:
            if file.dataset not in DATASETS:
                raise ConfigError(f"{path} [pipeline.ferbench]: {file.path} needs `dataset`, one of {list(DATASETS)}")
            convert_ferbench(file.dataset, data_root / DATASETS[file.dataset].name, file.path, split="test")
        return None, {"note": f"{len(pipeline.config.ferbench)} FERBench files of the synthetic test splits"}

    stages.run("synthetic data", synthetic)
    stages.run("tiny model", tiny_model)
    stages.run("FERBench files", ferbench_files)

    def size_rlvr(results: dict):
        # No budget: rlvr.steps however long. No SFT stage: nothing has measured the machine.
        if config.time_budget_s is None or "sft" not in results:
            return
        # SFT's median step: the machine's speed, start-ups left out.
        per_step = statistics.median(r["step_time_s"] for r in read_log(Path(results["sft"].metrics_path)))
        elapsed, budget, most = time.monotonic() - started, config.time_budget_s, pipeline.rlvr.steps
        engine = resolve_engine(pipeline.rlvr.rollout.engine.spec(pipeline.rlvr.model))
        fit = rlvr_steps_within(budget, elapsed, per_step, engine)
        steps = min(most, max(config.min_rlvr_steps, fit))
        pipeline.rlvr = pipeline.rlvr.model_copy(update={"steps": steps})
        line = (f"RLVR: {steps} steps of at most {most}: {fit} predicted to fit the demo's {budget:.0f} s after "
                f"{elapsed:.0f} s here (SFT ran at {per_step:.3f} s a step; {engine} rollouts)")
        if steps > fit:
            line += f"; demo.min_rlvr_steps is {config.min_rlvr_steps}, so the demo may run past its budget"
        print(line, flush=True)

    init_ray(num_cpus=config.num_cpus)
    outcome = pipeline.run(stages, model_prefix="tiny-", before={"rlvr": size_rlvr})
    report = write_report(pipeline, stages, outcome)

    print("\n=== stages ===")
    print(stages.text())
    print(f"\nreport: {report} (and report.json, plots); "
          f"leaderboard: {pipeline.config.bench_out_dir}/report/leaderboard.md")
    return report

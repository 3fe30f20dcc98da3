"""`unifer demo`: the whole system on the embedded default — synthetic faces, tiny model, CPU only.

    synthetic faces → tiny model → FERBench files → the pipeline (curate CoT + RLVR → SFT → RLVR →
    FERBench SFT vs RLVR → Serve + one OpenAI-client request) → stage table and report

The pipeline is `unifer_ray.pipeline`, the code `jobs/pipeline.py` runs on a cluster; the demo only makes its inputs.
Every path in the config file starts with `runs/demo`; `--out DIR` moves them all below DIR.
"""

from __future__ import annotations

import statistics
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, PositiveFloat, PositiveInt

from unifer_ray.config import ConfigError, packaged_config, parse_config, read_yaml
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
    # RLVR steps by the machine's speed, as the demo's own SFT stage measured it (its median seconds a step): the
    # tightest bound the machine meets gives its steps; a slower machine keeps rlvr.steps.
    rlvr_steps_by_sft_speed: dict[PositiveFloat, PositiveInt] = {}


def rlvr_steps_for(sft_seconds_per_step: float, by_speed: dict[float, int], default: int) -> int:
    met = [bound for bound in by_speed if sft_seconds_per_step <= bound]
    return by_speed[min(met)] if met else default


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
        if "sft" not in results:  # the file's stages leave SFT out: nothing has measured the machine
            return
        # SFT's median step: the machine's speed without start-ups, and the same when a rerun finds SFT done.
        per_step = statistics.median(r["step_time_s"] for r in read_log(Path(results["sft"].metrics_path)))
        configured = pipeline.rlvr.steps
        steps = rlvr_steps_for(per_step, config.rlvr_steps_by_sft_speed, configured)
        pipeline.rlvr = pipeline.rlvr.model_copy(update={"steps": steps})
        print(f"RLVR: {steps} steps (SFT ran at {per_step:.3f} s a step here; steps by SFT speed: "
              f"{config.rlvr_steps_by_sft_speed or 'none'}, otherwise {configured})", flush=True)

    init_ray(num_cpus=config.num_cpus)
    outcome = pipeline.run(stages, model_prefix="tiny-", before={"rlvr": size_rlvr})
    report = write_report(pipeline, stages, outcome)

    print("\n=== stages ===")
    print(stages.text())
    print(f"\nreport: {report} (and report.json, plots); "
          f"leaderboard: {pipeline.config.bench_out_dir}/report/leaderboard.md")
    return report

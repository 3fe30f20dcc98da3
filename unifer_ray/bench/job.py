"""`unifer bench run`: run every model, then score and report — the whole FERBench job."""

from __future__ import annotations

from unifer_ray import storage
from unifer_ray.bench.config import BenchConfig
from unifer_ray.bench.report import leaderboard_text, score_files
from unifer_ray.bench.runner import ModelRun, run_bench


def bench_and_score(config: BenchConfig, mode: str = "strict") -> tuple[list[ModelRun], dict]:
    runs = run_bench(config)
    for r in runs:
        print(f"{r.model}: {r.items} items = {r.scored} scored + {r.errors} errors; "
              f"{r.generated} generated in {r.seconds:.1f}s ({r.items_per_s:.2f} items/s)")
    report_dir = storage.join(config.out_dir, "report")
    metrics = score_files([r.results_path for r in runs], mode=mode, out_dir=report_dir,
                          model_names=[r.model for r in runs])
    print(leaderboard_text(metrics))
    print(f"report: {report_dir}")
    return runs, metrics

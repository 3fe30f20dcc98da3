"""`unifer demo`: the system end to end on the embedded default — synthetic faces, tiny model, CPU only."""

from __future__ import annotations

import time
from contextlib import contextmanager
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from unifer_ray.bench.config import BenchConfig, BenchFile, BenchModel
from unifer_ray.config import load_config
from unifer_ray.labels import DATASETS


class DemoConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    seed: int = 0
    train_per_class: int = Field(50, gt=0)
    test_per_class: int = Field(10, gt=0)
    base_model: BenchModel  # how the tiny model is benchmarked; its engine.model is filled in by the demo
    num_cpus: float | None = None  # the local Ray cluster's logical CPUs (None: all cores)


DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "tiny.yaml"


@contextmanager
def stage(table: list[tuple[str, float, str]], name: str, note: list[str]):
    print(f"\n=== {name} ===", flush=True)
    start = time.perf_counter()
    yield
    table.append((name, time.perf_counter() - start, note[0] if note else ""))


def run_demo(config_path: str | None, out: str) -> None:
    from unifer_ray.bench.pipeline import bench_and_score
    from unifer_ray.data.convert import convert_ferbench
    from unifer_ray.data.synthetic import write_synthetic_datasets
    from unifer_ray.models.tiny import build_tiny_model
    from unifer_ray.ray_utils import init_ray

    config = load_config(config_path or DEFAULT_CONFIG, DemoConfig, section="demo")
    out_dir = Path(out).resolve()
    data_root, ferbench_dir = out_dir / "data", out_dir / "ferbench"
    table: list[tuple[str, float, str]] = []

    note: list[str] = []
    with stage(table, "synthetic data", note):
        summary = write_synthetic_datasets(data_root, train_per_class=config.train_per_class,
                                           test_per_class=config.test_per_class, seed=config.seed)
        counts = {k: v["counts"] for k, v in summary["datasets"].items()}
        note.append(f"{sum(c['train'] + c['test'] for c in counts.values())} images in {data_root}")
        print(counts)

    note = []
    with stage(table, "tiny model", note):
        model_dir = build_tiny_model(out_dir / "models" / "tiny-base", seed=config.seed)
        note.append(str(model_dir))

    note = []
    with stage(table, "FERBench files", note):
        files = []
        for spec in DATASETS.values():
            path = ferbench_dir / spec.ferbench_file
            convert_ferbench(spec.key, data_root / spec.name, path, split="test")
            files.append(BenchFile(path=str(path), image_root=str(data_root)))
        note.append(f"{len(files)} files in {ferbench_dir}")

    note = []
    with stage(table, "FERBench (base model)", note):
        init_ray(num_cpus=config.num_cpus)
        base = config.base_model.model_copy(
            update={"engine": config.base_model.engine.model_copy(update={"model": str(model_dir)})})
        bench = BenchConfig(files=files, models=[base], out_dir=str(out_dir / "bench"))
        _, metrics = bench_and_score(bench)
        overall = metrics[base.name]["overall"]
        note.append(f"accuracy {overall['accuracy']:.3f}, format {overall['format_rate']:.3f}")

    print("\n=== stages ===")
    print(f"{'stage':<24} {'seconds':>8}  result")
    for name, seconds, result in table:
        print(f"{name:<24} {seconds:>8.1f}  {result}")
    print(f"\nreport: {out_dir / 'bench' / 'report' / 'leaderboard.md'}")

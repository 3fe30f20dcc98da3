"""`unifer demo`: the system end to end on the embedded default — synthetic faces, tiny model, CPU only.

Each stage is the same code a cluster job runs; stages talk through files below `--out`.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field

from unifer_ray.bench.config import BenchConfig, BenchFile, BenchModel
from unifer_ray.config import load_config, parse_config
from unifer_ray.labels import DATASETS

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "tiny.yaml"


class DemoConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    seed: int = 0
    train_per_class: int = Field(50, gt=0)
    test_per_class: int = Field(10, gt=0)
    base_model: BenchModel  # how every model is benchmarked; engine.model and name are filled in per model
    num_cpus: float | None = None  # the local Ray cluster's logical CPUs (None: all cores)


class StageTable:
    """Times each stage and keeps one line of result per stage, for the closing table and report."""

    def __init__(self):
        self.rows: list[dict] = []

    def run(self, name: str, fn, *args, **kwargs):
        print(f"\n=== {name} ===", flush=True)
        start = time.perf_counter()
        result, summary = fn(*args, **kwargs)
        self.rows.append({"stage": name, "seconds": round(time.perf_counter() - start, 1), **summary})
        return result

    def text(self) -> str:
        keys = [k for k in ("accuracy", "format_rate") if any(k in r for r in self.rows)]
        lines = [f"{'stage':<26} {'seconds':>8} " + " ".join(f"{k:>11}" for k in keys) + "  result"]
        for r in self.rows:
            cells = " ".join(f"{r[k]:>11.3f}" if k in r else f"{'':>11}" for k in keys)
            lines.append(f"{r['stage']:<26} {r['seconds']:>8.1f} {cells}  {r.get('note', '')}")
        return "\n".join(lines)


def _section(config_path: Path, name: str) -> dict:
    data = yaml.safe_load(config_path.read_text()) or {}
    if name not in data:
        raise ValueError(f"{config_path}: has no '{name}' section")
    return data[name]


def run_demo(config_path: str | None, out: str) -> None:
    from unifer_ray.bench.pipeline import bench_and_score
    from unifer_ray.curate.config import CotConfig, RlvrConfig, sources_under
    from unifer_ray.curate.cot import run_cot
    from unifer_ray.curate.rlvr import run_rlvr
    from unifer_ray.data.convert import convert_ferbench
    from unifer_ray.data.synthetic import write_synthetic_datasets
    from unifer_ray.models.tiny import build_tiny_model
    from unifer_ray.ray_utils import init_ray

    path = Path(config_path) if config_path else DEFAULT_CONFIG
    config = load_config(path, DemoConfig, section="demo")
    out_dir = Path(out).resolve()
    data_root, ferbench_dir = out_dir / "data", out_dir / "ferbench"
    stages = StageTable()

    def synthetic():
        summary = write_synthetic_datasets(data_root, train_per_class=config.train_per_class,
                                           test_per_class=config.test_per_class, seed=config.seed)
        counts = {k: v["counts"] for k, v in summary["datasets"].items()}
        print(counts)
        return None, {"note": f"{sum(c['train'] + c['test'] for c in counts.values())} images in {data_root}"}

    def ferbench_files():
        files = []
        for spec in DATASETS.values():
            file = ferbench_dir / spec.ferbench_file
            convert_ferbench(spec.key, data_root / spec.name, file, split="test")
            files.append(BenchFile(path=str(file), image_root=str(data_root)))
        return files, {"note": f"{len(files)} FERBench files in {ferbench_dir}"}

    def curate_cot():
        cot = parse_config({**_section(path, "curate_cot"), "sources": [s.model_dump() for s in sources_under(str(data_root))],
                            "out_dir": str(out_dir / "curate" / "cot")}, CotConfig, source=f"{path} [curate_cot]")
        stats = run_cot(cot)
        return cot.out_dir, {"note": f"{stats['kept']} CoT traces kept of {stats['generated']} generated"}

    def curate_rlvr(files):
        rlvr = parse_config({**_section(path, "curate_rlvr"), "sources": [s.model_dump() for s in sources_under(str(data_root))],
                             "out_dir": str(out_dir / "curate" / "rlvr"), "ferbench_files": [f.path for f in files],
                             "ferbench_image_root": str(data_root)}, RlvrConfig, source=f"{path} [curate_rlvr]")
        stats = run_rlvr(rlvr)
        return rlvr.out_dir, {"note": f"{stats['items']} RLVR items, {stats['excluded_ferbench']} FERBench images excluded"}

    def ferbench(models: dict[str, Path], files):
        bench_models = [config.base_model.model_copy(update={
            "name": name, "engine": config.base_model.engine.model_copy(update={"model": str(model_dir)})})
            for name, model_dir in models.items()]
        _, metrics = bench_and_score(BenchConfig(files=files, models=bench_models, out_dir=str(out_dir / "bench")))
        last = metrics[bench_models[-1].name]["overall"]
        return metrics, {"accuracy": last["accuracy"], "format_rate": last["format_rate"],
                         "note": ", ".join(f"{n}: {metrics[n]['overall']['accuracy']:.3f}" for n in models)}

    def serve_one_request(model_dir: Path, files):
        from unifer_ray.bench.items import read_items
        from unifer_ray.data.images import load_image
        from unifer_ray.serve.run import ask_served_model

        item = read_items(files[0].path, image_root=files[0].image_root, limit=1).rows[0]
        answer = ask_served_model(model_dir, load_image(item["image_uri"]), candidate_labels=item["candidate_labels"])
        print(json.dumps({**answer, "true_label": item["true_label"]}, indent=2, default=str))
        return answer, {"note": f"OpenAI client -> {answer['url']}: label {answer['label']!r} "
                                f"(true {item['true_label']!r}) in {answer['latency_s']:.2f}s"}

    stages.run("synthetic data", synthetic)
    base_dir = stages.run("tiny model", lambda: (d := build_tiny_model(out_dir / "models" / "tiny-base", seed=config.seed),
                                                 {"note": str(d)}))
    files = stages.run("FERBench files", ferbench_files)
    init_ray(num_cpus=config.num_cpus)
    stages.run("curate CoT (oracle)", curate_cot)
    stages.run("curate RLVR", curate_rlvr, files)
    models = {"tiny-base": base_dir}
    stages.run("FERBench " + " vs ".join(models), ferbench, models, files)
    stages.run("serve + one request", serve_one_request, list(models.values())[-1], files)

    report = out_dir / "report.json"
    report.write_text(json.dumps({"stages": stages.rows}, indent=2))
    print("\n=== stages ===")
    print(stages.text())
    print(f"\nreport: {report}; leaderboard: {out_dir / 'bench' / 'report' / 'leaderboard.md'}")

"""The whole post-training pipeline, one stage after the other, each the same code its own job runs:

    curate CoT → curate RLVR → SFT → RLVR → FERBench (base vs SFT vs RLVR) → Serve

Every stage reads its section of one YAML file (`curate_cot`, `curate_rlvr`, `sft`, `rlvr`) and the `pipeline`
section says how the models are benchmarked and served. Stages hand over through the paths those sections name:
the SFT section's `data` is the CoT set's `out_dir/items`, RLVR's `model` is SFT's `output_dir`, and so on — the
pipeline checks that they line up before it starts. `unifer demo` and `jobs/pipeline.py` both run this.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping
from functools import partial
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from unifer_ray import storage
from unifer_ray.bench.config import BenchConfig, BenchFile, BenchModel
from unifer_ray.config import ConfigError, parse_config, read_yaml
from unifer_ray.curate.config import CotSetConfig, RlvrSetConfig
from unifer_ray.rl.config import RLVRConfig
from unifer_ray.stages import STAGES
from unifer_ray.train.config import SFTConfig

STAGE_TITLES = {"curate_cot": "curate CoT", "curate_rlvr": "curate RLVR", "sft": "SFT (Ray Train)",
                "rlvr": "RLVR (GRPO)", "bench": "FERBench", "serve": "Serve + one request"}
MODEL_TITLES = {"base": "base", "sft": "SFT", "rlvr": "RLVR"}


class ServeStage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    config: str | None = None  # the Serve config file (default: the package's configs/serve.yaml); its model_source
    # becomes the final model
    # request: start the app, send one FERBench question through the OpenAI client, shut it down (the demo);
    # deploy: leave the app running on the cluster, as `serve run` would (a cluster job).
    mode: Literal["request", "deploy"] = "request"
    image_size: int | None = Field(None, gt=0)  # replaces the file's fer.image_size: the size the model trained at


class PipelineConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    stages: list[Literal[STAGES]] = Field(default_factory=lambda: list(STAGES), min_length=1)  # type: ignore[valid-type]
    ferbench: list[BenchFile] = Field(min_length=1)  # the test files every model is benchmarked on
    bench_model: BenchModel  # how each model is benchmarked; its name and engine.model are set per model
    # The models the bench stage compares, of those the configured stages start from or make.
    compare: list[Literal["base", "sft", "rlvr"]] = Field(default_factory=lambda: ["base", "sft", "rlvr"],
                                                          min_length=1)
    bench_out_dir: str  # FERBench results and report, local or s3://
    models_at_once: int = Field(1, gt=0)  # models benchmarked side by side (their engines must fit together)
    report_dir: str  # the pipeline's report: report.md, report.json and plots (local)
    serve: ServeStage = ServeStage()


class StageTable:
    """Times each stage and keeps one line of result per stage, for the closing table and the report."""

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
        lines = [f"{'stage':<30} {'seconds':>8} " + " ".join(f"{k:>11}" for k in keys) + f"  {'engine':<26} result"]
        for r in self.rows:
            cells = " ".join(f"{r[k]:>11.3f}" if k in r else f"{'':>11}" for k in keys)
            lines.append(f"{r['stage']:<30} {r['seconds']:>8.1f} {cells}  {r.get('engine', ''):<26} "
                         f"{r.get('note', '')}")
        lines.append(f"{'total':<30} {sum(r['seconds'] for r in self.rows):>8.1f}")
        return "\n".join(lines)


class Pipeline:
    """The stage configs of one file, checked to hand over to each other."""

    def __init__(self, sections: dict, *, source: str):
        def section(name: str, cls):
            if name not in sections:
                raise ConfigError(f"{source}: has no '{name}' section")
            return parse_config(sections[name], cls, source=f"{source} [{name}]")

        self.config: PipelineConfig = section("pipeline", PipelineConfig)
        wanted = set(self.config.stages)
        self.cot = section("curate_cot", CotSetConfig) if "curate_cot" in wanted else None
        self.rlvr_set = section("curate_rlvr", RlvrSetConfig) if "curate_rlvr" in wanted else None
        self.sft = section("sft", SFTConfig) if wanted & {"sft", "bench"} else None
        self.rlvr = section("rlvr", RLVRConfig) if wanted & {"rlvr", "bench", "serve"} else None
        self._check_handover(source)

    def _check_handover(self, source: str) -> None:
        def same(a: str, b: str) -> bool:
            return a.rstrip("/") == b.rstrip("/")

        links = []
        if self.cot and self.sft:
            links.append(("sft.data", self.sft.data, storage.join(self.cot.out_dir, "items")))
        if self.rlvr_set and self.rlvr:
            links.append(("rlvr.data.paths", self.rlvr.data.paths, storage.join(self.rlvr_set.out_dir, "items")))
        if self.sft and self.rlvr:
            links.append(("rlvr.model", [self.rlvr.model], self.sft.output_dir))
        for name, paths, expected in links:
            if not any(same(p, expected) for p in paths):
                raise ConfigError(f"{source}: {name} is {paths}, but the stage before writes {expected}")

    def models(self) -> dict[str, str]:
        """The models the bench stage compares, in pipeline order."""
        named = {}
        if self.sft:
            named["base"] = self.sft.model
            named["sft"] = self.sft.output_dir
        if self.rlvr:
            named.setdefault("base", self.rlvr.model)
            named["rlvr"] = self.rlvr.output_dir
        return named

    def base_revision(self) -> str | None:
        """The revision of the base model when it is a hub id (the stages' outputs are directories)."""
        return self.sft.revision if self.sft else self.rlvr.revision if self.rlvr else None

    def run(self, stages: StageTable, *, model_prefix: str = "",
            before: Mapping[str, Callable[[dict], None]] | None = None) -> dict:
        """Run the configured stages, in pipeline order; returns what the report needs. `model_prefix` goes before
        each benchmarked model's name; `before[stage]` is called with the results so far just before that stage."""
        run = {"curate_cot": self._curate_cot, "curate_rlvr": self._curate_rlvr, "sft": self._sft,
               "rlvr": self._rlvr, "bench": partial(self._bench, model_prefix), "serve": self._serve}
        results = {}
        for stage in (s for s in STAGES if s in self.config.stages):
            if before and stage in before:
                before[stage](results)
            results[stage] = stages.run(self.title(stage), run[stage])
        return results

    def title(self, stage: str) -> str:
        if stage != "bench":
            return STAGE_TITLES[stage]
        return f"{STAGE_TITLES[stage]} " + " vs ".join(MODEL_TITLES[name] for name in self.compared())

    def compared(self) -> list[str]:
        """The models the bench stage compares: those of `compare` the stages have."""
        return [name for name in self.models() if name in self.config.compare]

    # Each stage returns its result and its line of the stage table.

    def _curate_cot(self) -> tuple[dict, dict]:
        from unifer_ray.curate.cot import curate_cot_set

        stats = curate_cot_set(self.cot)
        return stats, {"note": f"{stats['kept']} CoT traces kept of {stats['generated']} generated",
                       "engine": teacher_description(self.cot.teacher)}

    def _curate_rlvr(self) -> tuple[dict, dict]:
        from unifer_ray.curate.rlvr import curate_rlvr_set

        stats = curate_rlvr_set(self.rlvr_set)
        excluded = stats["excluded_ferbench"]
        return stats, {"note": f"{stats['items']} RLVR items, {excluded} FERBench images excluded",
                       "engine": "none (labels)"}

    def _sft(self) -> tuple[Any, dict]:
        from unifer_ray.train.sft import run_sft

        result = run_sft(self.sft)
        return result, {"note": f"{result.steps} steps, final loss {result.loss:.4f} -> {result.model_dir}",
                        "engine": f"torch, {self.sft.strategy}"}

    def _rlvr(self) -> tuple[Any, dict]:
        from unifer_ray.engines import engine_description
        from unifer_ray.rl.controller import run_rlvr

        result = run_rlvr(self.rlvr)
        note = f"{result.steps} steps, policy version {result.policy_version} -> {result.model_dir}"
        rollouts = self.rlvr.rollout
        engine = engine_description(rollouts.engine.spec(self.rlvr.model), on_cpu=not rollouts.num_gpus)
        return result, {"note": note, "engine": f"{engine} rollouts"}

    def _bench(self, model_prefix: str) -> tuple[dict, dict]:
        from unifer_ray.bench.job import bench_and_score
        from unifer_ray.engines import engine_description

        config = self.config
        models = self.bench_models(model_prefix)
        runs, scored = bench_and_score(BenchConfig(files=config.ferbench, models=models, out_dir=config.bench_out_dir,
                                                   models_at_once=config.models_at_once))
        metrics = {m.name: scored[m.name] for m in models}  # pipeline order: base, SFT, RLVR
        last = metrics[models[-1].name]["overall"]
        note = ", ".join(f"{m.name}: {metrics[m.name]['overall']['accuracy']:.3f}" for m in models)
        engine = engine_description(config.bench_model.engine, on_cpu=not config.bench_model.num_gpus)
        summary = {"accuracy": last["accuracy"], "format_rate": last["format_rate"], "note": note, "engine": engine}
        return {"metrics": metrics, "paired": paired_last_two(runs)}, summary

    def bench_models(self, model_prefix: str) -> list[BenchModel]:
        """The pipeline's `bench_model` once per model compared; the base model at its revision."""
        base, paths = self.config.bench_model, self.models()
        return [base.model_copy(update={
            "name": f"{model_prefix}{name}", "engine": base.engine.model_copy(
                update={"model": paths[name], "revision": self.base_revision() if name == "base" else None})})
            for name in self.compared()]

    def _serve(self) -> tuple[dict | None, dict]:
        from unifer_ray.engines.platform import NO_WHEEL_HINT, vllm_installed

        if not vllm_installed():
            return None, {"note": f"skipped: Ray Serve LLM runs vLLM. {NO_WHEEL_HINT}", "engine": "-"}
        return serve_final_model(self.models()[list(self.models())[-1]], self.config.ferbench[0], self.config.serve)


def paired_last_two(runs: list) -> dict | None:
    """The last model against the one before it (RLVR against SFT) on the items both answered: the corrected and
    broken answers and McNemar's exact p-value (bench.metrics.paired_comparison)."""
    if len(runs) < 2:
        return None
    from unifer_ray.bench.metrics import paired_comparison, read_results

    before, after = runs[-2], runs[-1]
    counts = paired_comparison(read_results(before.results_path).rows, read_results(after.results_path).rows)
    return {"before": before.model, "after": after.model, **counts}


def teacher_description(teacher) -> str:
    if teacher.kind == "engine":
        from unifer_ray.engines import engine_description

        return f"{engine_description(teacher.engine, on_cpu=not teacher.num_gpus)} teacher"
    return f"{teacher.kind} teacher"


def serve_final_model(model: str, file: BenchFile, serve: ServeStage) -> tuple[dict | None, dict]:
    """Serve `model`: one streamed OpenAI-client request about the first FERBench item (request), or leave it
    running (deploy)."""
    from unifer_ray.serve.config import load_serve_file
    from unifer_ray.serve.run import DEFAULT_SERVE_CONFIG, ask_served_model, with_model

    served = load_serve_file(serve.config or DEFAULT_SERVE_CONFIG)
    config = with_model(served.config, model)
    if serve.image_size:
        config = config.model_copy(update={"fer": config.fer.model_copy(update={"image_size": serve.image_size})})
    if serve.mode == "deploy":
        from ray import serve as ray_serve

        from unifer_ray.serve.app import build_app

        ray_serve.start(proxy_location=served.proxy_location, http_options=served.http_options)
        ray_serve.run(build_app(config), name=served.app_name, route_prefix=served.route_prefix)
        return None, {"note": f"{model} deployed as Serve app {served.app_name!r} at {served.route_prefix}"}

    from unifer_ray.bench.items import read_items
    from unifer_ray.data.images import load_image

    item = read_items(file.path, image_root=file.image_root, limit=1).rows[0]
    answer = ask_served_model(config, load_image(item["image_uri"]), candidate_labels=item["candidate_labels"])
    print(json.dumps({**answer, "true_label": item["true_label"]}, indent=2, default=str))
    first = "" if answer["ttft_s"] is None else f", the first after {answer['ttft_s']:.2f}s"
    return answer, {"note": f"OpenAI client -> {answer['url']}: label {answer['label']!r} "
                            f"(true {item['true_label']!r}) in {answer['latency_s']:.2f}s, streamed in "
                            f"{answer['chunks']} chunks{first}"}


def write_report(pipeline: Pipeline, stages: StageTable, outcome: dict) -> Path:
    """report.md, report.json and the plots in the pipeline's report_dir."""
    from unifer_ray.pipeline_report import write_pipeline_report

    bench = outcome.get("bench") or {}
    return write_pipeline_report(Path(pipeline.config.report_dir), stages.rows, bench.get("metrics"),
                                 paired=bench.get("paired"),
                                 sft_log=pipeline.sft.metrics_dir if pipeline.sft else None,
                                 rlvr_log=pipeline.rlvr.metrics_dir if pipeline.rlvr else None)


def run_pipeline_file(config_path: str, stages: list[str] | None = None) -> Path:
    """`unifer pipeline` / `jobs/pipeline.py`: the stages of one config file (all of its `pipeline.stages`, or
    those named), on the Ray cluster at RAY_ADDRESS or a local one; returns the report's path."""
    from unifer_ray.ray_runtime import init_ray

    sections = read_yaml(config_path) or {}
    if not isinstance(sections, dict):
        raise ConfigError(f"{config_path}: expected a mapping of stage sections")
    if stages is not None:
        sections.setdefault("pipeline", {})["stages"] = stages
    pipeline = Pipeline(sections, source=config_path)
    table = StageTable()
    init_ray()
    outcome = pipeline.run(table)
    report = write_report(pipeline, table, outcome)
    print("\n=== stages ===")
    print(table.text())
    print(f"\nreport: {report}")
    return report

"""FERBench as one streaming Ray Data graph per model: read → decode/resize → engine actors → parse/score → Parquet."""

from __future__ import annotations

import json
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray
from ray.util.queue import Queue

from unifer_ray import storage
from unifer_ray.bench.config import BenchConfig, BenchModel
from unifer_ray.bench.items import ItemRows, read_items
from unifer_ray.data.images import load_image_batch
from unifer_ray.engines import engine_label
from unifer_ray.engines.batch import add_generation, held_cpus
from unifer_ray.parsing import parsed_columns
from unifer_ray.ray_runtime import progress_of_tasks
from unifer_ray.records import ErrorRecord, object_array, write_jsonl

log = logging.getLogger(__name__)

RESULT_COLUMNS = (
    "id", "model", "dataset", "image_path", "true_label", "candidate_labels", "response", "parsed_strict",
    "parsed_paper", "correct_strict", "correct_paper", "format_ok", "latency_s", "num_tokens", "engine", "status",
    "error",
)
UNPARSED = {"parsed_strict": None, "parsed_paper": None, "format_ok": False}  # a failed inference's columns


@dataclass
class ModelRun:
    model: str
    items: int  # valid and invalid items of the benchmark files
    scored: int
    errors: int
    generated: int  # items sent through the engine in this run (0 when everything was already finished)
    seconds: float
    results_path: str
    errors_path: str
    stats: str = field(default="", repr=False)  # Ray Data's execution stats of the run (per operator), if it ran

    @property
    def items_per_s(self) -> float:
        return self.generated / self.seconds if self.seconds > 0 else 0.0


def score_batch(batch: dict[str, np.ndarray], *, model: str, engine: str,
                tally: Queue | None = None) -> dict[str, np.ndarray]:
    """Parse each response in both modes and mark it; rows that carry an error are kept, marked `error`. The
    counts go to `tally` (a queue of the driver's progress), if given."""
    n = len(batch["id"])
    cols: dict[str, list] = {k: [] for k in ("response", *UNPARSED, "correct_strict", "correct_paper", "status")}
    for i in range(n):
        candidates = [str(c) for c in batch["candidate_labels"][i]]
        responses = batch["responses"][i]
        text = str(responses[0]) if len(responses) else ""
        failed = bool(batch["error"][i])
        parsed = UNPARSED if failed else parsed_columns(text, candidates, str(batch["dataset"][i]))
        row = parsed | {"response": text, "status": "error" if failed else "scored",
                        "correct_strict": parsed["parsed_strict"] == batch["true_label"][i],
                        "correct_paper": parsed["parsed_paper"] == batch["true_label"][i]}
        for k, v in row.items():
            cols[k].append(v)
    out = {k: batch[k] for k in ("id", "dataset", "image_path", "true_label", "latency_s", "num_tokens", "error")}
    out["candidate_labels"] = object_array([[str(c) for c in cands] for cands in batch["candidate_labels"]])
    out["model"] = np.full(n, model, dtype=object)
    out["engine"] = np.full(n, engine, dtype=object)
    out.update({k: object_array(v) for k, v in cols.items()})
    if tally is not None:
        tally.put({"done": n, "errors": cols["status"].count("error"), "correct": int(sum(cols["correct_strict"]))})
    return out


def show_bench(counts: dict) -> tuple[int, dict]:
    """A model's progress: items done; strict accuracy of the scored ones so far, and failed items."""
    scored = counts["done"] - counts["errors"]
    return counts["done"], {"accuracy": counts["correct"] / scored if scored else 0.0, "errors": counts["errors"]}


def _read_shards(shards_dir: str) -> list[dict]:
    files = storage.list_files(shards_dir, ".parquet")
    if not files:
        return []
    fs, _ = storage.filesystem(shards_dir)
    tables = [pq.read_table(storage.filesystem(f)[1], filesystem=fs) for f in files]
    return pa.concat_tables(tables, promote_options="default").to_pylist()


def _latest_by_id(rows: list[dict]) -> tuple[dict[str, dict], dict[str, dict]]:
    """Scored rows win over errors of earlier runs; of several errors, the last is kept."""
    scored: dict[str, dict] = {}
    errors: dict[str, dict] = {}
    for row in rows:
        (scored if row["status"] == "scored" else errors)[row["id"]] = row
    return scored, {k: v for k, v in errors.items() if k not in scored}


def warn_if_the_pool_fills_the_cluster(model: BenchModel, config: BenchConfig, requests: int) -> bool:
    """Warn (and return True) when the generation stage's actors ask for every CPU the cluster has now.

    The image-loading tasks then get no CPU, and on a cluster that cannot add nodes Ray Data waits forever while
    reporting only backpressure; an autoscaling cluster adds a node instead, so this is a warning, not an error.
    """
    cpus = ray.cluster_resources().get("CPU", 0.0)
    held = held_cpus(model, model.engine, requests)
    if held + config.load_num_cpus <= cpus:
        return False
    log.warning("%s: the engine stage's actors hold %g of the cluster's %g CPUs and leave less than load_num_cpus=%g "
                "for image loading; unless the cluster adds nodes the run cannot progress (lower concurrency or "
                "num_cpus)", model.name, held, cpus, config.load_num_cpus)
    return True


def models_side_by_side(config: BenchConfig, requests: list[int]) -> int:
    """How many models run at once: `models_at_once`, fewer where their stages' actors, for each model's `requests`,
    would not leave a decode task room on the cluster's CPUs now (each run's actors wait for the others' tasks: too
    many deadlock)."""
    wanted = min(config.models_at_once, len(config.models))
    if wanted == 1:
        return 1
    cpus = ray.cluster_resources().get("CPU", 0.0)
    # The largest runs together first.
    held = sorted((held_cpus(m, m.engine, n) for m, n in zip(config.models, requests)), reverse=True)
    fit = 1
    while fit < wanted and sum(held[: fit + 1]) + config.load_num_cpus <= cpus:
        fit += 1
    if fit < wanted:
        log.info("FERBench: %d model(s) at once, not models_at_once=%d: %d at once would hold %g of the cluster's %g "
                 "CPUs with no %g left for a decode task", fit, config.models_at_once, fit + 1,
                 sum(held[: fit + 1]), cpus, config.load_num_cpus)
    return fit


def run_model(model: BenchModel, items: ItemRows, config: BenchConfig) -> ModelRun:
    model_dir = storage.join(config.out_dir, "results", model.name)
    shards = storage.join(model_dir, "shards")
    scored, _ = _latest_by_id(_read_shards(shards))
    todo = [{**row, "error": ""} for row in items.rows if row["id"] not in scored]
    start = time.perf_counter()
    stats = ""
    if todo:
        log.info("%s: %d items to run, %d already finished", model.name, len(todo), len(scored))
        warn_if_the_pool_fills_the_cluster(model, config, len(todo) * model.sampling.n)
        # One block per engine batch, decoded by one task: every engine call gets a full batch, never the small
        # remainder of blocks that straddle a batch boundary (built here, so no repartition task needs a CPU).
        # from_blocks reads their metadata here; from_arrow asks a remote task per block (1-2 s of every run).
        blocks = [pa.Table.from_pylist(todo[i : i + model.batch_size]) for i in range(0, len(todo), model.batch_size)]
        ds = ray.data.from_blocks(blocks)
        ds = ds.map_batches(load_image_batch, fn_kwargs={"size": model.image_size}, batch_size=None,
                            num_cpus=config.load_num_cpus)
        ds = add_generation(ds, model.engine, model.sampling, model, rows=len(todo))
        fs, path = storage.filesystem(shards)
        with progress_of_tasks(model.name, len(todo), "item", show_bench) as tally:
            # Scoring and writing ask for the same resources, so Ray Data fuses them into one task per block.
            ds = ds.map_batches(score_batch, fn_kwargs={"model": model.name, "engine": engine_label(model.engine),
                                                        "tally": tally}, batch_size=None, num_cpus=0.25)
            ds.write_parquet(path, filesystem=fs, ray_remote_args={"num_cpus": 0.25})
        stats = ds.stats()
    seconds = time.perf_counter() - start

    scored, failed = _latest_by_id(_read_shards(shards))
    valid_ids = {row["id"] for row in items.rows}
    results = [{k: r[k] for k in RESULT_COLUMNS} for i, r in sorted(scored.items()) if i in valid_ids]
    errors = [ErrorRecord(r["image_path"], r["error"], id=r["id"]).to_dict()
              for i, r in sorted(failed.items()) if i in valid_ids]
    errors += items.errors
    results_path = storage.join(model_dir, "results.jsonl")
    errors_path = storage.join(model_dir, "errors.jsonl")
    write_jsonl(results_path, results)
    write_jsonl(errors_path, errors)
    return ModelRun(model.name, len(items.rows) + len(items.errors), len(results), len(errors), len(todo),
                    seconds, results_path, errors_path, stats)


def read_all_items(config: BenchConfig) -> ItemRows:
    items = ItemRows()
    for f in config.files:
        part = read_items(f.path, image_root=f.image_root, dataset=f.dataset, limit=f.limit)
        items.rows += part.rows
        items.errors += part.errors
    return items


def first_per_dataset(items: ItemRows, n: int | None) -> ItemRows:
    """The first `n` valid items of each dataset (all of them when n is None); bad items stay reported."""
    if n is None:
        return items
    taken: dict[str, int] = {}
    rows = []
    for row in items.rows:
        if taken.get(row["dataset"], 0) < n:
            taken[row["dataset"]] = taken.get(row["dataset"], 0) + 1
            rows.append(row)
    return ItemRows(rows=rows, errors=items.errors)


def run_bench(config: BenchConfig) -> list[ModelRun]:
    """Benchmark every model on every file; a rerun skips finished items. Returns one summary per model."""
    items = read_all_items(config)
    for err in items.errors:
        log.warning("bad FERBench item %s row %s: %s", err["source"], err["row"], err["reason"])
    model_items = [first_per_dataset(items, m.items_per_dataset) for m in config.models]
    requests = [len(i.rows) * m.sampling.n for i, m in zip(model_items, config.models)]
    with ThreadPoolExecutor(models_side_by_side(config, requests)) as pool:  # Ray Data runs each thread's dataset
        runs = list(pool.map(lambda m, i: run_model(m, i, config), config.models, model_items))
    storage.write_text(storage.join(config.out_dir, "summary.json"),
                       json.dumps([{k: v for k, v in asdict(r).items() if k != "stats"} | {"items_per_s": r.items_per_s}
                                   for r in runs], indent=2))
    return runs

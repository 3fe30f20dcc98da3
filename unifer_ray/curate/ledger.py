"""The ledger of a curation run: one row per image, Parquet shards written by Ray Data; resume and outputs.

Every image a run processes ends as one ledger row: done (its outputs in the row, `error` "") or failed (`error`
says why). A rerun skips the images with a done row and retries the failed ones, so an interrupted run resumes
without duplicates. A shard left unreadable by an interruption is deleted and its images redone. The outputs —
sharded items, the errors table, counts — are derived from the whole ledger at the end of every run.
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.parquet as pq
import ray
from ray.data.block import BlockAccessor
from ray.data.datasource import BlockBasedFileDatasink
from ray.data.expressions import col
from ray.util.queue import Queue

from unifer_ray import storage
from unifer_ray.ray_runtime import progress_of_tasks
from unifer_ray.records import ErrorRecord, jsonl_text, object_array, write_jsonl

log = logging.getLogger(__name__)


# Columns every ledger row has, whatever the pipeline: the image's id, where its pixels are, why it failed ("" when
# done) and the run that wrote it (milliseconds since the epoch at the run's start).
LEDGER_KEYS = ("id", "image_uri", "error", "run")


def done_ids(ledger_dir: str) -> set[str]:
    """Ids of the images with a done row. A corrupt shard (cut off by an interruption) is deleted: its images are
    not done; an I/O error reading a shard raises, as the shard may be fine."""
    done: set[str] = set()
    for shard in storage.list_files(ledger_dir, ".parquet"):
        fs, path = storage.filesystem(shard)
        try:
            table = pq.read_table(path, filesystem=fs, columns=["id", "error"])
        except pa.ArrowInvalid as exc:
            log.warning("deleting corrupt ledger shard %s (an interrupted write?): %s", shard, exc)
            fs.delete_file(path)
            continue
        done.update(i for i, e in zip(table["id"].to_pylist(), table["error"].to_pylist()) if not e)
    return done


def write_ledger(ds: ray.data.Dataset, ledger_dir: str, rows_per_shard: int, num_cpus: float) -> None:
    """Write with `num_cpus` per task: unless it differs from the last stage's, Ray Data fuses that stage into the
    write, which waits for `rows_per_shard` rows, so the stage (and the progress counts) would run once per shard."""
    fs, path = storage.filesystem(ledger_dir)
    ds.write_parquet(path, filesystem=fs, min_rows_per_file=rows_per_shard, ray_remote_args={"num_cpus": num_cpus})


def read_ledger(ledger_dir: str) -> ray.data.Dataset | None:
    """The ledger's shards, read with Ray Data's first Parquet datasource. Its second (Ray 2.60's default) starts a
    pool of up to 32 footer-reading actors, each a new worker process, for every read: 6.9 s against 0.26 s for a
    9-shard ledger on 2 cores (bench_ledger_read.py), twice a curation run. The shards are ours, listed already,
    with one small footer each."""
    shards = storage.list_files(ledger_dir, ".parquet")
    if not shards:
        return None
    fs, _ = storage.filesystem(ledger_dir)
    context = ray.data.DataContext.get_current()
    v2, context.use_datasource_v2 = context.use_datasource_v2, False
    try:
        return ray.data.read_parquet([storage.filesystem(s)[1] for s in shards], filesystem=fs)
    finally:
        context.use_datasource_v2 = v2


class JsonlDatasink(BlockBasedFileDatasink):
    """JSON Lines with UTF-8 text as is (pandas' writer would escape every '/' and non-ASCII character)."""

    def __init__(self, path: str, **kwargs):
        super().__init__(path, file_format="jsonl", **kwargs)

    def write_block_to_file(self, block: BlockAccessor, file) -> None:
        file.write(jsonl_text(block.to_arrow().to_pylist()).encode("utf-8"))


def write_items(ledger: ray.data.Dataset, expand: Callable[[dict], Iterator[dict]], items_dir: str,
                fmt: str) -> None:
    """Replace `items_dir` with the items of the ledger's done rows, `expand` turning one row into its items."""
    items = ledger.filter(expr=col("error") == "").flat_map(expand)
    fs, path = storage.filesystem(items_dir)
    if fmt == "parquet":
        items.write_parquet(path, filesystem=fs, mode="overwrite")
    else:
        items.write_datasink(JsonlDatasink(path, filesystem=fs, mode="overwrite"))


def done_counts(batch: dict, count_batch: Callable[[dict], dict[str, int]]) -> dict[str, int]:
    """`count_batch` of a batch's done rows."""
    ok = batch["error"] == ""
    return count_batch({k: v[ok] for k, v in batch.items()}) if ok.any() else {}


def tally_batch(batch: dict, *, count_batch: Callable[[dict], dict[str, int]], tally: Queue) -> dict:
    """Ray Data batch UDF at the end of the graph: the counts of a batch of ledger rows to the driver's progress."""
    tally.put(done_counts(batch, count_batch) | {"failed": int((batch["error"] != "").sum())})
    return batch


def summarise(ledger: ray.data.Dataset, done: set[str], count_batch: Callable[[dict], dict[str, int]]
              ) -> tuple[dict[str, int], list[dict]]:
    """One pass over the ledger: `count_batch` summed over the done rows ({key: count}), and the error records
    {source, id, reason} of the images that failed and were not done since (the latest run's reason)."""
    def one_row(batch: dict) -> dict:
        ok = batch["error"] == ""
        counts = done_counts(batch, count_batch)
        failed = [ErrorRecord(str(u), str(e), id=str(i)).to_dict() | {"run": int(r)}
                  for i, u, e, r in zip(*(batch[k][~ok] for k in ("id", "image_uri", "error", "run")))]
        return {"counts": object_array([json.dumps(counts)]), "failed": object_array([json.dumps(failed)])}

    totals: Counter = Counter()
    latest: dict[str, dict] = {}
    for row in ledger.map_batches(one_row, batch_size=1024, batch_format="numpy").take_all():
        totals.update(json.loads(row["counts"]))
        for e in json.loads(row["failed"]):
            if e["id"] not in done and e["run"] >= latest.get(e["id"], e)["run"]:
                latest[e["id"]] = e
    return dict(sorted(totals.items())), [{k: v for k, v in latest[i].items() if k != "run"} for i in sorted(latest)]


def nest(flat: dict[str, int]) -> dict:
    """{"a.b": 1} -> {"a": {"b": 1}}: flat counter keys, as count_batch functions write them, as a report."""
    out: dict = {}
    for key, value in flat.items():
        *parents, leaf = key.split(".")
        node = out
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return out


@dataclass
class LedgerRun:
    processed: int  # images sent through the graph by this run (0 when everything was done before)
    seconds: float
    counts: dict[str, int]  # count_batch summed over every done image of the ledger
    errors: list[dict]  # the errors table: rows of the sources that are wrong, and images that failed


def run_ledger(
    rows: list[dict],
    out_dir: str,
    *,
    build: Callable[[ray.data.Dataset], ray.data.Dataset],
    expand: Callable[[dict], Iterator[dict]],
    count_batch: Callable[[dict], dict[str, int]],
    progress: tuple[str, Callable[[Counter], dict]],
    num_cpus: float,
    fmt: str,
    rows_per_shard: int,
    source_errors: list[dict],
) -> LedgerRun:
    """Send the rows not done yet through `build` into the ledger, then rewrite the outputs from the ledger:
    `items/` (`expand` of every done row), `errors.jsonl`. Returns what the report needs.

    `build` turns the dataset of rows to do into ledger rows: one per input row, with LEDGER_KEYS among its
    columns (the input rows carry `id`, `image_uri`, `error` and `run`). While it runs, `progress` (a name, and
    the fields shown from the sums of `count_batch` so far) says how far it is; the counting joins the task of
    build's last stage, which takes `num_cpus` CPUs (a stage with the same resources: Ray Data fuses the two)."""
    ledger_dir = storage.join(out_dir, "ledger")
    done = done_ids(ledger_dir)
    run = int(time.time() * 1000)
    todo = [row | {"run": run} for row in rows if row["id"] not in done]
    log.info("%d images to process, %d done before", len(todo), len(rows) - len(todo))
    start = time.perf_counter()
    if todo:
        name, fields = progress

        def show(counts: Counter) -> tuple[int, dict]:
            return counts["images"] + counts["failed"], fields(counts) | {"failed": counts["failed"]}

        with progress_of_tasks(name, len(todo), "image", show) as tally:
            ds = build(ray.data.from_items(todo)).map_batches(
                tally_batch, fn_kwargs={"count_batch": count_batch, "tally": tally}, batch_size=None,
                num_cpus=num_cpus)
            write_ledger(ds, ledger_dir, rows_per_shard, num_cpus=num_cpus / 2)  # I/O, and not fused with the tally
    seconds = time.perf_counter() - start

    done = done_ids(ledger_dir)
    ledger = read_ledger(ledger_dir)
    write_items(ledger, expand, storage.join(out_dir, "items"), fmt)
    counts, failed = summarise(ledger, done, count_batch)
    errors = source_errors + failed
    write_jsonl(storage.join(out_dir, "errors.jsonl"), errors)
    return LedgerRun(len(todo), seconds, counts, errors)

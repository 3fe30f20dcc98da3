"""Reading a curation ledger back: Ray Data's default `read_parquet` (Ray 2.60's second Parquet datasource) against
`read_ledger` (the first), on one local Ray cluster, the same shards.

A curation run reads its ledger twice after the graph (items, then counts and errors), so every run pays this twice.
The ledger here: --shards Parquet shards of --rows rows each, with the columns a CoT ledger has (a JSON column of
four ~400-character traces a row). Each reader reads every row to the driver --repeats times; the first read of each
is printed apart (it includes the worker processes the reader starts). Prints seconds per read and the ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")

import pyarrow as pa
import pyarrow.parquet as pq
import ray

from unifer_ray.curate.ledger import read_ledger
from unifer_ray.ray_runtime import init_ray


def write_ledger_shards(ledger: Path, shards: int, rows: int) -> None:
    ledger.mkdir(parents=True)
    trace = json.dumps(["<think>" + "the brows are raised and the mouth is open " * 9 + "</think>"] * 4)
    for shard in range(shards):
        ids = [f"rafdb:/RAF-DB/aligned/train_{shard:04d}_{row:04d}.jpg" for row in range(rows)]
        pq.write_table(pa.table({"id": ids, "image_uri": ids, "error": [""] * rows, "run": [0] * rows,
                                 "items": [trace] * rows}), ledger / f"{shard:05d}.parquet")


def timed(read) -> list[float]:
    seconds = []
    for _ in range(ARGS.repeats):
        started = time.perf_counter()
        read().take_all()
        seconds.append(time.perf_counter() - started)
    return seconds


def main() -> None:
    ledger = Path(ARGS.workdir or tempfile.mkdtemp(prefix="bench_ledger_")) / "ledger"
    write_ledger_shards(ledger, ARGS.shards, ARGS.rows)
    init_ray(num_cpus=ARGS.num_cpus)
    shards = sorted(str(p) for p in ledger.glob("*.parquet"))
    default = timed(lambda: ray.data.read_parquet(shards))
    ours = timed(lambda: read_ledger(str(ledger)))
    print(f"\n{ARGS.shards} shards x {ARGS.rows} rows, {ARGS.num_cpus} logical CPUs; seconds per full read")
    print(f"{'reader':<44} {'first':>7} {'median of the rest':>19}")
    for name, s in (("ray.data.read_parquet (Ray's default, V2)", default), ("read_ledger (V1 datasource)", ours)):
        print(f"{name:<44} {s[0]:>7.2f} {statistics.median(s[1:]):>19.2f}")
    print(f"\nread_ledger vs the default, median of the rest: "
          f"{statistics.median(default[1:]) / statistics.median(ours[1:]):.1f}x faster")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", type=int, default=9)
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("--num-cpus", type=int, default=4)
    parser.add_argument("--workdir", default=None, help="default: a temporary directory")
    ARGS = parser.parse_args()
    main()

"""Curation throughput and memory: the CoT pipeline (oracle teacher) on synthetic faces, on a local Ray cluster.

Three runs, each into a fresh output directory, images decoded at --image-size:
- A: N images with 2 workers;  B: 10·N images with 1 worker;  C: 10·N images with 2 workers.
A worker is one logical CPU of the local cluster and one teacher actor (the cluster is restarted in between).
Rows/s is images through the streaming graph (decode → teacher → filters → ledger) per second, B vs C.
Peak memory is the largest sum of the proportional set sizes (PSS: shared pages such as the object store split
between the processes that map them) of this process and every process of the local Ray cluster, sampled every
0.1 s during the run, A vs C (same workers). Streaming should keep it flat while the data grows tenfold; the
memory of the idle cluster is printed too, and ratios of the growth above it.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")

import psutil
import ray

from unifer_ray.curate.config import CotSetConfig, OracleTeacherConfig, sources_under
from unifer_ray.curate.cot import curate_cot_set
from unifer_ray.data.synthetic import write_synthetic_datasets
from unifer_ray.ray_runtime import init_ray

IMAGES_PER_CLASS_STEP = 30  # the four synthetic datasets have 7 + 8 + 8 + 7 = 30 classes


def cluster_pss() -> int:
    """Bytes: PSS of this process and all its descendants (the local Ray cluster's processes)."""
    total = 0
    me = psutil.Process()
    for process in [me] + me.children(recursive=True):
        try:
            total += process.memory_full_info().pss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return total


class PeakMemory:
    """Samples cluster_pss() in a thread while the `with` block runs."""

    def __enter__(self) -> PeakMemory:
        self.peak, self._stop = cluster_pss(), threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.1):
            self.peak = max(self.peak, cluster_pss())

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def curate(data_root: Path, out_dir: Path, workers: int, image_size: int) -> dict:
    """One CoT run on a fresh local cluster of `workers` CPUs; rows/s and memory."""
    init_ray(num_cpus=workers)
    time.sleep(2)  # let the cluster's own processes settle before measuring its idle memory
    idle = cluster_pss()
    config = CotSetConfig(
        sources=sources_under(str(data_root)), out_dir=str(out_dir), k=4, m=2, load_batch_size=32,
        load_num_cpus=0.75,  # with a 0.25-CPU teacher actor, one decode task per worker runs beside it
        rows_per_shard=1000,
        teacher=OracleTeacherConfig(wrong_rate=0.2, batch_size=64, concurrency=workers, num_cpus=0.25,
                                    image_size=image_size),
    )
    with PeakMemory() as memory:
        stats = curate_cot_set(config)
    ray.shutdown()
    return {"images": stats["images_done"], "seconds": stats["this_run"]["seconds"],
            "rows_per_s": stats["this_run"]["images_per_s"], "idle": idle, "peak": memory.peak}


def mib(n: int) -> str:
    return f"{n / 2**20:.0f} MiB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=300, help="images of the small run (a multiple of 30)")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--workdir", default=None, help="default: a temporary directory")
    args = parser.parse_args()
    per_class = max(1, args.n // IMAGES_PER_CLASS_STEP)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench_curation_"))

    start = time.perf_counter()
    write_synthetic_datasets(work / "small", train_per_class=per_class, test_per_class=0, seed=0)
    write_synthetic_datasets(work / "large", train_per_class=10 * per_class, test_per_class=0, seed=1)
    print(f"rendered {30 * per_class} + {300 * per_class} faces in {time.perf_counter() - start:.0f}s ({work})")

    a = curate(work / "small", work / "out_a", workers=2, image_size=args.image_size)
    b = curate(work / "large", work / "out_b", workers=1, image_size=args.image_size)
    c = curate(work / "large", work / "out_c", workers=2, image_size=args.image_size)

    print(f"\n{'run':<28} {'images':>7} {'seconds':>8} {'rows/s':>8} {'idle':>10} {'peak':>10}")
    for name, r in (("A: N, 2 workers", a), ("B: 10N, 1 worker", b), ("C: 10N, 2 workers", c)):
        print(f"{name:<28} {r['images']:>7} {r['seconds']:>8.1f} {r['rows_per_s']:>8.1f} "
              f"{mib(r['idle']):>10} {mib(r['peak']):>10}")
    print(f"\nrows/s, 2 workers / 1 worker (10N images): {c['rows_per_s'] / b['rows_per_s']:.2f}x")
    print(f"peak memory, 10N / N images (2 workers):    {c['peak'] / a['peak']:.2f}x "
          f"(growth above the idle cluster: {max(c['peak'] - c['idle'], 1) / max(a['peak'] - a['idle'], 1):.2f}x; "
          "goal <= 1.5x)")


if __name__ == "__main__":
    main()

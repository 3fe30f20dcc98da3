"""A run's logs in `log_dir`, the same for SFT and RLVR: one record per step in metrics.jsonl and TensorBoard, the
completions of sampled steps in samples.jsonl, rows that could not be used in errors.jsonl.

A resumed run appends: the steps after the last checkpoint run, and are logged, again. Step records and samples
carry `start_step`, the step the run (or Ray Train's attempt) started from; the last record of a step is the one
that counts.
"""

from __future__ import annotations

import math
from pathlib import Path

from unifer_ray.records import append_jsonl, read_log

METRICS_FILE = "metrics.jsonl"
SAMPLES_FILE = "samples.jsonl"
ERRORS_FILE = "errors.jsonl"
TENSORBOARD_DIR = "tensorboard"


class RunLog:
    def __init__(self, log_dir: str | Path, start_step: int):
        self.dir = Path(log_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.start_step = start_step
        from torch.utils.tensorboard import SummaryWriter

        self.tensorboard = SummaryWriter(str(self.dir / TENSORBOARD_DIR))

    def step(self, record: dict) -> None:
        """The step's record; each of its finite numbers is also a TensorBoard scalar of that name at `step`."""
        append_jsonl(self.dir / METRICS_FILE, [record | {"start_step": self.start_step}])
        for name, value in record.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                self.tensorboard.add_scalar(name, value, record["step"])
        self.tensorboard.flush()

    def samples(self, rows: list[dict]) -> None:
        append_jsonl(self.dir / SAMPLES_FILE, [row | {"start_step": self.start_step} for row in rows])

    def errors(self, rows: list[dict]) -> None:
        append_jsonl(self.dir / ERRORS_FILE, rows)

    def close(self) -> None:
        self.tensorboard.close()


def read_run_log(log_dir: str | Path, name: str = METRICS_FILE) -> list[dict]:
    return read_log(Path(log_dir) / name)


def last_per_step(records: list[dict]) -> list[dict]:
    """The step records of a run log in step order, one per step: the last, which counts after a resume."""
    by_step = {r["step"]: r for r in records}
    return [by_step[s] for s in sorted(by_step)]

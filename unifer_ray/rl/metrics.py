"""RLVR logs in `log_dir`: one record per step in metrics.jsonl and TensorBoard, the completions of sampled steps
in samples.jsonl, bad prompts in errors.jsonl.

A resumed run appends: the steps after the last checkpoint run, and are logged, again; the last record of a step is
the one that counts (records and samples carry `attempt`, the step the run started from).
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
    def __init__(self, log_dir: str, attempt: int):
        self.dir = Path(log_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.attempt = attempt
        from torch.utils.tensorboard import SummaryWriter

        self.tensorboard = SummaryWriter(str(self.dir / TENSORBOARD_DIR))

    def step(self, record: dict) -> None:
        self._append(METRICS_FILE, [record | {"attempt": self.attempt}])
        for name, value in record.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                self.tensorboard.add_scalar(name, value, record["step"])
        self.tensorboard.flush()

    def samples(self, rows: list[dict]) -> None:
        self._append(SAMPLES_FILE, [row | {"attempt": self.attempt} for row in rows])

    def errors(self, rows: list[dict]) -> None:
        self._append(ERRORS_FILE, rows)

    def close(self) -> None:
        self.tensorboard.close()

    def _append(self, name: str, rows: list[dict]) -> None:
        append_jsonl(self.dir / name, rows)


def read_run_log(log_dir: str | Path, name: str = METRICS_FILE) -> list[dict]:
    return read_log(Path(log_dir) / name)

"""Training metrics: per-step records to metrics.jsonl and TensorBoard, bad rows to errors.jsonl, progress.

Workers hand their records to `ray.train.report`; `MetricsLogger` runs in the Ray Train controller, which lives on
the driver's node, so the driver can follow the same files for its progress bar.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from ray.train import UserCallback

from unifer_ray.progress import Progress
from unifer_ray.records import append_jsonl, read_log

METRICS_FILE = "metrics.jsonl"
ERRORS_FILE = "errors.jsonl"
TENSORBOARD_DIR = "tensorboard"
SCALARS = ("loss", "lr", "grad_norm", "tokens_per_s")


class MetricsLogger(UserCallback):
    """Appends every step record (tagged with the step the attempt started from) and every error record.

    After a restart the steps since the last checkpoint are trained, and logged, again: the file is the history of
    what ran; the last record of a step is the one that counts.
    """

    def __init__(self, log_dir: str):
        self.log_dir = Path(log_dir)
        self._tensorboard = None

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        report = metrics[0]  # every worker reports the same all-reduced numbers; rank 0's are the ones kept
        append_jsonl(self.log_dir / METRICS_FILE,
                     [record | {"start_step": report["start_step"]} for record in report["records"]])
        append_jsonl(self.log_dir / ERRORS_FILE, [error for worker in metrics for error in worker["errors"]])
        writer = self._writer()
        for record in report["records"]:
            for name in SCALARS:
                writer.add_scalar(f"train/{name}", record[name], record["step"])
        writer.flush()

    def _writer(self):
        if self._tensorboard is None:
            from torch.utils.tensorboard import SummaryWriter

            self._tensorboard = SummaryWriter(str(self.log_dir / TENSORBOARD_DIR))
        return self._tensorboard


def last_record(log_dir: str | Path) -> dict | None:
    records = read_log(Path(log_dir) / METRICS_FILE)
    return records[-1] if records else None


def follow_metrics(log_dir: str | Path, progress: Progress) -> Callable[[], None]:
    """A poll (for `polling`) that moves `progress` to the last step logged in `log_dir`."""
    def poll() -> None:
        record = last_record(log_dir)
        if record is not None and record["step"] != progress.n:
            progress.update(record["step"], loss=record["loss"], lr=f"{record['lr']:.2e}",
                            tok_s=round(record["tokens_per_s"]))

    return poll

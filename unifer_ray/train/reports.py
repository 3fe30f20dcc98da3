"""The part of an SFT run that Ray Train's controller runs: the callback that writes the workers' reports to the run
log. A module of its own because the controller imports the callback's module at every run's start: train/sft.py
imports the training loop, and with it torch, transformers and DeepSpeed (about 4 s of CPU more on 2 cores), which
only the workers use."""

from __future__ import annotations

from typing import Any

from ray.train import UserCallback

from unifer_ray.runlog import RunLog


class LogReports(UserCallback):
    """Writes what the workers hand to `ray.train.report` to the run log: the step records (every worker reports the
    same all-reduced numbers; rank 0's are kept) and every worker's error records.

    It runs in the Ray Train controller, which lives on the driver's node, so the driver follows the same files for
    its progress bar (train/sft.py `follow_run_log`). The controller outlives the workers: after a restart, reports
    carry the step the new attempt started from."""

    def __init__(self, log_dir: str):
        self.log_dir = log_dir
        self.run_log: RunLog | None = None

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
        report = metrics[0]
        if self.run_log is None:
            self.run_log = RunLog(self.log_dir, start_step=report["start_step"])
        self.run_log.start_step = report["start_step"]
        for record in report["records"]:
            self.run_log.step(record)
        self.run_log.errors([error for worker in metrics for error in worker["errors"]])

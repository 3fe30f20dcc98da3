"""Run logs through records.py: appended across attempts, read back whole, a record still being appended left
for the next read, a malformed line named; a resumed run's steps counted once (runlog.py)."""

from __future__ import annotations

import pytest

from unifer_ray.records import append_jsonl, read_log
from unifer_ray.runlog import METRICS_FILE, last_per_step, read_run_log


def test_a_log_appends_and_reads_back_and_names_a_malformed_line(tmp_path):
    log = tmp_path / "metrics.jsonl"
    assert read_log(log) == []
    append_jsonl(log, [{"step": 1, "label": "happiness"}])
    append_jsonl(log, [])  # nothing to add leaves the file as it was
    append_jsonl(log, [{"step": 2, "label": "sadness"}])
    assert read_log(log) == [{"step": 1, "label": "happiness"}, {"step": 2, "label": "sadness"}]

    log.write_text(log.read_text() + '{"step": 3, "lab')  # a record a running job is still appending
    assert len(read_log(log)) == 2
    log.write_text(log.read_text() + '\n')  # cut short by a crash
    with pytest.raises(ValueError, match=r"metrics.jsonl:3: not a JSON record"):
        read_log(log)


def test_a_resumed_run_counts_the_last_record_of_each_step(tmp_path):
    log = tmp_path / METRICS_FILE
    append_jsonl(log, [{"step": s, "start_step": 0} for s in (1, 2, 3)])  # died after step 3, checkpoint at 2
    append_jsonl(log, [{"step": s, "start_step": 2} for s in (3, 4)])
    records = last_per_step(read_run_log(tmp_path))
    assert [(r["step"], r["start_step"]) for r in records] == [(1, 0), (2, 0), (3, 2), (4, 2)]

"""The `unifer` command as a user runs it: a real subprocess, real files."""

from __future__ import annotations

import json
import subprocess
import sys

from unifer_ray.labels import RAFDB


def unifer(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "unifer_ray.cli", *args], capture_output=True, text=True, timeout=120)


def test_convert_ferbench_writes_reference_items(synthetic_root, tmp_path):
    out = tmp_path / "rafdb_qa.json"
    proc = unifer("convert", "ferbench", "--dataset", "rafdb", "--root", str(synthetic_root / "RAF-DB"), "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    items = json.loads(out.read_text())
    assert items and all(set(i) == {"image_path", "true_label", "prompt", "candidate_labels"} for i in items)
    assert all(i["image_path"].startswith("/RAF-DB/aligned/test_") for i in items)
    assert all(i["candidate_labels"] == list(RAFDB.labels) for i in items)


def test_bench_score_reads_reference_format(tmp_path):
    prompt = "p"
    rows = [
        {"image_path": "/a.jpg", "true_label": "happiness", "prompt": prompt, "candidate_labels": list(RAFDB.labels),
         "model_response": "<think>smile</think><answer>happiness</answer>"},
        {"image_path": "/b.jpg", "true_label": "anger", "prompt": prompt, "candidate_labels": list(RAFDB.labels),
         "model_response": "<think>frown</think><answer>sadness</answer>"},
    ]
    results = tmp_path / "rafdb_some_model_results.json"
    results.write_text(json.dumps(rows))
    proc = unifer("bench", "score", "--results", str(results), "--mode", "paper", "--out", str(tmp_path / "report"))
    assert proc.returncode == 0, proc.stderr
    metrics = json.loads((tmp_path / "report" / "metrics.json").read_text())
    (model,) = metrics
    assert metrics[model]["rafdb"]["accuracy"] == 0.5
    assert "50.00" in proc.stdout or "0.50" in proc.stdout


def test_bad_config_names_the_field(tmp_path):
    config = tmp_path / "bench.yaml"
    config.write_text("files: []\nmodels:\n  - name: m\n    engine: {engine: hf}\nout_dir: x\n")
    proc = unifer("bench", "run", "--config", str(config))
    assert proc.returncode == 2
    assert "files" in proc.stderr and "models.0.engine.model" in proc.stderr

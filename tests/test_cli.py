"""The `unifer` command as a user runs it: a real subprocess, real files."""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest

import unifer_ray
from unifer_ray.cli import build_parser
from unifer_ray.labels import RAFDB

HEAVY = {"torch", "transformers", "ray", "vllm", "deepspeed"}


def unifer(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "unifer_ray.cli", *args], capture_output=True, text=True, timeout=120)


def test_convert_ferbench_writes_reference_items(synthetic_root, tmp_path):
    out = tmp_path / "rafdb_qa.json"
    proc = unifer("convert", "ferbench", "--dataset", "rafdb", "--root", str(synthetic_root / "RAF-DB"),
                  "--out", str(out))
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


def _subcommands(parser: argparse.ArgumentParser, prefix: str = "unifer") -> dict[str, argparse.ArgumentParser]:
    """Every runnable command ("unifer bench run", ...) and its parser."""
    [group] = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    out = {}
    for name, sub in group.choices.items():
        nested = any(isinstance(a, argparse._SubParsersAction) for a in sub._actions)
        out |= _subcommands(sub, f"{prefix} {name}") if nested else {f"{prefix} {name}": sub}
    return out


def test_every_command_says_what_it_does_with_an_example():
    commands = _subcommands(build_parser())
    assert len(commands) == 16
    for name, parser in commands.items():
        help_text = parser.format_help()
        assert parser.description, name
        assert re.search(rf"example:\n  ([A-Z_]+=\S+ )*{name} ", help_text), name  # after the variables it needs


def test_config_defaults_are_the_packaged_files_and_can_be_overridden(tmp_path):
    commands = _subcommands(build_parser())
    for name in ("unifer sft", "unifer rlvr", "unifer curate cot", "unifer pipeline", "unifer demo", "unifer serve"):
        default = Path(commands[name].parse_args([]).config)
        assert default.is_file() and default.parent == Path(unifer_ray.__file__).parent / "configs", name
        assert "(default: the package's configs/" in " ".join(commands[name].format_help().split())
    assert build_parser().parse_args(["sft", "--config", "mine.yaml"]).config == "mine.yaml"
    # Without --config, `unifer sft` reads the packaged tiny.yaml: its error names that file.
    proc = unifer("sft", "--section", "no_such_section")
    assert proc.returncode == 2 and "tiny.yaml: has no 'no_such_section' section" in proc.stderr


def test_version():
    proc = unifer("--version")
    assert proc.returncode == 0 and proc.stdout.strip() == f"unifer {version('unifer-ray')}"


@pytest.mark.parametrize(("args", "returncode", "says"), [
    (["--help"], 0, "usage: unifer"),
    (["pipeline", "--help"], 0, "curate_cot,curate_rlvr,sft,rlvr,bench,serve"),
    (["--version"], 0, "unifer "),
    (["rlvr", "--no-such-flag"], 2, "unrecognized arguments: --no-such-flag"),
])
def test_help_version_and_argument_errors_import_no_stage(args, returncode, says):
    """What answers before any work starts imports none of the stages' libraries: it answers at once."""
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "unifer_ray.cli", *args], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == returncode and says in proc.stdout + proc.stderr
    imported = re.findall(r"^import time:\s+\d+ \|\s+\d+ \|\s+([\w.]+)$", proc.stderr, flags=re.MULTILINE)
    assert "unifer_ray.stages" in imported  # -X importtime listed what the command imported
    assert not {name.split(".")[0] for name in imported} & HEAVY

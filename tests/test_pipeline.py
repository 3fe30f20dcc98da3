"""The whole pipeline: configs that hand over stage to stage, and the demo end to end at toy size on real Ray."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from unifer_ray.config import ConfigError, read_yaml
from unifer_ray.demo import moved_below, run_demo
from unifer_ray.engines.platform import cpu_engine_dtype, vllm_installed, vllm_version
from unifer_ray.pipeline import STAGES, Pipeline

REPO = Path(__file__).resolve().parent.parent


def tiny_sections(out: Path) -> dict:
    return moved_below(read_yaml(REPO / "configs" / "tiny.yaml"), out)


def test_demo_paths_move_below_out_and_nothing_else_moves(tmp_path):
    moved = moved_below({"a": "runs/demo/x/y", "b": ["runs/demo", "runs/demonstration"], "c": 3, "d": "configs/x"},
                        tmp_path)
    assert moved == {"a": str(tmp_path / "x" / "y"), "b": [str(tmp_path), "runs/demonstration"], "c": 3,
                     "d": "configs/x"}


@pytest.mark.parametrize("config", ["tiny.yaml", "qwen2_5_vl_7b.yaml"])
def test_shipped_configs_hand_over_from_stage_to_stage(config, tmp_path):
    pipeline = Pipeline(moved_below(read_yaml(REPO / "configs" / config), tmp_path), source=config)
    assert pipeline.config.stages == list(STAGES)
    models = pipeline.models()
    assert list(models) == ["base", "sft", "rlvr"]
    assert models["sft"] == pipeline.rlvr.model  # RLVR starts from what SFT exports


@pytest.mark.parametrize("field, value, message", [
    ("sft", {"data": ["elsewhere/cot"]}, "sft.data is"),
    ("rlvr", {"model": "runs/demo/models/other"}, "rlvr.model is"),
    ("rlvr", {"data": {"paths": ["elsewhere/rlvr"], "image_size": 112}}, "rlvr.data.paths is"),
])
def test_a_stage_that_does_not_read_what_the_one_before_writes_is_refused(field, value, message, tmp_path):
    sections = read_yaml(REPO / "configs" / "tiny.yaml")
    sections[field] = sections[field] | value
    with pytest.raises(ConfigError, match=message):
        Pipeline(moved_below(sections, tmp_path), source="tiny.yaml")


def test_only_the_sections_of_the_chosen_stages_are_needed(tmp_path):
    sections = tiny_sections(tmp_path)
    for name in ("curate_cot", "curate_rlvr", "sft"):
        del sections[name]
    sections["pipeline"]["stages"] = ["rlvr", "serve"]
    assert Pipeline(sections, source="tiny.yaml").models() == {"base": str(tmp_path / "models" / "tiny-sft"),
                                                               "rlvr": str(tmp_path / "models" / "tiny-rlvr")}
    del sections["rlvr"]
    with pytest.raises(ConfigError, match="has no 'rlvr' section"):
        Pipeline(sections, source="tiny.yaml")


def test_the_demo_runs_every_stage_and_reports_base_sft_and_rlvr(ray_cluster, tmp_path):
    """configs/tiny.yaml at toy size: every stage runs for real, a few steps each. The serve stage's request runs
    against test_serve's app (test_the_pipelines_streamed_question_reads_the_answer_back)."""
    config = read_yaml(REPO / "configs" / "tiny.yaml")
    config["pipeline"]["stages"] = ["curate_cot", "curate_rlvr", "sft", "rlvr", "bench"]
    config["demo"] |= {"train_per_class": 3, "test_per_class": 1}
    config["pipeline"]["bench_model"]["sampling"]["max_new_tokens"] = 12
    config["sft"] |= {"max_steps": 3, "micro_batch_size": 2, "num_workers": 1, "strategy": "ddp",
                      "checkpoint_every": 2, "report_every": 1}
    config["rlvr"] |= {"steps": 2, "checkpoint_every": 1, "mode": "sync"}
    config["rlvr"]["grpo"] |= {"group_size": 2, "prompts_per_step": 2, "max_new_tokens": 12}
    config["rlvr"]["learner"] |= {"num_workers": 1, "micro_batch_size": 4}
    path = tmp_path / "toy.yaml"
    path.write_text(yaml.safe_dump(config))

    out = tmp_path / "demo"
    report = run_demo(str(path), str(out))

    assert report == out / "report" / "report.md"
    summary = json.loads((out / "report" / "report.json").read_text())
    assert [row["stage"] for row in summary["stages"]] == [
        "synthetic data", "tiny model", "FERBench files", "curate CoT", "curate RLVR", "SFT (Ray Train)",
        "RLVR (GRPO)", "FERBench base vs SFT vs RLVR"]
    vllm = f"vllm {vllm_version()}" if vllm_installed() else None
    engines = {row["stage"]: row.get("engine") for row in summary["stages"]}
    assert engines["curate CoT"] == "oracle teacher" and engines["SFT (Ray Train)"] == "torch, ddp"
    assert engines["RLVR (GRPO)"] == (f"{vllm} {cpu_engine_dtype()} rollouts" if vllm else "hf rollouts")
    assert engines["FERBench base vs SFT vs RLVR"] == (f"{vllm} {cpu_engine_dtype()}" if vllm else "hf")
    assert list(summary["ferbench"]) == ["tiny-base", "tiny-sft", "tiny-rlvr"]
    for per_dataset in summary["ferbench"].values():
        assert set(per_dataset) == {"rafdb", "ferplus", "affectnet", "sfew", "overall"}
    for model in summary["ferbench"]:  # the leaderboard comes from vLLM wherever it is installed
        rows = [json.loads(line) for line in open(out / "bench" / "results" / model / "results.jsonl")]
        assert rows and {row["engine"] for row in rows} == {vllm or "hf"}
    assert summary["sft"]["steps"] == 3 and summary["rlvr"]["steps"] == 2
    for model in ("tiny-sft", "tiny-rlvr"):
        assert (out / "models" / model / "config.json").is_file()
    for plot in ("sft_loss.png", "rlvr_rewards.png", "ferbench_accuracy.png"):
        assert (out / "report" / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = report.read_text()
    assert "| tiny-rlvr |" in text and "![FERBench strict accuracy](ferbench_accuracy.png)" in text

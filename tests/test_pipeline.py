"""The whole pipeline: configs that hand over stage to stage, and the demo end to end at toy size on real Ray."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml

from unifer_ray.config import ConfigError, parse_config, read_yaml
from unifer_ray.demo import DemoConfig, moved_below, rlvr_steps_within, run_demo
from unifer_ray.engines import engine_description
from unifer_ray.engines.platform import cpu_engine_dtype, vllm_installed, vllm_version
from unifer_ray.pipeline import STAGES, Pipeline
from unifer_ray.pipeline_report import first_vs_last_fifth, moving_average, task_accuracy, write_pipeline_report
from unifer_ray.records import append_jsonl

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


def test_the_bench_compares_the_configured_models_and_says_which(tmp_path):
    sections = tiny_sections(tmp_path)
    pipeline = Pipeline(sections, source="tiny.yaml")  # the demo leaves out its random-init base model
    assert pipeline.compared() == ["sft", "rlvr"] and pipeline.title("bench") == "FERBench SFT vs RLVR"
    assert [m.name for m in pipeline.bench_models("tiny-")] == ["tiny-sft", "tiny-rlvr"]
    del sections["pipeline"]["compare"]
    pipeline = Pipeline(sections, source="tiny.yaml")
    assert pipeline.title("bench") == "FERBench base vs SFT vs RLVR"
    assert [m.engine.model for m in pipeline.bench_models("")] == list(pipeline.models().values())


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


def test_the_demo_generates_with_vllm_wherever_it_is_installed(tmp_path):
    """The demo's FERBench and rollouts: vLLM in the CPU's dtype where it is installed, transformers elsewhere."""
    pipeline = Pipeline(tiny_sections(tmp_path), source="tiny.yaml")
    vllm = f"vllm {vllm_version()} {cpu_engine_dtype()}" if vllm_installed() else None
    assert engine_description(pipeline.config.bench_model.engine, on_cpu=True) == (vllm or "hf")
    rollouts = pipeline.rlvr.rollout.engine.spec(pipeline.rlvr.model)
    assert engine_description(rollouts, on_cpu=True) == (vllm or "hf")


def test_the_demo_runs_every_stage_and_reports_sft_against_rlvr(ray_cluster, tmp_path, capsys):
    """configs/tiny.yaml at toy size: every stage runs for real, a few steps each. Its generation runs on
    transformers here: vLLM's FERBench and rollouts have their own tests (test_bench, test_rl_system), which
    start the engines this test would start four more times; the demo's own choice of vLLM is the test above. The
    serve stage's request runs against test_serve's app (test_the_pipelines_streamed_question_reads_the_answer_back)."""
    config = read_yaml(REPO / "configs" / "tiny.yaml")
    config["pipeline"]["stages"] = ["curate_cot", "curate_rlvr", "sft", "rlvr", "bench"]
    config["pipeline"]["bench_model"]["engine"]["engine"] = "hf"
    config["rlvr"]["rollout"]["engine"]["engine"] = "hf"
    # A budget of 1 s fits no RLVR step on any machine: the demo's sizing gives RLVR its fewest, 3 of at most 9.
    config["demo"] |= {"train_per_class": 3, "test_per_class": 1, "time_budget_s": 1, "min_rlvr_steps": 3}
    config["pipeline"]["bench_model"]["sampling"]["max_new_tokens"] = 12
    config["sft"] |= {"max_steps": 3, "micro_batch_size": 2, "num_workers": 1, "strategy": "ddp",
                      "checkpoint_every": 2, "report_every": 1}
    config["rlvr"] |= {"steps": 9, "checkpoint_every": 1, "mode": "sync"}
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
        "RLVR (GRPO)", "FERBench SFT vs RLVR"]
    engines = {row["stage"]: row.get("engine") for row in summary["stages"]}
    assert engines["curate CoT"] == "oracle teacher" and engines["SFT (Ray Train)"] == "torch, ddp"
    assert engines["RLVR (GRPO)"] == "hf rollouts" and engines["FERBench SFT vs RLVR"] == "hf"
    assert list(summary["ferbench"]) == ["tiny-sft", "tiny-rlvr"]
    for per_dataset in summary["ferbench"].values():
        assert set(per_dataset) == {"rafdb", "ferplus", "affectnet", "sfew", "overall"}
    for model in summary["ferbench"]:  # the leaderboard comes from the configured engine
        rows = [json.loads(line) for line in open(out / "bench" / "results" / model / "results.jsonl")]
        assert rows and {row["engine"] for row in rows} == {"hf"}
    assert summary["sft"]["steps"] == 3 and summary["rlvr"]["steps"] == 3
    sized = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("RLVR: "))
    assert sized.startswith("RLVR: 3 steps of at most 9: 0 predicted to fit the demo's 1 s after ")
    assert "s a step; hf rollouts)" in sized
    assert sized.endswith("; demo.min_rlvr_steps is 3, so the demo may run past its budget")
    for model in ("tiny-sft", "tiny-rlvr"):
        assert (out / "models" / model / "config.json").is_file()
    for plot in ("sft_loss.png", "rlvr_rewards.png", "ferbench_accuracy.png"):
        assert (out / "report" / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = report.read_text()
    assert "| tiny-rlvr |" in text and "![FERBench strict accuracy](ferbench_accuracy.png)" in text
    # RLVR against SFT item by item: the same items, the changed answers make the change of accuracy.
    paired = summary["paired"]
    assert (paired["before"], paired["after"]) == ("tiny-sft", "tiny-rlvr")
    for model, key in (("tiny-sft", "before_correct"), ("tiny-rlvr", "after_correct")):
        overall = summary["ferbench"][model]["overall"]
        assert paired[key] == pytest.approx(overall["accuracy"] * paired["items"])  # no failed inference here
    assert paired["after_correct"] - paired["before_correct"] == paired["corrected"] - paired["broken"]
    assert 0 < paired["mcnemar_p"] <= 1 and "## tiny-rlvr vs tiny-sft on the same FERBench items" in text


def test_the_demo_gives_rlvr_the_steps_its_time_budget_leaves_on_the_machine():
    # A 2-core Zen 4: 140 s to the end of SFT at 0.227 s a step leaves 570 - 140 - 136 s for steps of 1.135 s.
    assert rlvr_steps_within(570, 140, 0.227, "vllm") == 258
    # The same machine in a slower hour, and an AVX2-only EPYC (SFT at 0.52 s a step, done after 315 s): none fit.
    assert rlvr_steps_within(570, 175, 0.287, "vllm") == 155
    assert rlvr_steps_within(570, 315, 0.52, "vllm") == 0
    # The Zen 4 without vLLM (`make VLLM=no demo`): transformers rollouts took 2.3 s a step after SFT's 0.248 s.
    assert rlvr_steps_within(570, 151, 0.248, "hf") == 108
    with pytest.raises(ConfigError, match="min_rlvr_steps"):
        parse_config({"min_rlvr_steps": 0}, DemoConfig, source="tiny.yaml [demo]")
    assert parse_config({}, DemoConfig).time_budget_s is None  # no budget: rlvr.steps, however long


def test_moving_average_and_its_standard_error_skip_steps_without_a_value():
    means, errors = moving_average([0.0, 1.0, float("nan"), 3.0], window=2)
    assert means.tolist() == [0.0, 0.5, 1.0, 3.0]  # a task absent from a step (NaN) is left out of its window
    # [0, 1]: standard deviation √0.5, over √2 values: 0.5. One value has no spread to estimate.
    assert math.isnan(errors[0]) and errors[1] == pytest.approx(0.5) and math.isnan(errors[2])


def test_first_and_last_fifth_with_standard_errors():
    fifths = first_vs_last_fifth([0.5, 0.7] + [0.6] * 6 + [0.8, 1.0])  # 10 steps: fifths of 2
    # Each fifth: standard deviation √0.02 over √2 values, 0.1; the gain 0.3 over √(0.1² + 0.1²).
    assert fifths == pytest.approx({"steps_each": 2, "first": 0.6, "first_se": 0.1, "last": 0.9, "last_se": 0.1,
                                    "gain_in_se": 0.3 / math.sqrt(0.02)})
    assert first_vs_last_fifth([0.5] * 4)["gain_in_se"] is None  # no spread: no gain in standard errors


def rlvr_records(steps: int) -> list[dict]:
    """A run whose accuracy rises by 0.01 a step; the unified task is in the odd steps only."""
    return [{"step": s, "accuracy": 0.5 + 0.01 * s, "reward/mean": 1.5 + 0.01 * s, "format_rate": 1.0,
             "kl": 0.001 * s, "clip_fraction": 0.0, "rollout_is_clipped_fraction": 0.0,
             "accuracy/mc": 0.6 + 0.01 * s, **({"accuracy/unified": 0.4} if s % 2 else {})}
            for s in range(1, steps + 1)]


def test_task_accuracy_over_the_first_and_last_fifths():
    records = rlvr_records(10)  # fifths: steps 1-2 and 9-10
    records[-2].pop("accuracy/unified")  # now in step 1 only of the four
    assert task_accuracy(records) == {"mc": {"first": pytest.approx(0.615), "last": pytest.approx(0.695)},
                                      "unified": {"first": 0.4, "last": None}}


def test_the_report_shows_rlvr_learning_and_the_paired_comparison(tmp_path):
    (tmp_path / "rlvr").mkdir()
    append_jsonl(tmp_path / "rlvr" / "metrics.jsonl", rlvr_records(20))
    paired = {"before": "tiny-sft", "after": "tiny-rlvr", "items": 900, "before_correct": 620, "after_correct": 641,
              "corrected": 83, "broken": 62, "mcnemar_p": 0.0964}
    report = write_pipeline_report(tmp_path / "report", [{"stage": "RLVR (GRPO)", "seconds": 1.0}], None,
                                   sft_log=None, rlvr_log=str(tmp_path / "rlvr"), paired=paired)
    summary = json.loads((tmp_path / "report" / "report.json").read_text())
    assert summary["paired"] == paired
    # Steps 1-4 and 17-20: means 0.525 and 0.685; squared deviations 2 × (0.015² + 0.005²) = 0.0005, so a standard
    # deviation √(0.0005 / 3) over √4 values each; the gain 0.16 over √2 of those.
    accuracy = summary["rlvr"]["accuracy"]
    se = math.sqrt(0.0005 / 3) / 2
    assert accuracy == pytest.approx({"steps_each": 4, "first": 0.525, "first_se": se, "last": 0.685, "last_se": se,
                                      "gain_in_se": 0.16 / (se * math.sqrt(2))})
    assert summary["rlvr"]["accuracy_by_task"]["unified"] == {"first": 0.4, "last": 0.4}
    assert summary["rlvr"]["steps"] == 20 and summary["rlvr"]["kl_last"] == pytest.approx(0.02)
    text = report.read_text()
    assert "| 900 | 620 | 641 | 83 | 62 | 0.096 |" in text and "McNemar exact p" in text
    assert "0.525 ± 0.006 over the first 4 steps, 0.685 ± 0.006 over the last 4 (+17.5 standard errors)" in text
    assert "Per task type, first → last: mc 0.625 → 0.785, unified 0.400 → 0.400." in text
    assert (tmp_path / "report" / "rlvr_rewards.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

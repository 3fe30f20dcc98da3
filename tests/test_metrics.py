"""FERBench metrics against hand-computed values; reference-format and our files score alike; report files."""

from __future__ import annotations

import json
import math

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from unifer_ray.bench.metrics import (
    bootstrap_ci,
    compute_metrics,
    mcnemar_exact,
    model_name_from_path,
    paired_comparison,
    read_results,
)
from unifer_ray.bench.report import leaderboard_text, score_files
from unifer_ray.labels import CANONICAL, DATASETS
from unifer_ray.parsing import parsed_columns
from unifer_ray.prompts import ferbench_prompt

RAF = list(DATASETS["rafdb"].labels)
FER = list(DATASETS["ferplus"].labels)


def _ok(answer: str) -> str:
    return f"<think>t</think><answer>{answer}</answer>"


# (dataset, true label, response, error). Strict predictions and correctness noted per row.
CRAFTED = [
    ("rafdb", "happiness", _ok("happiness"), ""),  # happiness, right, format ok
    ("rafdb", "happiness", _ok("sadness"), ""),  # sadness, wrong, format ok
    ("rafdb", "sadness", _ok("sadness"), ""),  # sadness, right, format ok
    ("rafdb", "anger", "I don't know", ""),  # unknown, wrong, no format
    ("rafdb", "anger", "<answer>anger</answer>", ""),  # anger, right, no format (no think)
    ("ferplus", "happy", _ok("Happy"), ""),  # happy, right
    ("ferplus", "sad", _ok("angry"), ""),  # angry, wrong
    ("ferplus", "angry", _ok("angry"), ""),  # angry, right
    ("ferplus", "sad", "", "CUDA out of memory"),  # failed inference: excluded, counted
]


def _our_rows(model: str = "m", crafted=CRAFTED) -> list[dict]:
    rows = []
    for i, (dataset, true, response, error) in enumerate(crafted):
        labels = RAF if dataset == "rafdb" else FER
        parsed = parsed_columns(response, labels, dataset)  # as the runner writes them: what scoring reads
        rows.append({
            "id": f"{dataset}:/img/{i}.jpg", "model": model, "dataset": dataset, "image_path": f"/img/{i}.jpg",
            "true_label": true, "candidate_labels": labels, "response": response, **parsed,
            "correct_strict": parsed["parsed_strict"] == true, "correct_paper": parsed["parsed_paper"] == true,
            "latency_s": 0.5, "error": error,
        })
    return rows


def _reference_items(dataset: str, crafted=CRAFTED) -> list[dict]:
    items = []
    for i, (ds, true, response, error) in enumerate(crafted):
        if ds != dataset:
            continue
        labels = RAF if ds == "rafdb" else FER
        item = {"image_path": f"/img/{i}.jpg", "true_label": true, "prompt": ferbench_prompt(labels),
                "candidate_labels": labels, "model_response": response}
        if error:  # the reference inference scripts write the message as the response and error=True
            item |= {"model_response": f"ERROR: {error}", "error": True}
        items.append(item)
    return items


def test_per_dataset_metrics_by_hand():
    m = compute_metrics(_our_rows(), "strict")["rafdb"]
    assert m["n"] == 5 and m["n_errors"] == 0
    assert m["accuracy"] == pytest.approx(3 / 5)
    # Classes of y_true ∪ y_pred: happiness P=1/1 R=1/2; sadness P=1/2 R=1/1; anger P=1/1 R=1/2;
    # unknown (predicted once, never true) P=R=F1=0. Each real class has F1 = 2/3.
    assert m["macro_precision"] == pytest.approx((1 + 0.5 + 1 + 0) / 4)
    assert m["macro_recall"] == pytest.approx((0.5 + 1 + 0.5 + 0) / 4)
    assert m["macro_f1"] == pytest.approx(3 * (2 / 3) / 4)
    assert m["unparsable_rate"] == pytest.approx(1 / 5)
    assert m["format_rate"] == pytest.approx(3 / 5)
    per_class = {c["label"]: c for c in m["per_class"]}
    assert [c["label"] for c in m["per_class"]] == RAF
    assert per_class["happiness"] == {"label": "happiness", "precision": 1.0, "recall": 0.5,
                                      "f1": pytest.approx(2 / 3), "support": 2}
    assert per_class["sadness"]["precision"] == 0.5 and per_class["sadness"]["support"] == 1
    assert per_class["surprise"] == {"label": "surprise", "precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
    conf = m["confusion"]
    assert conf["labels_true"] == RAF and conf["labels_pred"] == RAF + ["unknown"]
    expected = [[0] * 8 for _ in RAF]
    expected[RAF.index("happiness")][RAF.index("happiness")] = 1
    expected[RAF.index("happiness")][RAF.index("sadness")] = 1
    expected[RAF.index("sadness")][RAF.index("sadness")] = 1
    expected[RAF.index("anger")][RAF.index("anger")] = 1
    expected[RAF.index("anger")][7] = 1  # the unknown column
    assert conf["matrix"] == expected

    fer = compute_metrics(_our_rows(), "strict")["ferplus"]
    assert (fer["n"], fer["n_errors"]) == (3, 1)
    assert fer["accuracy"] == pytest.approx(2 / 3)


def test_overall_pools_after_unifying_label_names():
    overall = compute_metrics(_our_rows(), "strict")["overall"]
    assert overall["datasets"] == ["rafdb", "ferplus"]
    # FERPlus happy/sad/angry become happiness/sadness/anger: 8 scored rows, 5 right.
    assert (overall["n"], overall["n_errors"]) == (8, 1)
    assert overall["accuracy"] == pytest.approx(5 / 8)
    # happiness: predicted 2 (both right), true 3 -> P=1, R=2/3, F1=0.8
    # sadness: predicted 2 (1 right), true 2 -> P=R=F1=1/2
    # anger: predicted 3 (2 right), true 3 -> P=R=F1=2/3; unknown: 0, 0, 0
    assert overall["macro_precision"] == pytest.approx((1 + 0.5 + 2 / 3) / 4)
    assert overall["macro_recall"] == pytest.approx((2 / 3 + 0.5 + 2 / 3) / 4)
    assert overall["macro_f1"] == pytest.approx((0.8 + 0.5 + 2 / 3) / 4)
    assert overall["format_rate"] == pytest.approx(6 / 8)
    assert overall["unparsable_rate"] == pytest.approx(1 / 8)
    # All 8 canonical emotions (FERPlus brings contempt), in the canonical order.
    assert [c["label"] for c in overall["per_class"]] == list(CANONICAL)
    conf = overall["confusion"]

    def cell(true: str, predicted: str) -> int:
        return conf["matrix"][conf["labels_true"].index(true)][conf["labels_pred"].index(predicted)]

    assert cell("happiness", "happiness") == 2 and cell("happiness", "sadness") == 1
    assert cell("sadness", "sadness") == 1 and cell("sadness", "anger") == 1
    assert cell("anger", "anger") == 2 and cell("anger", "unknown") == 1
    assert sum(map(sum, conf["matrix"])) == 8


def test_modes_reparse_the_response():
    crafted = [("rafdb", "surprise", "<answer>surprised</answer>", "")]
    strict = compute_metrics(_our_rows(crafted=crafted), "strict")["rafdb"]
    paper = compute_metrics(_our_rows(crafted=crafted), "paper")["rafdb"]
    assert (strict["accuracy"], strict["unparsable_rate"]) == (0.0, 1.0)
    assert (paper["accuracy"], paper["unparsable_rate"]) == (1.0, 0.0)
    with pytest.raises(ValueError, match="mode"):
        compute_metrics(_our_rows(), "lenient")


def test_bootstrap_ci():
    for metrics in compute_metrics(_our_rows(), "strict").values():
        low, high = metrics["accuracy_ci95"]
        assert 0.0 <= low <= metrics["accuracy"] <= high <= 1.0
    # 30/50 right: the bootstrap spread is the binomial one, sd = sqrt(0.6 * 0.4 / 50) ≈ 0.069.
    low, high = bootstrap_ci(30, 50)
    assert low == pytest.approx(0.6 - 1.96 * 0.0693, abs=0.03) and high == pytest.approx(0.6 + 1.96 * 0.0693, abs=0.03)
    assert bootstrap_ci(30, 50) == [low, high]  # fixed seed
    assert bootstrap_ci(50, 50) == [1.0, 1.0]


def _json_round_trip(metrics: dict) -> dict:
    return json.loads(json.dumps(metrics))


@pytest.mark.parametrize("mode", ["strict", "paper"])
def test_reference_and_our_files_score_identically(tmp_path, mode):
    ref_files = []
    for dataset, stem in (("rafdb", "rafdb_m_results"), ("ferplus", "ferplus_m_results")):
        path = tmp_path / f"{stem}.json"
        path.write_text(json.dumps(_reference_items(dataset), indent=2))
        ref_files.append(str(path))
    jsonl = tmp_path / "ours.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in _our_rows()))
    parquet = tmp_path / "ours.parquet"
    pq.write_table(pa.Table.from_pylist(_our_rows()), parquet)

    from_reference = score_files(ref_files, mode=mode, out_dir=str(tmp_path / "ref"))  # model "m" from the stems
    from_jsonl = score_files([str(jsonl)], mode=mode, out_dir=str(tmp_path / "jsonl"))
    from_parquet = score_files([str(parquet)], mode=mode, out_dir=str(tmp_path / "parquet"))
    assert list(from_reference) == ["m"]
    assert from_reference == from_jsonl == from_parquet
    assert from_reference == {"m": compute_metrics(_our_rows(), mode)}
    assert json.loads((tmp_path / "ref" / "metrics.json").read_text()) == _json_round_trip(from_reference)
    # The failed inference is listed, with where it came from.
    errors = [json.loads(line) for line in (tmp_path / "ref" / "errors.jsonl").read_text().splitlines()]
    assert len(errors) == 1 and errors[0]["source"].endswith("ferplus_m_results.json")
    assert errors[0]["reason"] == "inference failed: ERROR: CUDA out of memory"


def test_paired_comparison_counts_corrected_and_broken_items():
    changed = list(CRAFTED)
    changed[0] = ("rafdb", "happiness", "", "timeout")  # failed in the second run: left out of the pairs
    changed[1] = ("rafdb", "happiness", _ok("happiness"), "")  # wrong before, right after: corrected
    changed[2] = ("rafdb", "sadness", _ok("fear"), "")  # right before, wrong after: broken
    changed[6] = ("ferplus", "sad", _ok("sad"), "")  # corrected
    paired = paired_comparison(_our_rows("sft"), _our_rows("rlvr", changed))
    # Rows 1-7 pair (row 8 failed in both runs); right before: 2, 4, 5, 7; after: 1, 4, 5, 6, 7.
    # 2 corrected vs 1 broken: p = 2 × P(X <= 1 | n=3, 1/2) = 2 × 4/8, capped at 1.
    assert paired == {"items": 7, "before_correct": 4, "after_correct": 5, "corrected": 2, "broken": 1,
                      "mcnemar_p": 1.0}


def _two_sided_binomial(k: int, n: int) -> float:
    """2 × P(X <= min(k, n - k)) for X ~ Binomial(n, 1/2), capped at 1: McNemar's exact test by its definition."""
    return min(1.0, 2 * sum(math.comb(n, i) for i in range(min(k, n - k) + 1)) / 2**n)


@pytest.mark.parametrize(("corrected", "broken", "p"), [
    (83, 62, 0.0964),  # issue 22's vLLM demo run
    (79, 54, 0.0370),  # its transformers-rollout run
    (61, 62, 1.0),  # its AVX2 run
    (5, 0, 2 / 32),  # 2 × (1/2)^5
    (2, 1, 1.0),  # 2 × 4/8
    (0, 0, 1.0),  # no discordant item: no evidence either way
])
def test_mcnemar_exact(corrected, broken, p):
    assert mcnemar_exact(corrected, broken) == pytest.approx(p, abs=5e-5)
    assert mcnemar_exact(broken, corrected) == mcnemar_exact(corrected, broken)
    if corrected + broken:
        assert mcnemar_exact(corrected, broken) == pytest.approx(_two_sided_binomial(corrected, corrected + broken))


def test_model_name_from_reference_file_names():
    assert model_name_from_path("/x/rafdb_unifer_7b_results.json") == "unifer_7b"
    assert model_name_from_path("s3://b/sfew_2.0_unifer_7b_results.json") == "unifer_7b"
    assert model_name_from_path("/x/gpt4o.json") == "gpt4o"


def test_report_files(tmp_path):
    rows = _our_rows("org/model x") + [r | {"model": "oracle", "response": _ok(r["true_label"])}
                                       for r in _our_rows()]
    path = tmp_path / "results.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "report"
    metrics = score_files([str(path)], mode="strict", out_dir=str(out))

    board = (out / "leaderboard.md").read_text()
    assert "org/model x" in board and "oracle" in board
    assert board.index("oracle") < board.index("org/model x")  # best overall accuracy first
    for number in ("60.00", "66.67", "62.50", "100.00"):  # rafdb, ferplus, overall of "org/model x"; oracle
        assert number in board
    text = leaderboard_text(metrics)
    assert text.index("oracle") < text.index("org/model x") and "62.50" in text
    for model in ("org_model_x", "oracle"):
        for dataset in ("rafdb", "ferplus", "overall"):
            with Image.open(out / f"confusion_{model}_{dataset}.png") as image:
                image.verify()
                assert image.format == "PNG" and image.size[0] > 100


def test_bad_rows_become_error_records(tmp_path):
    good = _our_rows()[0]
    lines = [
        json.dumps(good),
        "{not json",
        json.dumps(good | {"id": "x1", "true_label": "contempt"}),  # not a RAF-DB candidate
        json.dumps(good | {"id": "x2", "response": 7}),
        json.dumps({k: v for k, v in good.items() if k != "dataset"} | {"id": "x3"}),
        json.dumps(good),  # duplicate
    ]
    path = tmp_path / "ours.jsonl"
    path.write_text("\n".join(lines) + "\n")
    read = read_results(str(path))
    assert len(read.rows) == 2 and [e["row"] for e in read.errors] == [2, 3, 4, 5]
    assert "malformed JSON" in read.errors[0]["reason"]
    assert "'contempt' is not among candidate_labels" in read.errors[1]["reason"]
    assert "must be a string" in read.errors[2]["reason"]
    assert "missing field(s) ['dataset']" in read.errors[3]["reason"]

    reference = tmp_path / "odd_results.json"
    reference.write_text(json.dumps([{"image_path": "a.jpg", "true_label": "x", "candidate_labels": ["x", "y"],
                                      "prompt": "p", "model_response": "<answer>x</answer>"}]))
    metrics = score_files([str(path), str(reference)], mode="strict", out_dir=str(tmp_path / "out"))
    assert metrics["m"]["rafdb"]["n"] == 1  # the good row, scored once
    errors = [json.loads(line) for line in (tmp_path / "out" / "errors.jsonl").read_text().splitlines()]
    reasons = [e["reason"] for e in errors]
    assert len(errors) == 6 and all(e["source"] for e in errors)
    assert any("match no FERBench dataset" in r for r in reasons)
    assert any(r.startswith("duplicate result") for r in reasons)

    with pytest.raises(ValueError, match="2 model names for 1 result paths"):
        score_files([str(path)], mode="strict", out_dir=str(tmp_path / "o2"), model_names=["a", "b"])
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        score_files([str(tmp_path / "missing.jsonl")], mode="strict", out_dir=str(tmp_path / "o3"))


def test_a_dataset_whose_rows_all_failed(tmp_path):
    rows = [r | {"error": "timeout"} for r in _our_rows() if r["dataset"] == "rafdb"]
    rows += [r for r in _our_rows() if r["dataset"] == "ferplus"]
    path = tmp_path / "ours.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    metrics = score_files([str(path)], mode="paper", out_dir=str(tmp_path / "out"))
    rafdb = metrics["m"]["rafdb"]
    assert (rafdb["n"], rafdb["n_errors"], rafdb["accuracy"], rafdb["per_class"]) == (0, 5, None, [])
    assert sum(map(sum, rafdb["confusion"]["matrix"])) == 0
    assert metrics["m"]["overall"]["n"] == 3 and metrics["m"]["overall"]["n_errors"] == 6
    assert "| m | RAF-DB | 0 | 5 | – |" in (tmp_path / "out" / "leaderboard.md").read_text()
    assert not (tmp_path / "out" / "confusion_m_rafdb.png").exists()
    assert (tmp_path / "out" / "confusion_m_ferplus.png").exists()


def test_a_directory_of_parquet_shards(tmp_path):
    # As Ray Data writes results: one directory of Parquet files; other files there are not results.
    shards = tmp_path / "results" / "m"
    shards.mkdir(parents=True)
    rows = _our_rows()
    pq.write_table(pa.Table.from_pylist(rows[:4]), shards / "part-0.parquet")
    pq.write_table(pa.Table.from_pylist(rows[4:]), shards / "part-1.parquet")
    (shards / "errors.jsonl").write_text('{"id": "x", "source": "a.jpg", "reason": "broken image"}\n')
    read = read_results(str(shards))
    assert len(read.rows) == len(rows) and read.errors == []
    assert score_files([str(shards)], mode="strict", out_dir=str(tmp_path / "out")) == {
        "m": compute_metrics(rows, "strict")}

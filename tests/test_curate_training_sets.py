"""The training-set readers: the released JSON arrays, JSONL and Parquet load as Ray Datasets; bad rows are errors."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from unifer_ray.data.training_sets import error_records, read_cot, read_rlvr
from unifer_ray.labels import RAFDB
from unifer_ray.prompts import ferbench_prompt

QUESTION = ferbench_prompt(RAFDB.labels)
GOOD = "<think>Brows raised (AU1+2) and the jaw dropped: surprise.</think><answer>surprise</answer>"


def test_released_cot_json_array_loads_and_bad_rows_become_errors(ray_cluster, tmp_path):
    # The released UniFER_CoT_230K.json shape: a JSON array of {image_path, question, response}.
    released = [
        {"image_path": "/RAF-DB/aligned/train_00001_aligned.jpg", "question": QUESTION, "response": GOOD},
        {"image_path": "/AffectNet/Manually_Annotated/1/x.jpg", "question": QUESTION, "response": GOOD},
        {"image_path": "/RAF-DB/aligned/train_00002_aligned.jpg", "question": QUESTION, "response": "surprise"},
        {"image_path": "", "question": QUESTION, "response": GOOD},
        {"question": QUESTION, "response": GOOD, "id": "no-image"},
        ["not", "an", "object"],
    ]
    (tmp_path / "UniFER_CoT_230K.json").write_text(json.dumps(released))
    # Our own shards: JSONL (with our extra columns) and Parquet, in one directory.
    shards = tmp_path / "items"
    shards.mkdir()
    ours = {"image_path": "/SFEW-2.0/Train/x.png", "question": QUESTION, "response": GOOD, "id": "sfew:x#0",
            "dataset": "sfew", "teacher": "oracle"}
    (shards / "a.jsonl").write_text(json.dumps(ours) + "\n{not json\n")
    pq.write_table(pa.Table.from_pylist([{**ours, "id": "sfew:x#1"}]), shards / "b.parquet")

    ds = read_cot([str(tmp_path / "UniFER_CoT_230K.json"), str(shards)], image_root="/data", keep_errors=True)
    errors = error_records(ds)
    valid = read_cot([str(tmp_path / "UniFER_CoT_230K.json"), str(shards)], image_root="/data").take_all()

    by_id = {r["id"]: r for r in valid}
    assert sorted(by_id) == ["UniFER_CoT_230K.json#0", "UniFER_CoT_230K.json#1", "sfew:x#0", "sfew:x#1"]
    first = by_id["UniFER_CoT_230K.json#0"]
    assert first["image_uri"] == "/data/RAF-DB/aligned/train_00001_aligned.jpg"
    assert first["dataset"] == "rafdb" and first["teacher"] == "" and first["response"] == GOOD
    assert by_id["UniFER_CoT_230K.json#1"]["dataset"] == "affectnet"
    assert by_id["sfew:x#0"]["teacher"] == "oracle" and "error" not in first
    assert len(errors) == 5 and all(e["source"] for e in errors)
    assert {e["id"] for e in errors} >= {"UniFER_CoT_230K.json#2", "no-image", "a.jsonl#2"}
    assert any("response" in e["reason"] for e in errors) and any("malformed JSON" in e["reason"] for e in errors)
    assert any("image_path" in e["reason"] for e in errors) and any("object" in e["reason"] for e in errors)


def test_released_rlvr_rows_load_with_their_answer(ray_cluster, tmp_path):
    released = [
        {"image_path": "/FERPlus/train/happy/fer0000001.png", "problem": QUESTION,
         "solution": "<answer>happy</answer>"},
        {"image_path": "/FERPlus/train/sad/fer0000002.png", "problem": QUESTION, "solution": " sad "},  # no tags
        {"image_path": "/FERPlus/train/sad/fer0000003.png", "problem": QUESTION, "solution": "<answer> </answer>"},
        {"image_path": "/FERPlus/train/sad/fer0000004.png", "problem": 7, "solution": "<answer>sad</answer>"},
    ]
    path = tmp_path / "UniFER_RLVR_360K.json"
    path.write_text(json.dumps(released))

    rows = read_rlvr(str(path)).take_all()
    errors = error_records(read_rlvr(str(path), keep_errors=True))

    assert [(r["answer"], r["dataset"], r["image_uri"]) for r in sorted(rows, key=lambda r: r["row"])] == [
        ("happy", "ferplus", "/FERPlus/train/happy/fer0000001.png"),
        ("sad", "ferplus", "/FERPlus/train/sad/fer0000002.png"),
    ]
    assert sorted((e["row"], e["reason"]) for e in errors) == [
        (2, "field 'solution' has an empty answer"), (3, "field 'problem' must be a non-empty string, got 7")]


def test_missing_training_file_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.json"):
        read_cot(str(tmp_path / "nowhere.json"))

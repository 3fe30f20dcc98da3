"""The oracle teacher, the CoT filters and the RLVR tasks as plain functions (no Ray)."""

from __future__ import annotations

import re

import numpy as np
import pytest

from unifer_ray.curate.config import CotFilters
from unifer_ray.curate.filters import judge, reasoning, words
from unifer_ray.curate.oracle import OracleTeacher, face_evidence, oracle_response, row_rng
from unifer_ray.curate.rlvr import balance, make_tasks
from unifer_ray.data.synthetic import PROTOTYPES, sample_params
from unifer_ray.labels import CANONICAL, DATASETS, FERPLUS, RAFDB, canonical
from unifer_ray.parsing import is_format_compliant, parse_strict
from unifer_ray.prompts import ferbench_prompt


def test_oracle_traces_are_short_compliant_and_right_without_wrong_rate():
    rng = np.random.default_rng(0)
    for spec in DATASETS.values():
        for label in spec.labels:
            for _ in range(5):
                params = sample_params(label, rng).model_dump()
                response = oracle_response(params, label, list(spec.labels), rng)
                assert is_format_compliant(response)
                assert parse_strict(response, spec.labels) == label
                assert 12 <= len(words(reasoning(response))) <= 40
                assert re.search(r"AU\d", response) or canonical(label) == "neutral"


def test_oracle_evidence_follows_the_face():
    rng = np.random.default_rng(1)
    smile = face_evidence(sample_params("happiness", rng).model_dump(), rng)
    assert "AU12" in smile
    surprise = face_evidence(sample_params("surprise", rng).model_dump(), rng)
    assert "AU5" in surprise and ("AU26" in surprise or "AU27" in surprise)
    contempt = face_evidence(sample_params("contempt", rng).model_dump(), rng)
    assert "unilateral" in contempt


def test_oracle_phrasing_varies_and_is_seeded():
    params = sample_params("anger", np.random.default_rng(2)).model_dump()
    labels = list(RAFDB.labels)
    traces = {oracle_response(params, "anger", labels, row_rng(0, f"img{i}")) for i in range(30)}
    assert len(traces) >= 10
    again = oracle_response(params, "anger", labels, row_rng(0, "img3"))
    assert again == oracle_response(params, "anger", labels, row_rng(0, "img3"))


def test_oracle_wrong_rate_names_other_labels_at_that_rate():
    rng = np.random.default_rng(3)
    labels = list(FERPLUS.labels)
    answers = [parse_strict(oracle_response(sample_params("happy", rng).model_dump(), "happy", labels, rng,
                                            wrong_rate=0.2), labels) for _ in range(1000)]
    wrong = [a for a in answers if a != "happy"]
    assert 0.16 < len(wrong) / len(answers) < 0.24
    assert set(wrong) <= set(labels) - {"happy"} and len(set(wrong)) >= 5


def test_oracle_rejects_bad_input():
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="not among the candidates"):
        oracle_response({}, "joy", list(RAFDB.labels), rng)
    with pytest.raises(ValueError, match="brow_raise"):
        oracle_response({"brow_raise": 3.0}, "fear", list(RAFDB.labels), rng)


def test_oracle_teacher_batch_gives_n_traces_and_errors_per_row():
    import json

    params = json.dumps(sample_params("fear", np.random.default_rng(4)).model_dump())
    batch = {
        "id": np.array(["a", "b", "c"], dtype=object),
        "label": np.array(["fear", "fear", "fear"], dtype=object),
        "candidate_labels": np.array([list(RAFDB.labels)] * 3, dtype=object),
        "action_params": np.array([params, "", params], dtype=object),
        "error": np.array(["", "", "image: broken"], dtype=object),
    }
    out = OracleTeacher(n=3, wrong_rate=0.0, seed=0)(batch)
    assert len(out["responses"][0]) == 3 and all(is_format_compliant(r) for r in out["responses"][0])
    assert out["error"][1].startswith("teacher: oracle: no recorded action parameters")
    assert list(out["responses"][1]) == [] and out["error"][2] == "image: broken"


def _trace(text: str, answer: str) -> str:
    return f"<think>{text}</think><answer>{answer}</answer>"


def test_judge_rejects_each_reason_and_keeps_best_first():
    filters = CotFilters(min_words=5, max_words=30, near_duplicate_jaccard=0.8)
    labels = list(RAFDB.labels)
    rich = "Brows raised (AU1+2), eyes wide open (AU5) and the jaw dropped (AU26): surprise."
    plain = "The whole face looks startled and open, so I would call this surprise."
    responses = [
        "surprise",  # format
        _trace(rich, "fear"),  # wrong_answer
        _trace("Surprise, clearly.", "surprise"),  # too_short
        _trace("word " * 40, "surprise"),  # too_long
        _trace("The label is surprise, as the brows and eyes show.", "surprise"),  # leakage
        _trace(plain, "surprise"),  # over_cap: names no facial evidence, so it ranks last
        _trace(rich, "surprise"),  # kept: the most evidence
        _trace(rich.lower().replace(",", ";"), "surprise"),  # duplicate of the rich one once normalised
        _trace("Eyes open wide and the mouth drops open, so the face shows surprise here.", "surprise"),  # kept
    ]
    verdicts = judge(responses, "surprise", labels, filters, m=2)
    assert verdicts == ["format", "wrong_answer", "too_short", "too_long", "leakage", "over_cap", "kept",
                        "duplicate", "kept"]


def test_rlvr_tasks_have_verifiable_answers():
    rng = np.random.default_rng(0)
    labels = list(FERPLUS.labels)
    yes = no = 0
    for _ in range(200):
        tasks = {t["task"]: t for t in make_tasks("happy", labels, ["mc", "mc_shuffled", "binary", "unified"], rng)}
        assert tasks["mc"]["solution"] == "<answer>happy</answer>"
        assert ", ".join(labels) in tasks["mc"]["problem"]
        assert ", ".join(labels) not in tasks["mc_shuffled"]["problem"]
        assert all(label in tasks["mc_shuffled"]["problem"] for label in labels)
        assert tasks["unified"]["solution"] == "<answer>happiness</answer>"
        assert ", ".join(CANONICAL) in tasks["unified"]["problem"]
        binary = tasks["binary"]
        asked_self = "expression in this image happy?" in binary["problem"]
        assert binary["solution"] == ("<answer>yes</answer>" if asked_self else "<answer>no</answer>")
        yes, no = yes + asked_self, no + (not asked_self)
    assert 70 < yes < 130 and yes + no == 200


def test_balance_cuts_classes_to_the_rarest_per_dataset():
    rows = [{"id": f"{d}:{label}:{i}", "dataset": d, "label": label}
            for d, counts in (("rafdb", {"fear": 5, "anger": 2}), ("sfew", {"sad": 3, "happy": 4}))
            for label, n in counts.items() for i in range(n)]
    kept = balance(rows, equalise=True, max_per_class=None, seed=0)
    counts = {(r["dataset"], r["label"]): 0 for r in rows}
    for r in kept:
        counts[(r["dataset"], r["label"])] += 1
    assert counts == {("rafdb", "fear"): 2, ("rafdb", "anger"): 2, ("sfew", "sad"): 3, ("sfew", "happy"): 3}
    assert [r["id"] for r in kept] == [r["id"] for r in rows if r in kept]  # order kept
    capped = balance(rows, equalise=False, max_per_class=3, seed=0)
    assert len(capped) == 3 + 2 + 3 + 3


def test_every_prototype_has_a_gloss():
    from unifer_ray.curate.oracle import GLOSSES

    assert set(GLOSSES) == set(PROTOTYPES) == set(CANONICAL)


def test_teacher_prompt_hint_modes_and_teacher_kinds_are_checked():
    from unifer_ray.config import ConfigError, parse_config
    from unifer_ray.curate.config import CotSetConfig
    from unifer_ray.curate.teachers import teacher_prompt

    labels = list(RAFDB.labels)
    plain, hinted = teacher_prompt(labels), teacher_prompt(labels, "fear")
    assert plain.startswith(ferbench_prompt(labels)) and "brows" in plain and "fear." not in plain
    assert hinted.startswith(plain) and "The correct answer is fear." in hinted
    base = {"sources": [{"dataset": "rafdb", "root": "/x"}], "out_dir": "/o"}
    with pytest.raises(ConfigError, match="teacher kind 'openai'"):
        parse_config(base | {"teacher": {"kind": "engine", "name": "t", "engine": {"engine": "openai", "model": "m"}}},
                     CotSetConfig)
    with pytest.raises(ConfigError, match="needs engine: openai"):
        parse_config(base | {"teacher": {"kind": "openai", "name": "t", "engine": {"engine": "hf", "model": "m"}}},
                     CotSetConfig)
    with pytest.raises(ConfigError, match="unknown dataset layout"):
        parse_config(base | {"sources": [{"dataset": "imagenet", "root": "/x"}], "teacher": {"kind": "oracle"}},
                     CotSetConfig)

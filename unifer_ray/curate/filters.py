"""Filters of candidate reasoning traces: each candidate of an image is kept or rejected for one named reason.

In order: format (one <think> block then one <answer> block), wrong_answer (the strict-parsed answer is not the
ground truth: rejection sampling), too_short / too_long (words of reasoning), leakage (the reasoning cites being
given the label), then, best first, duplicate (word-trigram Jaccard with a trace already kept) and over_cap
(the image already has `m` traces).
"""

from __future__ import annotations

import json
import re
import string

import numpy as np

from unifer_ray.curate.config import CotFilters
from unifer_ray.curate.ledger import LEDGER_KEYS
from unifer_ray.parsing import is_format_compliant, parse_strict
from unifer_ray.records import object_array

KEPT = "kept"
REJECTION_REASONS = ("format", "wrong_answer", "too_short", "too_long", "leakage", "duplicate", "over_cap")

_THINK = re.compile(r"<think>(.*?)</think>", re.DOTALL)
_PUNCTUATION = str.maketrans(string.punctuation, " " * len(string.punctuation))
# Facial regions and action units a trace names: more named evidence ranks a trace higher.
_REGIONS = re.compile(r"\b(brow|eyebrow|forehead|eye|lid|cheek|nose|mouth|lip|jaw|chin)s?\b")
_ACTION_UNITS = re.compile(r"\bau\s?(\d+)")


def reasoning(response: str) -> str:
    match = _THINK.search(response)
    return match.group(1).strip() if match else ""


def words(text: str) -> list[str]:
    """Lower-case words, punctuation removed: the normal form that lengths and near-duplicates are measured on."""
    return text.lower().translate(_PUNCTUATION).split()


def trigrams(text: str) -> set[tuple[str, ...]]:
    w = words(text)
    return {tuple(w[i:i + 3]) for i in range(len(w) - 2)} if len(w) >= 3 else {tuple(w)}


def jaccard(a: set, b: set) -> float:
    return len(a & b) / len(a | b) if a or b else 1.0


def evidence_score(text: str) -> int:
    """Distinct facial regions plus distinct action units named in `text`."""
    lowered = text.lower()
    return len(set(_REGIONS.findall(lowered))) + len(set(_ACTION_UNITS.findall(lowered)))


def first_rejection(response: str, label: str, candidates: list[str], filters: CotFilters) -> str | None:
    """The first per-trace filter `response` fails, or None when it passes them all."""
    if not is_format_compliant(response):
        return "format"
    if parse_strict(response, candidates) != label:
        return "wrong_answer"
    thought = reasoning(response)
    n = len(words(thought))
    if n < filters.min_words:
        return "too_short"
    if n > filters.max_words:
        return "too_long"
    lowered = " ".join(thought.lower().split())
    if any(phrase.lower() in lowered for phrase in filters.leakage_phrases):
        return "leakage"
    return None


def judge(responses: list[str], label: str, candidates: list[str], filters: CotFilters, m: int) -> list[str]:
    """One verdict per response: "kept" or its rejection reason. At most `m` are kept, most evidence first."""
    verdicts: list[str] = [first_rejection(r, label, candidates, filters) or KEPT for r in responses]
    passing = [i for i, v in enumerate(verdicts) if v == KEPT]
    passing.sort(key=lambda i: (-evidence_score(reasoning(responses[i])), i))
    kept: list[set] = []
    for i in passing:
        shingles = trigrams(reasoning(responses[i]))
        if any(jaccard(shingles, other) >= filters.near_duplicate_jaccard for other in kept):
            verdicts[i] = "duplicate"
        elif len(kept) >= m:
            verdicts[i] = "over_cap"
        else:
            kept.append(shingles)
    return verdicts


def filter_batch(batch: dict[str, np.ndarray], *, filters: dict, m: int) -> dict[str, np.ndarray]:
    """Ray Data batch UDF after the teacher: the CoT ledger rows (`responses`/`verdicts` as JSON lists)."""
    config = CotFilters.model_validate(filters)
    responses_out, verdicts_out = [], []
    for i in range(len(batch["id"])):
        responses = [str(r) for r in batch["responses"][i]]
        verdicts = [] if batch["error"][i] else judge(
            responses, str(batch["label"][i]), [str(c) for c in batch["candidate_labels"][i]], config, m)
        responses_out.append(json.dumps(responses))
        verdicts_out.append(json.dumps(verdicts))
    keep = LEDGER_KEYS + ("dataset", "image_path", "label", "question", "teacher")
    return {**{k: batch[k] for k in keep}, "responses": object_array(responses_out),
            "verdicts": object_array(verdicts_out)}

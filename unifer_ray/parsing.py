"""Answer extraction from model responses: strict, paper-compatible, and the format check.

- `parse_strict`: the last <answer>…</answer> must name exactly one candidate. Our default scorer.
- `parse_paper`: the lenient extractor of the paper's evaluators (zfkarl/UniFER, eval_*/code/eval_unifer.py),
  reproduced with its quirks so that our numbers are comparable with the paper's tables.
- `is_format_compliant`: <think>…</think><answer>…</answer> and nothing else; the RL format reward uses it too.
- `parsed_columns`: all three at once, the columns FERBench's result rows carry and its metrics read.
"""

from __future__ import annotations

import re
import string
from collections.abc import Sequence

from unifer_ray.labels import DATASETS, SYNONYMS, dataset_of

UNKNOWN = "unknown"  # what parse_paper returns when nothing matches (and the label metrics use for "no answer")

_ANSWER_BLOCKS = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_FORMAT = re.compile(r"\s*<think>(?P<think>.*?)</think>\s*<answer>(?P<answer>.*?)</answer>\s*", re.DOTALL)
_ANY_TAG = re.compile(r"</?(?:think|answer)>", re.IGNORECASE)
_EDGE_PUNCTUATION = string.punctuation + string.whitespace + "“”‘’«»…"


def is_format_compliant(response: str | None) -> bool:
    """True when the whole response is `<think>…</think>` then `<answer>…</answer>`.

    Whitespace may surround and separate the two blocks; each block appears exactly once, holds no other
    think/answer tag, and is not blank (a blank answer earns no format reward: it would pay for saying nothing).
    """
    match = _FORMAT.fullmatch(response or "")
    if match is None:
        return False
    return all(part.strip() and not _ANY_TAG.search(part) for part in (match["think"], match["answer"]))


# ---------------------------------------------------------------- strict


def _normalise(text: str) -> str:
    """Lower case, inner whitespace collapsed, punctuation and whitespace stripped from both ends."""
    return " ".join(text.lower().split()).strip(_EDGE_PUNCTUATION)


def _emotion(name: str) -> str:
    """The emotion a normalised name stands for: 'happy' -> 'happiness'; other names stand for themselves."""
    return SYNONYMS.get(name, name)


def parse_strict(response: str | None, candidates: Sequence[str]) -> str | None:
    """The candidate named by the last <answer>…</answer>, spelled as in `candidates`; None when unparsable.

    The whole answer text, after normalising case, whitespace and surrounding punctuation, must be one candidate
    or a canonical synonym of one (angry/anger, happy/happiness, sad/sadness): "<answer> Happy. </answer>" names
    "happiness" among RAF-DB's labels; "<answer>happy or sad</answer>" and "<answer>I think happy</answer>" name
    nothing. Tags are matched in lower case only, as the prompt asks for them.
    """
    blocks = _ANSWER_BLOCKS.findall(response or "")
    if not blocks:
        return None
    named = _emotion(_normalise(blocks[-1]))
    matches = [c for c in candidates if _emotion(_normalise(c)) == named]
    return matches[0] if len(matches) == 1 else None


# ---------------------------------------------------------------- paper

# The evaluators' last-resort synonym tables, one per dataset, in their iteration order (the order matters).
# A key is returned when any of its words occurs anywhere in the lowercased response.
PAPER_SYNONYMS: dict[str, dict[str, tuple[str, ...]]] = {
    "rafdb": {
        "anger": ("angry",),
        "disgust": ("revulsion", "repulsion"),
        "fear": ("terror", "fright"),
        "happiness": ("joy", "happy"),
        "sadness": ("sad",),
        "neutral": ("normal", "calm", "blank"),
        "surprise": ("shock", "astonishment"),
    },
    "ferplus": {
        "angry": ("anger",),
        "contempt": ("scorn", "disdain"),
        "disgust": ("revulsion", "repulsion"),
        "fear": ("terror", "fright"),
        "happy": ("joy", "happiness"),
        "sad": ("sorrow", "unhappy"),
        "neutral": ("normal", "calm", "blank"),
        "surprise": ("shock", "astonishment"),
    },
    "affectnet": {
        "anger": ("angry", "mad"),
        "contempt": ("scorn", "disdain"),
        "disgust": ("revulsion", "repulsion"),
        "fear": ("terror", "fright"),
        "happiness": ("joy", "happy"),
        "sadness": ("sad",),
        "neutral": ("normal", "calm", "blank"),
        "surprise": ("shock", "astonishment"),
    },
    "sfew": {
        "angry": ("anger", "mad"),
        "disgust": ("revulsion", "repulsion"),
        "fear": ("terror", "fright"),
        "happy": ("joy", "happiness"),
        "sad": ("sorrow", "unhappy"),
        "neutral": ("normal", "calm", "blank"),
        "surprise": ("shock", "astonishment"),
    },
}

# RAF-DB, FERPlus and AffectNet find the answer with this pattern: case-insensitive tags, no DOTALL.
_PAPER_ANSWER = re.compile(r"<answer>\s*(.*?)\s*</answer>", re.IGNORECASE)
# The SFEW 2.0 evaluator (eval_sfew_2.0) uses another one: lower-case tags only, answer may span lines.
_PAPER_ANSWER_SFEW = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


def _paper_dataset(dataset: str | None, candidates: Sequence[str]) -> str:
    """Which evaluator scores this item: the named dataset, else the one whose label list is `candidates`,
    else AffectNet's (the canonical taxonomy, the widest synonym table)."""
    if dataset in DATASETS:
        return dataset
    return dataset_of(candidates) or "affectnet"


def parse_paper(response: str | None, candidates: Sequence[str], dataset: str | None = None) -> str:
    """The label the paper's evaluator extracts; "unknown" when it finds none.

    Steps, as in eval_<dataset>/code/eval_unifer.py:
      1. the FIRST <answer> match; for each candidate in order: the answer equals it, or contains it;
      2. for each candidate in order: it occurs in the whole lowercased response (word-bounded regex, then
         plain substring);
      3. the dataset's synonym table (PAPER_SYNONYMS) in its order, by substring of the lowercased response;
      4. "unknown".

    Quirks reproduced on purpose (they move the paper's numbers):
      - The FIRST answer block wins, not the last. RAF-DB/FERPlus/AffectNet's pattern
        `<answer>\\s*(.*?)\\s*</answer>` is case-insensitive without DOTALL: answer text spanning lines does not
        match there, and the search moves on to a later block (or to step 2). SFEW's pattern is
        `<answer>(.*?)</answer>` with DOTALL and case-sensitive tags, so "<ANSWER>" is ignored there.
        (eval_total scores SFEW with the first pattern; we follow the per-dataset evaluator, which only differs
        for multi-line answers and upper-case tags.)
      - Step 1 is a substring test in candidate order, exact and substring checked per candidate, so an earlier
        candidate contained in the answer beats a later exact one: "surprise" wins over "fear" in
        "fearful surprise" (RAF-DB order), "sad" matches "sadness", "surprise" matches "surprised", "fear"
        matches "fearful", "happy" matches "unhappy" (FERPlus/SFEW), "anger" matches "danger".
      - A synonym in the answer ("happy" for RAF-DB's "happiness") fails step 1, so step 2 searches the whole
        response, reasoning included: any candidate mentioned anywhere ("no sign of fear") wins, the earliest in
        candidate order, negated or not.
      - Step 2's word-boundary regex is redundant: the substring test after it accepts the same label anyway,
        so "sadness" is found inside "sadnesses". The candidate is used as written there (not lower-cased, not
        regex-escaped) against the lowercased response: a capitalised candidate never matches in step 2, and
        regex characters in a label act as regex.
      - Step 3 is plain substring too: "mad" in "made", "normal" in "abnormal", "calm" in "calmly", "happy" in
        "unhappy" (RAF-DB/AffectNet say happiness), "shock" in "shocked". Its order is the table's, not the
        candidates': "joy and shock" gives happiness. FERPlus/SFEW's "unhappy" -> sad is unreachable (step 2
        already finds "happy" inside "unhappy").
      - Step 3 returns the table's key, which need not be a candidate when the candidates are not the
        dataset's own list (custom label sets fall back to AffectNet's table); such a prediction is simply wrong.
      - The response itself is searched, so labels the model echoes from the prompt count.
    One deliberate difference: a None response is read as "" (the reference would raise a TypeError).
    """
    text = response or ""
    key = _paper_dataset(dataset, candidates)

    pattern = _PAPER_ANSWER_SFEW if key == "sfew" else _PAPER_ANSWER
    answer = pattern.search(text)
    if answer is not None:
        said = answer.group(1).strip().lower()
        for label in candidates:
            if label.lower() == said or label.lower() in said:
                return label

    lowered = text.lower()
    for label in candidates:
        if re.search(rf"\b{label}\b", lowered) or label in lowered:
            return label

    for label, words in PAPER_SYNONYMS[key].items():
        if any(word in lowered for word in words):
            return label
    return UNKNOWN


# ---------------------------------------------------------------- both


def parsed_columns(response: str | None, candidates: Sequence[str], dataset: str | None) -> dict:
    """What the benchmark writes beside a response and scores from: its label in each mode and its format check.

    The one place responses are parsed for FERBench, so that result files and their metrics always agree."""
    return {"parsed_strict": parse_strict(response, candidates),
            "parsed_paper": parse_paper(response, candidates, dataset),
            "format_ok": is_format_compliant(response)}

"""Answer extraction: strict mode, the paper's lenient evaluator (quirks included), and the format check.

Expected paper-mode values are worked out by hand from the reference evaluator (zfkarl/UniFER,
eval_<dataset>/code/eval_unifer.py): step 1 = first <answer> block, per candidate in order "equals or contains";
step 2 = per candidate in order, found anywhere in the lowercased response; step 3 = the dataset's synonym table
in its own order, by substring; else "unknown".
"""

from __future__ import annotations

import pytest

from unifer_ray.labels import DATASETS, SYNONYMS
from unifer_ray.parsing import UNKNOWN, is_format_compliant, parse_paper, parse_strict

RAF = list(DATASETS["rafdb"].labels)  # surprise, fear, disgust, happiness, sadness, anger, neutral
FER = list(DATASETS["ferplus"].labels)  # angry, contempt, disgust, fear, happy, neutral, sad, surprise
AFF = list(DATASETS["affectnet"].labels)  # neutral, happiness, sadness, surprise, fear, disgust, anger, contempt
SFEW = list(DATASETS["sfew"].labels)  # angry, disgust, fear, happy, neutral, sad, surprise
LABELS = {"rafdb": RAF, "ferplus": FER, "affectnet": AFF, "sfew": SFEW}

PAPER_CASES = [
    # --- overlapping words (step 1 is a substring test)
    # FERPlus: angry..neutral are not in "sadness"; "sad" is -> sad.
    ("ferplus", "<think>x</think><answer>sadness</answer>", "sad"),
    # RAF-DB: "surprise" (first candidate) is contained in "surprised".
    ("rafdb", "<answer>surprised</answer>", "surprise"),
    # FERPlus: angry, contempt, disgust, fear are not in "unhappy"; "happy" is -> happy (the opposite emotion).
    ("ferplus", "<answer>unhappy</answer>", "happy"),
    # RAF-DB: no candidate in "unhappy" (step 1), none in the response (step 2); the table's "happiness" row
    # lists "happy", a substring of "unhappy" -> happiness.
    ("rafdb", "<answer>unhappy</answer>", "happiness"),
    # RAF-DB: surprise, fear, disgust, happiness, sadness are not in "danger"; "anger" is.
    ("rafdb", "<answer>danger</answer>", "anger"),
    # --- several labels in one answer: candidate order decides
    # RAF-DB order: surprise comes before fear.
    ("rafdb", "<answer>fearful surprise</answer>", "surprise"),
    # AffectNet order: neutral, happiness, sadness, surprise -> surprise before fear.
    ("affectnet", "<answer>fearful surprise</answer>", "surprise"),
    # FERPlus order: angry, contempt, disgust, fear -> fear before surprise.
    ("ferplus", "<answer>fearful surprise</answer>", "fear"),
    # --- a synonym in the answer falls through to step 2, which reads the reasoning
    # RAF-DB: "happy" contains no RAF-DB label; step 2 finds "fear" in "no sign of fear" (negated or not).
    ("rafdb", "<think>There is no sign of fear.</think><answer>happy</answer>", "fear"),
    # Same answer, reasoning without labels: step 2 finds nothing; table row "happiness" has "happy".
    ("rafdb", "<think>Raised cheeks.</think><answer>happy</answer>", "happiness"),
    # --- synonyms (step 3), no candidate anywhere
    # RAF-DB table: anger(angry), disgust, fear(terror, fright) miss; happiness(joy) hits.
    ("rafdb", "The person radiates joy.", "happiness"),
    # AffectNet table: anger(angry, mad), contempt, disgust, fear, happiness, sadness, neutral miss; surprise(shock).
    ("affectnet", "Total shock on the face", "surprise"),
    # SFEW table: angry(anger, mad), disgust miss; fear(terror) hits.
    ("sfew", "pure terror", "fear"),
    # FERPlus table: angry, contempt, disgust, fear, happy, sad miss; neutral(calm) hits.
    ("ferplus", "a calm face", "neutral"),
    # Table order, not candidate order: RAF-DB's table lists happiness before surprise.
    ("rafdb", "Expression of joy and shock", "happiness"),
    # Substring synonyms: "normal" inside "abnormal" -> neutral.
    ("rafdb", "abnormal smile", "neutral"),
    # AffectNet's table has "mad" for anger, found inside "made"...
    ("affectnet", "She looks made of stone", "anger"),
    # ...RAF-DB's has no "mad", and nothing else matches.
    ("rafdb", "She looks made of stone", UNKNOWN),
    # --- missing tags
    # SFEW: step 2 finds "sad" (angry, disgust, fear, happy, neutral are absent).
    ("sfew", "The answer is sad", "sad"),
    # RAF-DB: "sadness" is absent, so step 2 finds nothing; table row sadness(sad) hits.
    ("rafdb", "The answer is sad", "sadness"),
    # --- several answer blocks: the FIRST one counts
    # RAF-DB: first block "anger": surprise..sadness not in it, anger equals it.
    ("rafdb", "<answer>anger</answer> wait <answer>fear</answer>", "anger"),
    # RAF-DB's pattern has no DOTALL: the first block spans lines and cannot match, the search moves on to the
    # second block "sadness".
    ("rafdb", "<answer>maybe\nfear</answer>\n<answer>sadness</answer>", "sadness"),
    # SFEW's pattern has DOTALL: the first block "maybe\nfear" contains "fear" (angry, disgust come first, absent).
    ("sfew", "<answer>maybe\nfear</answer>\n<answer>sad</answer>", "fear"),
    # --- case and whitespace
    # IGNORECASE tags; \s* trims; "happiness" equals the 2nd AffectNet candidate (neutral is not in it).
    ("affectnet", "<answer>  HAPPINESS \n</answer>", "happiness"),
    # FERPlus: upper-case tags match; answer "happy" -> happy.
    ("ferplus", "<think>not angry</think><ANSWER>Happy</ANSWER>", "happy"),
    # SFEW's tags are case-sensitive: no block; step 2 finds "angry" (first candidate) in the reasoning.
    ("sfew", "<think>not angry</think><ANSWER>Happy</ANSWER>", "angry"),
    # --- empty
    ("rafdb", "", UNKNOWN),
    ("ferplus", "<answer></answer>", UNKNOWN),  # empty answer text contains no label; "answer" neither
    ("affectnet", None, UNKNOWN),  # the reference would crash on None; we read it as ""
]


@pytest.mark.parametrize("dataset,response,expected", PAPER_CASES)
def test_parse_paper_matches_the_reference_by_hand(dataset, response, expected):
    assert parse_paper(response, LABELS[dataset], dataset) == expected


def test_parse_paper_infers_the_dataset_from_the_candidates():
    # The dataset key only picks the evaluator; without it the candidate list does (AffectNet: "mad" -> anger).
    assert parse_paper("She looks made of stone", AFF) == "anger"
    assert parse_paper("She looks made of stone", RAF) == UNKNOWN
    # An unknown key falls back to the candidates too.
    assert parse_paper("<answer>maybe\nfear</answer>", SFEW, "my_sfew_copy") == "fear"


def test_parse_paper_uses_candidates_as_written_and_may_return_non_candidates():
    custom = ["Happy", "Sad"]
    # Step 1 lower-cases the candidate: "happy" equals "Happy".lower().
    assert parse_paper("<answer>happy</answer>", custom) == "Happy"
    # Step 2 searches the lowercased response for "Happy" as written: never found. A custom label list takes
    # AffectNet's table, whose row "happiness" lists "happy": the result is not a candidate at all.
    assert parse_paper("I feel happy", custom) == "happiness"


STRICT_CASES = [
    ("rafdb", "<answer> Happy. </answer>", "happiness"),  # synonym, case, whitespace, punctuation
    ("rafdb", "<think>t</think><answer>happiness</answer>", "happiness"),
    ("ferplus", "<answer>Sadness</answer>", "sad"),  # canonical name of FERPlus's "sad"
    ("sfew", "<answer>\n  ANGER!  \n</answer>", "angry"),
    ("affectnet", "<answer>anger</answer> no, <answer>'fear'</answer>", "fear"),  # the LAST block
    ("rafdb", "<answer>happy or sad</answer>", None),  # two labels
    ("rafdb", "<answer>I think happy</answer>", None),  # more than a label
    ("rafdb", "<answer>surprised</answer>", None),  # not a label or synonym
    ("rafdb", "happiness", None),  # no tags
    ("rafdb", "<ANSWER>fear</ANSWER>", None),  # tags as the prompt writes them only
    ("rafdb", "<answer></answer>", None),
    ("rafdb", "", None),
    ("rafdb", None, None),
    ("rafdb", "<answer>contempt</answer>", None),  # a real emotion, but not a RAF-DB candidate
]


@pytest.mark.parametrize("dataset,response,expected", STRICT_CASES)
def test_parse_strict(dataset, response, expected):
    assert parse_strict(response, LABELS[dataset]) == expected


@pytest.mark.parametrize("dataset,response", [
    ("rafdb", "<answer>surprised</answer>"),  # substring
    ("rafdb", "<answer>fearful surprise</answer>"),  # two labels, candidate order
    ("ferplus", "<answer>happy or sad</answer>"),  # two labels
    ("sfew", "I think it's sad"),  # no tags
    ("rafdb", "The person radiates joy."),  # synonym table
    ("affectnet", "<ANSWER>Fear</ANSWER>"),  # upper-case tags
])
def test_strict_is_stricter_than_paper(dataset, response):
    assert parse_paper(response, LABELS[dataset], dataset) != UNKNOWN
    assert parse_strict(response, LABELS[dataset]) is None


def _spellings(label: str) -> list[str]:
    return [label, label.upper(), label.title(), f"  {label} ", f"{label}.", f"'{label}'", f"\n{label}!\n"]


@pytest.mark.parametrize("dataset", sorted(LABELS))
def test_strict_never_contradicts_paper_on_one_clean_answer(dataset):
    candidates = LABELS[dataset]
    for label in candidates:
        # The answer spells a candidate; the reasoning names every other candidate (step 2 bait).
        others = ", ".join(c for c in candidates if c != label)
        for spelled in _spellings(label):
            response = f"<think>Not {others}.</think>\n<answer>{spelled}</answer>"
            assert parse_strict(response, candidates) == label, response
            assert parse_paper(response, candidates, dataset) == label, response
    # A synonym answer agrees too, when the reasoning names no emotion (else step 2 may read the reasoning).
    for synonym, _ in list(SYNONYMS.items()) + [(v, k) for k, v in SYNONYMS.items()]:
        response = f"<think>Brows and lips were inspected.</think><answer>{synonym.title()}</answer>"
        strict = parse_strict(response, candidates)
        if strict is not None:
            assert parse_paper(response, candidates, dataset) == strict, response


FORMAT_CASES = [
    ("<think>a</think><answer>b</answer>", True),
    ("  <think>\nreasoning\n</think>\n\n<answer> sad </answer>\n", True),
    ("<think>x</think> <answer>surprise</answer>", True),
    ("<answer>sad</answer>", False),  # no think
    ("<think>x</think>", False),  # no answer
    ("<answer>sad</answer><think>x</think>", False),  # wrong order
    ("<think>x</think><answer>a</answer><answer>b</answer>", False),  # two answers
    ("<think>x</think><think>y</think><answer>a</answer>", False),  # two thinks
    ("<think>x <answer>a</answer></think><answer>a</answer>", False),  # nested tag
    ("<think>x</think><answer>a</answer> done", False),  # trailing text
    ("Sure! <think>x</think><answer>a</answer>", False),  # leading text
    ("<think> \n </think><answer>a</answer>", False),  # blank think
    ("<think>x</think><answer> </answer>", False),  # blank answer
    ("<THINK>x</THINK><ANSWER>a</ANSWER>", False),  # tags as the prompt writes them only
    ("", False),
    (None, False),
]


@pytest.mark.parametrize("response,expected", FORMAT_CASES)
def test_is_format_compliant(response, expected):
    assert is_format_compliant(response) is expected

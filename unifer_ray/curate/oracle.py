"""The oracle teacher: honest, short reasoning for synthetic faces, written from their recorded action parameters.

A trace names the strongest facial actions (with their action units), reasons to the emotion and answers with the
dataset's label name: `<think>…</think><answer>label</answer>`. Phrasing varies (openers, synonyms, conclusions,
all drawn from a seeded generator), and a configurable share of traces is *wrong* — the evidence stays true, the
conclusion and answer name another candidate — so the curation filters have something to catch.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from itertools import cycle

import numpy as np

from unifer_ray.data.synthetic import ActionParams
from unifer_ray.labels import canonical


@dataclass(frozen=True)
class Cue:
    """One facial action that is visibly present when `field` passes `threshold` (in the direction of `sign`)."""

    field: str
    threshold: float
    sign: int  # +1: present above the threshold; -1: present below it
    region: int  # brows 0, eyes 1, nose 2, mouth 3: evidence is told top to bottom
    phrases: tuple[str, ...]  # synonyms; each names its action units

    def strength(self, params: dict) -> float:
        """The action's distance from neutral, in units of the threshold's distance (>= 1 when present)."""
        neutral = ActionParams.model_fields[self.field].default
        distance = abs(self.threshold - neutral)
        return self.sign * (params[self.field] - neutral) / distance


CUES: tuple[Cue, ...] = (
    Cue("brow_raise", 0.35, +1, 0, ("brows raised high (AU1+2)", "both eyebrows lifted (AU1+AU2)",
                                    "raised brows with a wrinkled forehead (AU1+2)")),
    Cue("brow_lower", 0.5, +1, 0, ("brows lowered and drawn together (AU4)", "a furrowed brow (AU4)",
                                   "knitted, lowered brows (AU4)")),
    Cue("brow_slant", 0.5, +1, 0, ("inner brow corners raised (AU1)", "brows tilted up in the middle (AU1)")),
    Cue("brow_slant", -0.5, -1, 0, ("brows slanting down into a V (AU4)", "a sharp V of lowered inner brows (AU4)")),
    Cue("eye_open", 0.8, +1, 1, ("eyes wide open (AU5)", "widened eyes showing white above the iris (AU5)",
                                 "upper lids raised wide (AU5)")),
    Cue("eye_open", 0.25, -1, 1, ("eyes nearly closed", "narrowed eyes")),
    Cue("lid_tighten", 0.3, +1, 1, ("tightened lower lids (AU6/AU7)", "raised cheeks creasing under the eyes (AU6)",
                                    "squinting lids (AU7)")),
    Cue("nose_wrinkle", 0.5, +1, 2, ("a wrinkled nose (AU9)", "nose wrinkled with the upper lip raised (AU9+10)",
                                     "a scrunched nose (AU9)")),
    Cue("mouth_corner", 0.5, +1, 3, ("lip corners pulled up (AU12)", "a clear smile (AU12)",
                                     "upturned mouth corners (AU12)")),
    Cue("mouth_corner", -0.4, -1, 3, ("lip corners pulled down (AU15)", "a downturned mouth (AU15)",
                                       "drooping mouth corners (AU15)")),
    Cue("mouth_open", 0.6, +1, 3, ("jaw dropped open (AU26/27)", "a wide open mouth (AU26)")),
    Cue("mouth_open", 0.25, +1, 3, ("lips slightly parted (AU25)", "parted lips (AU25)")),
    Cue("lip_press", 0.5, +1, 3, ("lips pressed thin (AU23/24)", "tightly pressed lips (AU24)")),
    Cue("lip_stretch", 0.5, +1, 3, ("lips stretched sideways (AU20)", "a horizontally stretched mouth (AU20)")),
    Cue("mouth_asym", 0.5, +1, 3, ("one lip corner raised on a single side (unilateral AU12/14)",
                                   "an asymmetric, one-sided lip pull (unilateral AU14)")),
)

RESTING = ("relaxed brows, calm eyes and a closed, level mouth, with no strong action unit",
           "a symmetric face at rest: no raised brows, no smile, no tension",
           "no marked action unit: brows, eyes and lips all at rest")

# What each emotion looks like, in a few words; the conclusion of a trace uses it.
GLOSSES: dict[str, tuple[str, ...]] = {
    "neutral": ("a resting face", "an expressionless face"),
    "happiness": ("a genuine smile", "joy"),
    "sadness": ("sorrow", "a dejected look"),
    "surprise": ("a startled look", "astonishment"),
    "fear": ("alarm", "a frightened look"),
    "disgust": ("revulsion", "a repulsed reaction"),
    "anger": ("hostility", "an angry glare"),
    "contempt": ("a one-sided sneer", "disdain"),
}

OPENERS = ("I see {evidence}.", "The face shows {evidence}.", "Looking at the face: {evidence}.",
           "Visible cues: {evidence}.", "Key evidence: {evidence}.")
CONCLUSIONS = ("Together these signal {gloss}, so the expression is {label}.",
               "This pattern is typical of {gloss}, which means {label}.",
               "These action units point to {label}.",
               "Overall this reads as {gloss}: {label}.",
               "That combination indicates {label}.")
MAX_CUES = 3  # the strongest few: short traces a tiny model can learn to imitate


def _pick(options: tuple[str, ...], rng: np.random.Generator) -> str:
    return options[int(rng.integers(len(options)))]


def _join(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def face_evidence(params: dict, rng: np.random.Generator) -> str:
    """The strongest visible actions of a face, top to bottom, as one phrase (synonyms drawn from `rng`)."""
    present = [c for c in CUES if c.strength(params) >= 1.0]
    # One cue per parameter (a dropped jaw also has parted lips): the more extreme reading wins.
    by_field: dict[str, Cue] = {}
    for cue in sorted(present, key=lambda c: -abs(c.threshold)):
        by_field.setdefault(cue.field, cue)
    strongest = sorted(by_field.values(), key=lambda c: -c.strength(params))[:MAX_CUES]
    if not strongest:
        return _pick(RESTING, rng)
    return _join([_pick(c.phrases, rng) for c in sorted(strongest, key=lambda c: c.region)])


def oracle_response(
    params: dict, label: str, candidates: list[str], rng: np.random.Generator, *, wrong_rate: float = 0.0
) -> str:
    """One `<think>…</think><answer>…</answer>` trace for a face with action `params` and true `label`.

    With probability `wrong_rate` the conclusion and the answer name another candidate (chosen uniformly) while
    the evidence stays true. The answer is spelled as in `candidates` (the dataset's own label names).
    """
    if not 0.0 <= wrong_rate <= 1.0:
        raise ValueError(f"wrong_rate must be in [0, 1], got {wrong_rate}")
    if label not in candidates:
        raise ValueError(f"label {label!r} is not among the candidates {candidates}")
    params = ActionParams.model_validate(params).model_dump()
    answer = label
    others = [c for c in candidates if c != label]
    if others and rng.random() < wrong_rate:
        answer = others[int(rng.integers(len(others)))]
    opener = _pick(OPENERS, rng).format(evidence=face_evidence(params, rng))
    conclusion = _pick(CONCLUSIONS, rng).format(gloss=_pick(GLOSSES[canonical(answer)], rng), label=answer)
    return f"<think>{opener} {conclusion}</think><answer>{answer}</answer>"


def trace_texts() -> list[str]:
    """Reasoning that uses every opener with every piece of evidence and every conclusion with every gloss and
    label: the words traces are made of (the tiny model's tokenizer learns them, as a real one knows English)."""
    evidence = [phrase for cue in CUES for phrase in cue.phrases] + list(RESTING)
    openers = [opener.format(evidence=e) for opener in OPENERS for e in evidence]
    conclusions = [conclusion.format(gloss=gloss, label=label) for label, glosses in GLOSSES.items()
                   for gloss in glosses for conclusion in CONCLUSIONS]
    return [f"{opener} {conclusion}" for opener, conclusion in zip(openers, cycle(conclusions))]


def row_rng(seed: int, row_id: str) -> np.random.Generator:
    """A generator owned by one row: the same traces for the same row, whatever the batch or worker."""
    digest = hashlib.sha256(row_id.encode("utf-8")).digest()
    return np.random.default_rng([seed, int.from_bytes(digest[:8], "little")])


class OracleTeacher:
    """Ray Data batch UDF with the EngineActor contract: a batch in, `responses` (n traces per row) and `error` out.

    Reads `id`, `label`, `candidate_labels` and `action_params` (a JSON object); a row without usable action
    parameters gets an error instead of traces. Rows that arrive with an `error` pass through untouched.
    """

    def __init__(self, *, n: int = 1, wrong_rate: float = 0.0, seed: int = 0):
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        if not 0.0 <= wrong_rate <= 1.0:
            raise ValueError(f"wrong_rate must be in [0, 1], got {wrong_rate}")
        self.n, self.wrong_rate, self.seed = n, wrong_rate, seed

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        size = len(batch["id"])
        errors = np.array(batch["error"], dtype=object)
        responses = np.empty(size, dtype=object)
        responses[:] = [[] for _ in range(size)]
        for i in range(size):
            if errors[i]:
                continue
            try:
                params = json.loads(batch["action_params"][i] or "null")
                if params is None:
                    raise ValueError("no recorded action parameters (is this a synthetic face?)")
                rng = row_rng(self.seed, str(batch["id"][i]))
                candidates = [str(c) for c in batch["candidate_labels"][i]]
                responses[i] = [oracle_response(params, str(batch["label"][i]), candidates, rng,
                                                wrong_rate=self.wrong_rate) for _ in range(self.n)]
            except ValueError as exc:  # pydantic's ValidationError and JSONDecodeError are ValueErrors
                errors[i] = f"teacher: oracle: {' '.join(str(exc).split())}"
        out = {k: v for k, v in batch.items() if k != "image"}
        return {**out, "responses": responses, "error": errors}

"""Teachers behind one interface: a Ray Data stage that adds `responses` (k candidate traces per row).

- `engine`: a local model through FERBench's generation stage (engines/batch.py): vLLM on ray.data.llm's processor,
  or the hf engine in an actor pool;
- `openai`: an OpenAI-compatible API through the same stage (the openai engine's actors); the SDK retries, and at
  most concurrency × max_concurrency requests are in flight;
- `oracle`: the rule-based teacher of synthetic faces (curate/oracle.py).
Every teacher reads the row's `prompt` (with the label hint when asked) and never sees anything else of the label.
"""

from __future__ import annotations

import ray

from unifer_ray.curate.config import EngineTeacherConfig, OpenAITeacherConfig, OracleTeacherConfig
from unifer_ray.curate.oracle import OracleTeacher
from unifer_ray.engines.batch import add_generation
from unifer_ray.prompts import ferbench_prompt

EVIDENCE_INSTRUCTION = (
    "In your reasoning, first describe the visible facial evidence (brows, eyes, mouth, nose, action units), "
    "then explain which expression it shows."
)
LABEL_HINT = (
    "The correct answer is {label}. Justify it only from the visible facial evidence, and do not mention "
    "that you were given the answer."
)


def teacher_prompt(candidates: list[str], hint_label: str | None = None) -> str:
    """The teacher's prompt: the FERBench question, the evidence instruction and, in hint mode, the label."""
    parts = [ferbench_prompt(candidates), EVIDENCE_INSTRUCTION]
    if hint_label is not None:
        parts.append(LABEL_HINT.format(label=hint_label))
    return " ".join(parts)


def add_teacher(
    ds: ray.data.Dataset, teacher: OracleTeacherConfig | EngineTeacherConfig | OpenAITeacherConfig, k: int, *,
    rows: int | None = None,
) -> ray.data.Dataset:
    """`ds` (rows with `prompt`, `image`, `error`, ...) → the same rows with `responses`: k traces each. `rows`: at
    most how many rows `ds` has, where known (engines are sized on it)."""
    if isinstance(teacher, OracleTeacherConfig):
        return ds.map_batches(OracleTeacher, fn_constructor_kwargs={
            "n": k, "wrong_rate": teacher.wrong_rate, "seed": teacher.seed}, batch_size=teacher.batch_size,
            compute=ray.data.ActorPoolStrategy(size=teacher.concurrency), num_cpus=teacher.num_cpus)
    return add_generation(ds, teacher.engine, teacher.sampling.model_copy(update={"n": k}), teacher, rows=rows)

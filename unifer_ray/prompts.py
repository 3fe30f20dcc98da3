"""Prompt templates. The FERBench prompt is byte-identical to the reference files."""

from __future__ import annotations

FERBENCH_TEMPLATE = (
    "As an expert in facial expression recognition, which expression is most prominent in this image? "
    "Please select your answer from the following candidate labels: {labels}. "
    "Provide your detailed reasoning between the <think></think> tags, "
    "and then give your final answer between the <answer></answer> tags."
)


def ferbench_prompt(candidate_labels: list[str] | tuple[str, ...]) -> str:
    return FERBENCH_TEMPLATE.format(labels=", ".join(candidate_labels))

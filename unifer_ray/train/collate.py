"""CoT rows → model inputs: the chat template with the response as the assistant turn, loss on that turn only.

The conversation is the one FERBench asks (the image, then the question, in the user turn after the default system
turn), so the model is trained on exactly the prompt it is benchmarked, served and rewarded with. Labels are -100
everywhere but on the assistant's tokens: the system and user turns, the image tokens and the padding carry no loss;
the closing <|im_end|> does, so that the model learns to stop.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from unifer_ray.data.images import ImageError, load_image
from unifer_ray.records import ErrorRecord

IGNORE = -100  # the label cross-entropy skips


def chat_messages(question: str, response: str | None = None) -> list[dict]:
    """The user turn (image, then question), and the assistant turn when `response` is given."""
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    if response is not None:
        messages.append({"role": "assistant", "content": [{"type": "text", "text": response}]})
    return messages


class TurnError(ValueError):
    """A batch row without a complete assistant turn."""

    def __init__(self, row: int, reason: str):
        super().__init__(f"batch row {row}: {reason}")
        self.row, self.reason = row, reason


def assistant_labels(input_ids: torch.Tensor, header: Sequence[int], end_of_turn: int) -> torch.Tensor:
    """Labels of right-padded rows: each row's last assistant turn (after `header`, through `end_of_turn`), else -100.

    Raises TurnError naming the row whose assistant turn is missing or unterminated.
    """
    labels = torch.full_like(input_ids, IGNORE)
    width = len(header)
    header = torch.tensor(list(header), dtype=input_ids.dtype)
    for i, row in enumerate(input_ids):
        windows = row.unfold(0, width, 1)  # every run of `width` consecutive tokens
        starts = torch.nonzero((windows == header).all(dim=1)).flatten()
        if len(starts) == 0:
            raise TurnError(i, "no assistant turn")
        begin = int(starts[-1]) + width
        ends = torch.nonzero(row[begin:] == end_of_turn).flatten()
        if len(ends) == 0:
            raise TurnError(i, "the assistant turn has no end-of-turn token")
        end = begin + int(ends[0]) + 1
        labels[i, begin:end] = row[begin:end]
    return labels


@dataclass
class Batch:
    inputs: dict[str, torch.Tensor]  # what the model's forward takes, with `labels`
    ids: list[str]  # the rows kept, in order
    errors: list[dict] = field(default_factory=list)  # rows dropped: {source, row, id, reason}

    @property
    def num_label_tokens(self) -> int:
        return int((self.inputs["labels"] != IGNORE).sum()) if self.ids else 0

    @property
    def num_tokens(self) -> int:
        return int(self.inputs["attention_mask"].sum()) if self.ids else 0


class SFTCollator:
    """Rows with `image_uri`, `question`, `response` (and `id`, `source`, `row` for error records) → one Batch.

    Images are loaded and resized to image_size²; a row whose image cannot be used, whose turn is missing or whose
    length exceeds max_seq_len is dropped into `errors` (never truncated: that would cut off the answer).
    """

    def __init__(self, processor: Any, *, image_size: int, max_seq_len: int):
        self.processor = processor
        self.image_size = image_size
        self.max_seq_len = max_seq_len
        tokenizer = processor.tokenizer
        self.header = tokenizer.encode("<|im_start|>assistant\n", add_special_tokens=False)
        self.end_of_turn = tokenizer.convert_tokens_to_ids("<|im_end|>")

    def __call__(self, rows: list[dict]) -> Batch:
        errors: list[dict] = []
        kept: list[tuple[dict, Any]] = []
        for row in rows:
            try:
                kept.append((row, load_image(row["image_uri"], self.image_size)))
            except ImageError as exc:
                errors.append(_error(row, f"image {row['image_uri']}: {exc}"))
        while kept:
            inputs = self._encode(kept)
            lengths = inputs["attention_mask"].sum(dim=1).tolist()
            too_long = {i for i, n in enumerate(lengths) if n > self.max_seq_len}
            if not too_long:
                try:
                    inputs["labels"] = assistant_labels(inputs["input_ids"], self.header, self.end_of_turn)
                except TurnError as exc:  # a response that breaks the template: drop its row, encode the rest again
                    errors.append(_error(kept.pop(exc.row)[0], f"response: {exc.reason}"))
                    continue
                return Batch(inputs, [str(row.get("id", "")) for row, _ in kept], errors)
            errors += [_error(kept[i][0], f"{lengths[i]} tokens exceed max_seq_len {self.max_seq_len}")
                       for i in sorted(too_long)]
            kept = [k for i, k in enumerate(kept) if i not in too_long]
        return Batch({}, [], errors)

    def _encode(self, kept: list[tuple[dict, Any]]) -> dict[str, torch.Tensor]:
        texts = [self.processor.apply_chat_template(chat_messages(row["question"], row["response"]), tokenize=False)
                 for row, _ in kept]
        return dict(self.processor(text=texts, images=[image for _, image in kept], padding=True,
                                   padding_side="right", return_tensors="pt"))


def _error(row: dict, reason: str) -> dict:
    return ErrorRecord(str(row.get("source", "")), reason, row=row.get("row"), id=str(row.get("id", ""))).to_dict()

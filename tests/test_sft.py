"""SFT pieces without a cluster: assistant-only masking, bad rows, the schedule, the step plan, the configs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoProcessor

from unifer_ray.config import ConfigError, load_config, parse_config
from unifer_ray.curate.oracle import oracle_response, row_rng
from unifer_ray.labels import DATASETS
from unifer_ray.models.loading import load_model_and_processor
from unifer_ray.optim import warmup_cosine
from unifer_ray.parallel import deepspeed_config
from unifer_ray.prompts import ferbench_prompt
from unifer_ray.train.collate import IGNORE, SFTCollator
from unifer_ray.train.config import SFTConfig
from unifer_ray.train.loop import StepPlan, token_loss_sum

REPO = Path(__file__).resolve().parent.parent


def cot_rows(synthetic_root: Path, split: str = "train") -> list[dict]:
    """CoT rows of the synthetic train images, with the oracle teacher's traces, as read_cot yields them."""
    rows = []
    for spec in DATASETS.values():
        for line in (synthetic_root / spec.name / "synthetic_actions.jsonl").read_text().splitlines():
            record = json.loads(line)
            if record["split"] != split:
                continue
            image_path = f"/{spec.name}/{record['rel_path']}"
            rows.append({
                "id": f"{spec.key}:{image_path}", "image_path": image_path,
                "image_uri": str(synthetic_root) + image_path, "question": ferbench_prompt(spec.labels),
                "response": oracle_response(record["params"], record["label"], list(spec.labels),
                                            row_rng(0, image_path)),
                "source": "cot.jsonl", "row": len(rows) + 1,
            })
    return rows


@pytest.fixture(scope="module")
def processor(tiny_model_dir):
    return AutoProcessor.from_pretrained(tiny_model_dir, local_files_only=True)


def test_only_the_assistant_response_is_unmasked(processor, synthetic_root):
    rows = cot_rows(synthetic_root)[:4]
    batch = SFTCollator(processor, image_size=56, max_seq_len=2048)(rows)
    ids, labels, attention = batch.inputs["input_ids"], batch.inputs["labels"], batch.inputs["attention_mask"]
    assert batch.errors == [] and batch.ids == [r["id"] for r in rows]
    assert (attention == 0).any(), "rows of different lengths: the batch is padded"
    tokenizer = processor.tokenizer
    for i, row in enumerate(rows):
        unmasked = ids[i][labels[i] != IGNORE]
        # The response and the end of its turn, and nothing of the system turn, the question or the image.
        assert tokenizer.decode(unmasked) == row["response"] + "<|im_end|>"
        assert (labels[i][labels[i] != IGNORE] == unmasked).all()
    image_pad = tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert (ids == image_pad).sum() > 0 and (labels == image_pad).sum() == 0
    assert (labels[attention == 0] == IGNORE).all()
    assert batch.num_label_tokens == int((labels != IGNORE).sum())


def test_loss_sum_on_the_kept_logits_equals_the_full_loss(processor, tiny_model_dir, synthetic_root):
    model, _ = load_model_and_processor(tiny_model_dir)
    batch = SFTCollator(processor, image_size=56, max_seq_len=2048)(cot_rows(synthetic_root)[5:8])
    with torch.no_grad():
        mean = model(**batch.inputs).loss  # transformers' own shifted mean over the labelled tokens
        total = token_loss_sum(model, batch.inputs)
    assert total.item() == pytest.approx(mean.item() * batch.num_label_tokens, rel=1e-5)


def test_bad_rows_become_error_records_and_the_rest_trains(processor, synthetic_root):
    good = cot_rows(synthetic_root)[:3]
    missing = {**good[0], "id": "missing", "row": 7, "image_uri": str(synthetic_root / "no_such.jpg")}
    (synthetic_root / "broken.jpg").write_bytes(b"not an image")
    broken = {**good[1], "id": "broken", "row": 8, "image_uri": str(synthetic_root / "broken.jpg")}
    long = {**good[2], "id": "long", "row": 9, "response": "<think>" + "very " * 400 + "</think><answer>fear</answer>"}
    batch = SFTCollator(processor, image_size=56, max_seq_len=400)([missing, good[0], broken, long, good[1]])
    assert batch.ids == [good[0]["id"], good[1]["id"]]
    reasons = {e["id"]: e["reason"] for e in batch.errors}
    assert set(reasons) == {"missing", "broken", "long"}
    assert "no_such.jpg" in reasons["missing"]
    assert "not a decodable image" in reasons["broken"]
    assert "exceed max_seq_len 400" in reasons["long"]
    assert all(e["source"] == "cot.jsonl" and e["row"] in (7, 8, 9) for e in batch.errors)
    assert SFTCollator(processor, image_size=56, max_seq_len=400)([missing]).ids == []


def test_warmup_then_cosine_to_the_floor():
    lrs = [warmup_cosine(s, warmup_steps=4, total_steps=20, min_ratio=0.1) for s in range(20)]
    assert lrs[:4] == [0.25, 0.5, 0.75, 1.0]
    assert all(a >= b for a, b in zip(lrs[3:], lrs[4:]))
    assert lrs[4] == pytest.approx(1.0) and lrs[12] == pytest.approx(0.55)  # half way down the cosine
    assert warmup_cosine(20, warmup_steps=4, total_steps=20, min_ratio=0.1) == pytest.approx(0.1)


def _config(**overrides) -> SFTConfig:
    base = {"model": "m", "data": ["cot.jsonl"], "output_dir": "out", "checkpoint_dir": "runs/sft"}
    return parse_config(base | overrides, SFTConfig, source="test")


def test_step_plan_counts_whole_global_batches():
    config = _config(num_workers=2, micro_batch_size=3, grad_accum_steps=2, epochs=3)
    assert config.global_batch_size == 12
    assert StepPlan.of(config, 100) == StepPlan(steps_per_epoch=8, total_steps=24)
    assert StepPlan.of(config.model_copy(update={"max_steps": 10}), 100).total_steps == 10
    assert StepPlan.of(config.model_copy(update={"max_steps": 50}), 100).total_steps == 50  # beyond 3 epochs
    with pytest.raises(ValueError, match="11 training rows make no global batch of 12"):
        StepPlan.of(config, 11)


def test_bad_configs_name_the_field():
    with pytest.raises(ConfigError, match="strategy"):
        _config(strategy="fsdp")
    with pytest.raises(ConfigError, match="zero_stage"):
        _config(zero_stage=1)
    with pytest.raises(ConfigError, match="log_dir: required when checkpoint_dir is s3"):
        _config(checkpoint_dir="s3://bucket/runs/sft")
    with pytest.raises(ConfigError, match="optimizer.lr"):
        _config(optimizer={"lr": 0})
    with pytest.raises(ConfigError, match="precision: bf16 needs use_gpu"):
        _config(precision="bf16")


def test_the_paper_setting_config_is_valid():
    config = load_config(REPO / "configs" / "qwen2_5_vl_7b.yaml", SFTConfig, section="sft")
    assert (config.num_workers, config.use_gpu, config.strategy, config.zero_stage) == (4, True, "deepspeed", 2)
    assert config.bf16 and config.gradient_checkpointing
    assert (config.micro_batch_size, config.grad_accum_steps, config.global_batch_size) == (1, 4, 16)
    assert (config.epochs, config.image_size) == (2, 224)
    assert all(uri.startswith("s3://") for uri in (config.checkpoint_dir, config.output_dir, *config.data))
    ds = deepspeed_config(config.settings(grad_accum_steps=config.grad_accum_steps, total_steps=100))
    assert ds["train_batch_size"] == 16 and ds["gradient_accumulation_steps"] == 4
    assert ds["train_micro_batch_size_per_gpu"] == 1
    assert ds["zero_optimization"]["stage"] == 2 and ds["bf16"]["enabled"] is True


def test_the_paper_setting_packs_its_workers_on_one_learner_node(monkeypatch):
    """Ray Train places the 4 workers by the config's strategy (STRICT_PACK: one node's NVLink, never split over two
    learner nodes that are up) and, on a role-labelled cluster, on learner nodes."""
    from unifer_ray.train.sft import scaling_config

    config = load_config(REPO / "configs" / "qwen2_5_vl_7b.yaml", SFTConfig, section="sft")
    monkeypatch.setenv("UNIFER_PLACEMENT", "labels")
    scaling = scaling_config(config)
    assert (scaling.num_workers, scaling.use_gpu, scaling.placement_strategy) == (4, True, "STRICT_PACK")
    assert scaling.label_selector == {"unifer-role": "learner"}
    monkeypatch.setenv("UNIFER_PLACEMENT", "off")
    assert scaling_config(config).label_selector is None

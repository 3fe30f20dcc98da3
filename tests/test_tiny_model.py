"""The tiny Qwen2.5-VL: built, saved and reloaded like a real checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from unifer_ray.curate.oracle import oracle_response
from unifer_ray.data.synthetic import sample_params
from unifer_ray.labels import RAFDB
from unifer_ray.models.loading import load_model_and_processor
from unifer_ray.models.tiny import SPECIAL_TOKENS, TinyModelConfig, build_tiny_model

FERBENCH = Path("/work/shared/ferbench")


@pytest.fixture(scope="module")
def loaded(tiny_model_dir):
    return load_model_and_processor(tiny_model_dir)


def image_message(image: Image.Image, text: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": text}]}]


def test_saved_like_a_real_checkpoint(tiny_model_dir, loaded):
    names = {p.name for p in Path(tiny_model_dir).iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
            "chat_template.jinja", "processor_config.json"} <= names
    model, processor = loaded
    assert type(model).__name__ == "Qwen2_5_VLForConditionalGeneration"
    assert type(processor).__name__ == "Qwen2_5_VLProcessor"
    assert type(processor.image_processor).__name__ == "Qwen2VLImageProcessor"
    assert model.dtype == torch.float32 and model.device.type == "cpu" and not model.training
    assert processor.tokenizer.padding_side == "left"

    # Token ids in the model config are the tokenizer's special tokens, which follow the BPE vocabulary.
    tokenizer = processor.tokenizer
    ids = tokenizer.convert_tokens_to_ids(list(SPECIAL_TOKENS))
    assert ids == list(range(ids[0], ids[0] + len(SPECIAL_TOKENS))) and ids[-1] == len(tokenizer) - 1
    config = model.config
    assert config.image_token_id == tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert config.video_token_id == tokenizer.convert_tokens_to_ids("<|video_pad|>")
    assert config.vision_start_token_id == tokenizer.convert_tokens_to_ids("<|vision_start|>")
    assert config.vision_end_token_id == tokenizer.convert_tokens_to_ids("<|vision_end|>")
    assert config.text_config.vocab_size == len(tokenizer) <= 4096
    end_of_turn = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|endoftext|>"
    assert model.generation_config.eos_token_id[0] == end_of_turn
    assert model.generation_config.pad_token_id == tokenizer.pad_token_id

    sizes = TinyModelConfig()
    assert config.vision_config.depth == sizes.vision_depth and config.text_config.num_hidden_layers == sizes.num_layers
    half_head = sizes.hidden_size // sizes.num_heads // 2
    assert sum(config.text_config.rope_parameters["mrope_section"]) == half_head
    assert sum(p.numel() for p in model.parameters()) < 2_000_000


def test_chat_template_renders_the_qwen_format(loaded):
    _, processor = loaded
    image = Image.new("RGB", (56, 56), "gray")
    text = processor.apply_chat_template(image_message(image, "Which expression?"), add_generation_prompt=True,
                                         tokenize=False)
    assert text == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Which expression?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    conversation = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "<answer>neutral</answer>"},
    ]
    assert processor.apply_chat_template(conversation, tokenize=False) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\n<answer>neutral</answer><|im_end|>\n"
    )


# 14-pixel patches merged 4×4 into one token; images above 112×112 pixels are scaled down to that budget.
@pytest.mark.parametrize("size, tokens, grid", [((224, 224), 4, [1, 8, 8]), ((56, 56), 1, [1, 4, 4]),
                                                ((448, 448), 4, [1, 8, 8]), ((112, 56), 2, [1, 4, 8])])
def test_image_tokens(loaded, size, tokens, grid):
    model, processor = loaded
    image = Image.new("RGB", size, "white")
    text = processor.apply_chat_template(image_message(image, "Which?"), add_generation_prompt=True, tokenize=False)
    inputs = processor(text=[text], images=[image], return_tensors="pt")
    assert inputs["image_grid_thw"].tolist() == [grid]
    assert (inputs["input_ids"][0] == model.config.image_token_id).sum().item() == tokens
    with torch.inference_mode():
        logits = model(**inputs).logits
    assert logits.shape == (1, inputs["input_ids"].shape[1], model.config.text_config.vocab_size)
    assert torch.isfinite(logits).all()


def test_tokenizer_round_trips_ferbench_prompts(loaded):
    _, processor = loaded
    tokenizer = processor.tokenizer
    for path in sorted(FERBENCH.glob("*.json")):
        item = json.loads(path.read_text())[0]
        ids = tokenizer(item["prompt"]).input_ids
        assert tokenizer.decode(ids) == item["prompt"]
        assert len(ids) < len(item["prompt"]) / 4, f"{path.name}: the prompt should be made of whole words"
    assert tokenizer.decode(tokenizer("naïve 😀 weiß").input_ids) == "naïve 😀 weiß"  # byte level: any text
    for token in SPECIAL_TOKENS:
        assert len(tokenizer(token).input_ids) == 1


def test_tokenizer_spells_the_oracle_teachers_traces_in_whole_words(loaded):
    """The demo's models write the oracle's reasoning: spelled in pieces of words, every rollout and FERBench answer
    took 77 tokens instead of 45."""
    tokenizer = loaded[1].tokenizer
    rng = np.random.default_rng(0)
    for label in RAFDB.labels:
        trace = oracle_response(sample_params(label, rng).model_dump(), label, list(RAFDB.labels), rng)
        ids = tokenizer(trace).input_ids
        assert tokenizer.decode(ids) == trace
        assert len(ids) < 2.5 * len(trace.split()), f"{trace!r} took {len(ids)} tokens"


def test_build_is_deterministic_per_seed(tmp_path, tiny_model_dir):
    again = build_tiny_model(tmp_path / "again", seed=0)
    other = build_tiny_model(tmp_path / "other", seed=1)
    reference = load_file(Path(tiny_model_dir) / "model.safetensors")
    same = load_file(again / "model.safetensors")
    different = load_file(other / "model.safetensors")
    assert reference.keys() == same.keys() == different.keys()
    assert all(torch.equal(reference[k], same[k]) for k in reference)
    assert not all(torch.equal(reference[k], different[k]) for k in reference)
    assert (again / "tokenizer.json").read_text() == (Path(tiny_model_dir) / "tokenizer.json").read_text()


def test_sizes_are_configurable(tmp_path):
    config = TinyModelConfig(num_layers=3, hidden_size=96, num_heads=2, num_kv_heads=1, vision_depth=4)
    model, _ = load_model_and_processor(build_tiny_model(tmp_path / "grown", config=config))
    assert model.config.text_config.num_hidden_layers == 3 and model.config.text_config.hidden_size == 96
    assert model.config.vision_config.fullatt_block_indexes == [1, 3]
    assert model.config.text_config.rope_parameters["mrope_section"] == [6, 9, 9]
    with pytest.raises(ValueError, match="num_heads"):
        TinyModelConfig(hidden_size=100, num_heads=3)


def test_loading_names_a_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_model_and_processor(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="empty.*config.json"):
        load_model_and_processor(tmp_path / "empty")

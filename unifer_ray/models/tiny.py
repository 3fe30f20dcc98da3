"""A tiny, randomly initialised Qwen2.5-VL: the real architecture, tokenizer layout and chat template, at toy size.

It is saved with `save_pretrained`, so every stage loads it exactly like Qwen/Qwen2.5-VL-7B-Instruct.
"""

from __future__ import annotations

import json
from itertools import cycle
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers
from transformers import (
    GenerationConfig,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLProcessor,
    Qwen2Tokenizer,
    Qwen2VLImageProcessor,
    Qwen2VLVideoProcessor,
)

from unifer_ray.curate.oracle import trace_texts
from unifer_ray.labels import CANONICAL, DATASETS
from unifer_ray.prompts import ferbench_prompt

# Qwen2.5-VL's special tokens, in the real checkpoint's id order; they follow the BPE vocabulary, as in Qwen.
SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."

# The Qwen2.5-VL chat template: a default system turn, `<|im_start|>role\n...<|im_end|>\n` turns,
# each image as <|vision_start|><|image_pad|><|vision_end|> (the processor expands the pad per patch group).
CHAT_TEMPLATE = r"""
{%- set image_count = namespace(value=0) -%}
{%- set video_count = namespace(value=0) -%}
{%- for message in messages -%}
    {%- if loop.first and message['role'] != 'system' -%}
        {{- '<|im_start|>system\nDEFAULT_SYSTEM_PROMPT<|im_end|>\n' -}}
    {%- endif -%}
    {{- '<|im_start|>' + message['role'] + '\n' -}}
    {%- if message['content'] is string -%}
        {{- message['content'] -}}
    {%- else -%}
        {%- for content in message['content'] -%}
            {%- if content['type'] == 'image' or 'image' in content or 'image_url' in content -%}
                {%- set image_count.value = image_count.value + 1 -%}
                {%- if add_vision_id -%}{{- 'Picture ' ~ image_count.value ~ ': ' -}}{%- endif -%}
                {{- '<|vision_start|><|image_pad|><|vision_end|>' -}}
            {%- elif content['type'] == 'video' or 'video' in content -%}
                {%- set video_count.value = video_count.value + 1 -%}
                {%- if add_vision_id -%}{{- 'Video ' ~ video_count.value ~ ': ' -}}{%- endif -%}
                {{- '<|vision_start|><|video_pad|><|vision_end|>' -}}
            {%- elif 'text' in content -%}
                {{- content['text'] -}}
            {%- endif -%}
        {%- endfor -%}
    {%- endif -%}
    {{- '<|im_end|>\n' -}}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{- '<|im_start|>assistant\n' -}}
{%- endif -%}
""".replace("DEFAULT_SYSTEM_PROMPT", DEFAULT_SYSTEM_PROMPT)

# Qwen2's pre-tokenizer split: contractions, letter runs, single digits, punctuation runs, whitespace.
QWEN2_SPLIT_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)


class TinyModelConfig(BaseModel):
    """Sizes of the tiny model; the defaults build 1.8M parameters (vocabulary ~900) in a fraction of a second."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # vision tower
    vision_depth: int = Field(2, gt=0)
    vision_hidden_size: int = Field(64, gt=0)
    vision_intermediate_size: int = Field(128, gt=0)
    vision_num_heads: int = Field(2, gt=0)
    vision_fullatt_every: int = Field(2, gt=0)  # every k-th block attends globally, the rest in windows
    patch_size: int = Field(14, gt=0)
    # 4×4 patches merge into one token: few image tokens keep CPU training fast, and a tiny random-init tower
    # learns faster from a wide merger than from many narrow tokens (measured on the synthetic faces).
    spatial_merge_size: int = Field(4, gt=0)
    window_size: int = Field(112, gt=0)  # pixels per attention window side, as in Qwen2.5-VL
    # language model
    hidden_size: int = Field(128, gt=0)
    intermediate_size: int = Field(256, gt=0)
    num_layers: int = Field(2, gt=0)
    num_heads: int = Field(4, gt=0)
    num_kv_heads: int = Field(2, gt=0)
    max_position_embeddings: int = Field(4096, gt=0)
    rope_theta: float = 1_000_000.0
    # tokenizer: BPE merges stop at this size or when the corpus has no repeated pair left
    bpe_vocab_size: int = Field(4096, ge=512)
    # image processor: 112x112 -> 8x8 patches -> 4 tokens; larger images are scaled down to that budget
    min_pixels: int = Field(56 * 56, gt=0)
    max_pixels: int = Field(112 * 112, gt=0)

    @model_validator(mode="after")
    def _check_shapes(self) -> TinyModelConfig:
        if self.hidden_size % self.num_heads or self.num_heads % self.num_kv_heads:
            raise ValueError("hidden_size must divide by num_heads, and num_heads by num_kv_heads")
        if (self.hidden_size // self.num_heads) % 8:
            raise ValueError("the text head dim must be a multiple of 8 (3D mrope splits half of it in three)")
        if self.vision_hidden_size % self.vision_num_heads or (self.vision_hidden_size // self.vision_num_heads) % 4:
            raise ValueError("the vision head dim must be a multiple of 4 (2D rope over height and width)")
        if self.window_size % (self.patch_size * self.spatial_merge_size):
            raise ValueError("window_size must be a multiple of patch_size * spatial_merge_size")
        if self.min_pixels > self.max_pixels:
            raise ValueError("min_pixels must not exceed max_pixels")
        return self

    @property
    def mrope_section(self) -> list[int]:
        """Rotary frequencies for (time, height, width), in Qwen2.5-VL's 16:24:24 proportion of half the head dim."""
        half = self.hidden_size // self.num_heads // 2
        time = half // 4
        height = (half - time) // 2
        return [time, height, half - time - height]


def tokenizer_corpus() -> list[str]:
    """The text the tokenizer is trained on: FERBench prompts, chat roles, labels, answer tags and the oracle
    teacher's reasoning. Untrained on the reasoning, it spelled a demo trace in 77 tokens on average; trained, 45."""
    labels = sorted({label for spec in DATASETS.values() for label in spec.labels} | set(CANONICAL))
    lines = [DEFAULT_SYSTEM_PROMPT, ", ".join(labels)] + ["system", "user", "assistant"] * 2
    lines += [ferbench_prompt(spec.labels) for spec in DATASETS.values()] * 8  # frequent: whole words merge
    lines += [f"<think>{text}</think><answer>{label}</answer>" for text, label in zip(trace_texts(), cycle(labels))]
    return lines


def train_tokenizer(vocab_size: int) -> Qwen2Tokenizer:
    """A byte-level BPE in Qwen2's layout (NFC, Qwen2 split regex, byte-level), special tokens after the vocabulary."""
    bpe = Tokenizer(models.BPE())
    bpe.normalizer = normalizers.NFC()
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_SPLIT_REGEX), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte encodes: no unknown tokens
        show_progress=False,
    )
    bpe.train_from_iterator(tokenizer_corpus(), trainer=trainer)
    vocab = bpe.get_vocab()
    for token in SPECIAL_TOKENS:
        vocab[token] = len(vocab)
    merges = [tuple(pair) for pair in json.loads(bpe.to_str())["model"]["merges"]]
    return Qwen2Tokenizer(
        vocab=vocab,
        merges=merges,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        extra_special_tokens=list(SPECIAL_TOKENS[1:]),
        model_max_length=32768,
    )


def model_config(config: TinyModelConfig, tokenizer: Qwen2Tokenizer) -> Qwen2_5_VLConfig:
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in SPECIAL_TOKENS}
    fullatt = [i for i in range(config.vision_depth) if (i + 1) % config.vision_fullatt_every == 0]
    return Qwen2_5_VLConfig(
        vision_config={
            "depth": config.vision_depth,
            "hidden_size": config.vision_hidden_size,
            "intermediate_size": config.vision_intermediate_size,
            "num_heads": config.vision_num_heads,
            "hidden_act": "silu",
            "patch_size": config.patch_size,
            "spatial_merge_size": config.spatial_merge_size,
            "temporal_patch_size": 2,
            "window_size": config.window_size,
            "fullatt_block_indexes": fullatt,
            "out_hidden_size": config.hidden_size,
            "tokens_per_second": 2,
        },
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": config.hidden_size,
            "intermediate_size": config.intermediate_size,
            "num_hidden_layers": config.num_layers,
            "num_attention_heads": config.num_heads,
            "num_key_value_heads": config.num_kv_heads,
            "max_position_embeddings": config.max_position_embeddings,
            "max_window_layers": config.num_layers,
            "rms_norm_eps": 1e-6,
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": config.rope_theta,
                "mrope_section": config.mrope_section,
            },
            "bos_token_id": ids["<|endoftext|>"],
            "eos_token_id": ids["<|im_end|>"],
            "pad_token_id": ids["<|endoftext|>"],
        },
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
    )


def build_tiny_model(out_dir: str | Path, *, seed: int = 0, config: TinyModelConfig | None = None) -> Path:
    """Build the tiny model and save model, processor (tokenizer, chat template) and generation config to `out_dir`."""
    config = config or TinyModelConfig()
    out_dir = Path(out_dir)
    tokenizer = train_tokenizer(config.bpe_vocab_size)
    tokenizer.chat_template = CHAT_TEMPLATE
    # Images and videos are cut into the same patches as the vision tower's.
    pixels = {
        "min_pixels": config.min_pixels,
        "max_pixels": config.max_pixels,
        "patch_size": config.patch_size,
        "merge_size": config.spatial_merge_size,
        "temporal_patch_size": 2,
    }
    image_processor, video_processor = Qwen2VLImageProcessor(**pixels), Qwen2VLVideoProcessor(**pixels)
    processor = Qwen2_5_VLProcessor(
        image_processor=image_processor, tokenizer=tokenizer, video_processor=video_processor,
        chat_template=CHAT_TEMPLATE
    )

    # Seed a private RNG stream: the weights depend on `seed` only, and the caller's RNG state is left alone.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2_5_VLForConditionalGeneration(model_config(config, tokenizer))
    end_of_turn = tokenizer.convert_tokens_to_ids("<|im_end|>")
    end_of_text = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    model.generation_config = GenerationConfig(
        bos_token_id=end_of_text, eos_token_id=[end_of_turn, end_of_text], pad_token_id=end_of_text, do_sample=False
    )

    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    return out_dir

"""Configuration of the two curation pipelines (`curate_cot:` and `curate_rlvr:` sections of a YAML file)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from unifer_ray.data.hf_source import HFSource
from unifer_ray.data.sources import LAYOUTS
from unifer_ray.engines.base import SamplingParams
from unifer_ray.engines.batch import EngineWorkers
from unifer_ray.engines.spec import EngineSpec
from unifer_ray.labels import dataset_spec
from unifer_ray.registry import lookup


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class CurateSource(_Strict):
    """One dataset: in its original layout below `root`, or a Hugging Face dataset (`hf`). Its train split is
    curated."""

    # A layout of unifer_ray.data.sources (rafdb, ferplus, affectnet, sfew, folder); with `hf`, our dataset key
    # whose label set the labels map to, or a new dataset's name.
    dataset: str
    root: str | None = None  # the dataset's root directory (local)
    hf: str | None = None  # a Hugging Face dataset: save_to_disk or parquet/arrow/imagefolder directory, or hub id
    hf_name: str | None = None  # its configuration name
    hf_revision: str | None = None  # a hub dataset's branch, tag or commit
    image_column: str = "image"
    label_column: str = "label"
    label_map: dict[str, str] = Field(default_factory=dict)  # hf: the dataset's label name or id -> a candidate
    # hf: where its images are written, one file each (local or s3://; default: <out_dir>/images/<dataset dir>)
    image_dir: str | None = None
    split: str = "train"
    # The candidate labels: the folder layout's (default: its subfolder names), or an hf dataset's (default: the
    # dataset's label set, or the ClassLabel names).
    labels: list[str] | None = None
    # The prefix of the items' image_path ('/RAF-DB'); default: '/' + the name FERBench paths use. Readers resolve
    # image_path below the directory that holds the dataset roots under these names.
    path_prefix: str | None = None
    limit: int | None = Field(None, gt=0)  # the first N samples by id (smoke runs)
    # A stable share of the samples, drawn by a hash of each id (so every class keeps its share, and the same ids
    # are drawn on every run): e.g. a small cold-start CoT set from images whose labels all feed the RLVR set.
    fraction: float = Field(1.0, gt=0.0, le=1.0)

    @model_validator(mode="after")
    def _one_place(self) -> CurateSource:
        if (self.root is None) == (self.hf is None):
            raise ValueError("a source has either root (a dataset layout) or hf (a Hugging Face dataset)")
        if self.root is not None:
            lookup(LAYOUTS, self.dataset, "dataset layout")
        hf_only = ("hf_name", "hf_revision", "label_map", "image_dir")
        if self.root is not None and any(k in self.model_fields_set for k in hf_only):
            raise ValueError(f"{', '.join(k for k in hf_only if k in self.model_fields_set)}: for hf sources only")
        return self

    def hf_source(self) -> HFSource:
        return HFSource(path=self.hf, split=self.split, dataset=self.dataset, name=self.hf_name,
                        revision=self.hf_revision, image_column=self.image_column, label_column=self.label_column,
                        labels=tuple(self.labels) if self.labels else None, label_map=dict(self.label_map))


def sources_under(data_root: str, datasets: tuple[str, ...] = ("rafdb", "ferplus", "affectnet", "sfew"),
                  split: str = "train") -> list[CurateSource]:
    """One source per dataset laid out below `data_root` under the name FERBench paths use (RAF-DB, FERPlus...),
    as `unifer synth` and the demo write them."""
    return [CurateSource(dataset=key, root=f"{data_root.rstrip('/')}/{dataset_spec(key).name}", split=split)
            for key in datasets]


class _Workers(EngineWorkers):
    image_size: int = Field(224, gt=0)  # images are decoded and resized to image_size² before the teacher


class OracleTeacherConfig(_Workers):
    """The rule-based teacher of synthetic faces: reasoning from the recorded action parameters."""

    kind: Literal["oracle"] = "oracle"
    name: str = "oracle"  # written to each item's `teacher`
    wrong_rate: float = Field(0.0, ge=0.0, le=1.0)  # share of traces whose answer names another label
    seed: int = 0
    concurrency: int = Field(1, gt=0)  # actors
    num_cpus: float = Field(0.25, ge=0)
    image_size: int = Field(64, gt=0)  # the oracle does not look: images are only checked to decode


class EngineTeacherConfig(_Workers):
    """A local model: vLLM through ray.data.llm's processor (CPU or GPU), or the hf engine in an actor pool."""

    kind: Literal["engine"] = "engine"
    name: str
    engine: EngineSpec
    sampling: SamplingParams = SamplingParams(max_new_tokens=512, temperature=0.8, top_p=0.95)  # n is set from k

    @field_validator("engine")
    @classmethod
    def _not_openai(cls, engine: EngineSpec) -> EngineSpec:
        if engine.engine == "openai":
            raise ValueError("an OpenAI-compatible API is teacher kind 'openai', not 'engine'")
        return engine


class OpenAITeacherConfig(_Workers):
    """An OpenAI-compatible API; at most concurrency × engine.max_concurrency requests are in flight."""

    kind: Literal["openai"] = "openai"
    name: str
    engine: EngineSpec  # engine: openai, model (the served name), base_url, api_key_env, max_concurrency, timeout_s
    sampling: SamplingParams = SamplingParams(max_new_tokens=512, temperature=0.8, top_p=0.95)
    image_size: int = Field(448, gt=0)
    num_cpus: float = Field(0.25, ge=0)

    @field_validator("engine")
    @classmethod
    def _openai(cls, engine: EngineSpec) -> EngineSpec:
        if engine.engine != "openai":
            raise ValueError(f"teacher kind 'openai' needs engine: openai, got {engine.engine!r}")
        return engine


TeacherConfig = Annotated[OracleTeacherConfig | EngineTeacherConfig | OpenAITeacherConfig, Field(discriminator="kind")]

DEFAULT_LEAKAGE_PHRASES = (
    "the label is", "the given label", "the provided label", "labeled as", "labelled as", "i was told",
    "i was given", "we are told", "as instructed", "the hint", "ground truth", "the correct answer is",
    "the answer is given",
)


class CotFilters(_Strict):
    min_words: int = Field(8, ge=0)  # reasoning length bounds, in words of the <think> block
    max_words: int = Field(300, gt=0)
    leakage_phrases: list[str] = list(DEFAULT_LEAKAGE_PHRASES)  # matched case-insensitively in the reasoning
    near_duplicate_jaccard: float = Field(0.9, gt=0.0, le=1.0)  # word-trigram Jaccard at which traces collapse

    @model_validator(mode="after")
    def _bounds(self) -> CotFilters:
        if self.min_words > self.max_words:
            raise ValueError(f"min_words {self.min_words} exceeds max_words {self.max_words}")
        return self


class _Output(_Strict):
    sources: list[CurateSource] = Field(min_length=1)
    out_dir: str  # local or s3://
    format: Literal["jsonl", "parquet"] = "jsonl"
    # Images per ledger shard (at least): what an interruption can lose, and the number of files at scale.
    rows_per_shard: int = Field(1000, gt=0)
    load_batch_size: int = Field(32, gt=0)  # rows per image-loading task
    load_num_cpus: float = Field(0.5, gt=0)  # CPUs of each task of the CPU stages (decode, hash, filter)


# The *Set* configs build training sets; training on them is train.config.SFTConfig and rl.config.RLVRConfig.
class CotSetConfig(_Output):
    teacher: TeacherConfig
    k: int = Field(4, gt=0)  # candidate traces per image
    m: int = Field(2, gt=0)  # traces kept per image at most, best first
    hint: Literal["none", "label"] = "none"  # label: the teacher is told the label and must justify it
    filters: CotFilters = CotFilters()


RLVR_TASKS = ("mc", "mc_shuffled", "binary", "unified")


class RlvrSetConfig(_Output):
    tasks: list[Literal["mc", "mc_shuffled", "binary", "unified"]] = Field(default_factory=lambda: list(RLVR_TASKS),
                                                                          min_length=1)
    # Class balancing: each dataset's classes are cut down to its rarest class's count (and to max_per_class).
    balance: bool = False
    max_per_class: int | None = Field(None, gt=0)
    # FERBench item files (local or s3://) whose images must not appear in the set, and their image root.
    ferbench_files: list[str] = Field(default_factory=list)
    ferbench_image_root: str | None = None
    seed: int = 0
    hash_batch_size: int = Field(64, gt=0)

    @model_validator(mode="after")
    def _ferbench_root(self) -> RlvrSetConfig:
        if self.ferbench_files and self.ferbench_image_root is None:
            raise ValueError("ferbench_files needs ferbench_image_root (their image_path is read below it)")
        return self

"""Running a curation pipeline from a YAML file: what `unifer curate cot|rlvr` and jobs/curate.py call."""

from __future__ import annotations

from unifer_ray.config import load_config
from unifer_ray.curate.config import CotSetConfig, RlvrSetConfig
from unifer_ray.curate.cot import curate_cot_set
from unifer_ray.curate.rlvr import curate_rlvr_set
from unifer_ray.registry import lookup

PIPELINES = {"cot": (CotSetConfig, curate_cot_set), "rlvr": (RlvrSetConfig, curate_rlvr_set)}
SECTIONS = {"cot": "curate_cot", "rlvr": "curate_rlvr"}  # a config file's section of each pipeline


def curate_from_file(what: str, config_path: str, section: str | None = None) -> dict:
    """Load the `curate_cot:` / `curate_rlvr:` section (or `section`) of `config_path`, join or start Ray, run
    the pipeline and return its stats."""
    from unifer_ray.ray_runtime import init_ray

    config_cls, run = lookup(PIPELINES, what, "curation pipeline")
    config = load_config(config_path, config_cls, section=section or SECTIONS[what])
    init_ray()
    return run(config)

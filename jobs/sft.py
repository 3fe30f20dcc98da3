"""Cold-start SFT on a Ray cluster:
`ray job submit --runtime-env cluster/runtime_env.yaml -- python jobs/sft.py --config configs/<name>.yaml`."""

from __future__ import annotations

import argparse
import logging

from unifer_ray.config import load_config
from unifer_ray.ray_utils import init_ray
from unifer_ray.train.config import SFTConfig
from unifer_ray.train.sft import run_sft

if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", required=True)
    parser.add_argument("--section", default="sft", help="the config file's section holding the SFT config")
    args = parser.parse_args()
    config = load_config(args.config, SFTConfig, section=args.section)
    init_ray()
    result = run_sft(config)
    print(f"SFT done: {result.steps} steps in {result.seconds:.0f}s, loss {result.loss:.4f}; model: {result.model_dir}")

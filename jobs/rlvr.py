"""RLVR (GRPO) on a Ray cluster:
`ray job submit --runtime-env cluster/runtime_env.yaml -- python jobs/rlvr.py --config configs/<name>.yaml`.

`--resume` continues from the latest checkpoint in the config's checkpoint_dir.
"""

from __future__ import annotations

import argparse
import logging

from unifer_ray.config import load_config
from unifer_ray.ray_utils import init_ray
from unifer_ray.rl.config import RLVRConfig
from unifer_ray.rl.controller import run_rlvr

if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", required=True)
    parser.add_argument("--section", default="rlvr", help="the config file's section holding the RLVR config")
    parser.add_argument("--resume", action="store_true")
    args = parser.parse_args()
    config = load_config(args.config, RLVRConfig, section=args.section)
    init_ray()
    result = run_rlvr(config, resume=args.resume)
    print(f"RLVR: {result.steps} steps, policy version {result.policy_version}, {result.seconds:.1f}s; "
          f"model: {result.model_dir}; metrics: {result.metrics_path}")

"""RLVR (GRPO) on a Ray cluster: `unifer rlvr`, the same options (`--resume` continues from the latest checkpoint
in the config's checkpoint_dir), logs and output.

    ray job submit --runtime-env cluster/runtime_env.yaml -- python jobs/rlvr.py --config configs/qwen2_5_vl_7b.yaml
"""

import sys

from unifer_ray.cli import main

if __name__ == "__main__":
    main(["rlvr", *sys.argv[1:]])

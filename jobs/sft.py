"""Cold-start SFT on a Ray cluster: `unifer sft`, the same options, logs and output.

    ray job submit --runtime-env cluster/runtime_env.yaml -- python jobs/sft.py --config configs/qwen2_5_vl_7b.yaml
"""

import sys

from unifer_ray.cli import main

if __name__ == "__main__":
    main(["sft", *sys.argv[1:]])

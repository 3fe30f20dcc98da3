"""Curation on a Ray cluster: `unifer curate cot|rlvr`, the same options, logs and output.

    ray job submit --runtime-env cluster/runtime_env.yaml -- python jobs/curate.py cot --config configs/<name>.yaml
"""

import sys

from unifer_ray.cli import main

if __name__ == "__main__":
    main(["curate", *sys.argv[1:]])

"""Which paths of a stage config a cluster's nodes cannot see.

On a laptop every path works; on a cluster a path is read or written by actors on other nodes than the one you
submitted from. A path is visible to every node when it is
- an object-store URI (`s3://...`), or a model's hub id (`org/name`, into each node's Hugging Face cache), or
- absolute and below a mount that the cluster file gives every node (`file_mounts` and docker `-v` of a launcher
  file; volumeMounts common to every group of a KubeRay manifest), or
- relative, an input, and inside the job's working_dir upload (not excluded by the runtime env), e.g.
  `configs/serve.yaml`.
Paths only the driver writes (`log_dir`, `report_dir`) may be local to the head.

    python -m unifer_ray.cluster_paths --config configs/qwen2_5_vl_7b.yaml --cluster cluster/aws.yaml
"""

from __future__ import annotations

import argparse
import fnmatch
import posixpath
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from unifer_ray.config import read_yaml
from unifer_ray.models.model_dir import HUB_ID

# Config keys that hold paths every node must see: inputs, and outputs that workers write.
INPUT_KEYS = {"model", "path", "paths", "data", "image_root", "root", "ferbench_files", "ferbench_image_root",
              "config"}
OUTPUT_KEYS = {"out_dir", "output_dir", "checkpoint_dir", "bench_out_dir"}
DRIVER_KEYS = {"log_dir", "report_dir"}  # written by the driver alone, on the head: local is fine


@dataclass(frozen=True)
class PathProblem:
    field: str  # dotted location in the config, e.g. "sft.model" or "curate_cot.sources[0].root"
    path: str
    reason: str

    def __str__(self) -> str:
        return f"{self.field}: {self.path!r}: {self.reason}"


def config_paths(data: object, where: str = "", key: str = "") -> Iterator[tuple[str, str, str]]:
    """(field, path, key) of every path-valued entry of a config tree."""
    if isinstance(data, dict):
        for k, v in data.items():
            yield from config_paths(v, f"{where}.{k}" if where else str(k), str(k))
    elif isinstance(data, list):
        for i, v in enumerate(data):
            yield from config_paths(v, f"{where}[{i}]", key)
    elif isinstance(data, str) and data and key in INPUT_KEYS | OUTPUT_KEYS:
        yield where, data, key


def _group_mounts(spec: dict) -> list[set[str]]:
    groups = [spec["headGroupSpec"], *spec.get("workerGroupSpecs", [])]
    return [{m["mountPath"] for c in g["template"]["spec"]["containers"] for m in c.get("volumeMounts", [])}
            for g in groups]


def cluster_mounts(cluster_file: str | Path) -> set[str]:
    """Directories every node of the cluster file sees: shared mounts, not each node's own disk."""
    doc = read_yaml(cluster_file)
    if "available_node_types" in doc:  # a Ray cluster launcher file
        mounts = {m for m in doc.get("file_mounts", {}) if m.startswith("/")}
        options = doc.get("docker", {}).get("run_options", [])
        for option in options:
            parts = option.split()
            if parts[0] in ("-v", "--volume") and len(parts) == 2:
                mounts.add(parts[1].split(":")[1])
        return mounts
    spec = doc["spec"]
    spec = spec.get("rayClusterSpec") or spec.get("rayClusterConfig") or spec
    return set.intersection(*_group_mounts(spec))


def _excluded(path: str, excludes: list[str]) -> bool:
    first = Path(path).parts[0]
    return any(fnmatch.fnmatch(path, pattern) or fnmatch.fnmatch(first, pattern) for pattern in excludes)


def check_path(path: str, key: str, mounts: set[str], workdir: Path, excludes: list[str]) -> str | None:
    """Why `path` is not visible to every node, or None."""
    if "://" in path:
        return None  # s3:// (or another object store): every node reaches it with the node's credentials
    if key == "model" and HUB_ID.fullmatch(path) and not (workdir / path).exists():
        return None  # a hub id: every node resolves it into its own Hugging Face cache
    if posixpath.isabs(path):
        if any(path == m or path.startswith(m.rstrip("/") + "/") for m in mounts):
            return None
        return f"a local path under no mount every node has (shared mounts: {sorted(mounts) or 'none'}); use s3://"
    if key in OUTPUT_KEYS:
        return "a relative output path: each node would write its own copy in its working dir; use s3://"
    if _excluded(path, excludes):
        return "relative, and excluded from the job's working_dir upload by the runtime env"
    if not (workdir / path).exists():
        return f"relative, and not in the working dir {workdir} that the job uploads"
    return None


def check_config(config_file: str | Path, cluster_file: str | Path, *, runtime_env: str | Path | None = None,
                 section: str | None = None, workdir: str | Path = ".") -> list[PathProblem]:
    """Every path of the config (or of one section) that the cluster's nodes cannot see."""
    data = read_yaml(config_file)
    if section is not None:
        data = {section: data[section]}
    excludes = list(read_yaml(runtime_env).get("excludes", [])) if runtime_env else []
    mounts = cluster_mounts(cluster_file)
    problems = []
    for field, path, key in config_paths(data):
        reason = check_path(path, key, mounts, Path(workdir), excludes)
        if reason:
            problems.append(PathProblem(field, path, reason))
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("--cluster", required=True, help="cluster/aws.yaml or a KubeRay manifest")
    parser.add_argument("--runtime-env", default="cluster/runtime_env.yaml")
    parser.add_argument("--section", default=None)
    args = parser.parse_args(argv)
    problems = check_config(args.config, args.cluster, runtime_env=args.runtime_env, section=args.section)
    for problem in problems:
        print(problem)
    print(f"{args.config}: {len(problems)} path(s) the nodes of {args.cluster} cannot see")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())

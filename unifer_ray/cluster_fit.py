"""Whether a cluster file has a node for every actor a job asks for.

On a role-labelled cluster (every file in `cluster/`) each actor group of a stage asks for its node type by label
(`unifer_ray.placement`: learners, rollout engines, Serve replicas, Ray Data's cpu stages) and for resources in
bundles: a learner group's ranks, a vLLM engine's tensor-parallel GPUs, a Serve replica's GPU of one accelerator type.
A job whose selector no node group carries, or whose bundles no such node can hold, waits forever (the autoscaler
has nothing to start). This checks a stage config against a launcher file or a KubeRay manifest, as Ray's autoscaler
sees their node groups:

    python -m unifer_ray.cluster_fit --cluster cluster/kuberay/rayjob-rlvr.yaml --config configs/qwen2_5_vl_7b.yaml \
        --section rlvr
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

from unifer_ray.config import parse_config, read_yaml
from unifer_ray.placement import ROLE_LABEL

# What one Ray Data task asks for by default (the stages that set nothing: reading files).
RAY_DATA_TASK = {"CPU": 1.0}


@dataclass(frozen=True)
class NodeGroup:
    name: str
    role: str | None  # its unifer-role label
    resources: dict[str, float]  # one node's, as the autoscaler counts them


@dataclass(frozen=True)
class Demand:
    job: str  # who asks, e.g. "rlvr: learners"
    role: str  # the node type its label selector names
    bundles: tuple[dict[str, float], ...]
    one_node: bool = False  # STRICT_PACK: every bundle on one node

    def __str__(self) -> str:
        where = "one node holding all of" if self.one_node else "nodes holding each of"
        return f"{self.job}: {self.role} {where} {list(self.bundles)}"


# ---------------------------------------------------------------------------------------------- node groups


def node_groups(cluster_file: str | Path) -> list[NodeGroup]:
    """The node groups of a Ray cluster launcher file or a KubeRay RayCluster, RayJob or RayService."""
    doc = read_yaml(cluster_file)
    if "available_node_types" in doc:
        return [NodeGroup(name, node.get("labels", {}).get(ROLE_LABEL),
                          {k: float(v) for k, v in node.get("resources", {}).items()})
                for name, node in doc["available_node_types"].items()]
    from ray.autoscaler._private.kuberay.autoscaling_config import _get_ray_resources_from_group_spec

    spec = doc["spec"]
    spec = spec.get("rayClusterSpec") or spec.get("rayClusterConfig") or spec
    groups = [("head", spec["headGroupSpec"], True)]
    groups += [(g["groupName"], g, False) for g in spec.get("workerGroupSpecs", [])]
    # Ray's KubeRay autoscaler reads a group's resources so: CPUs and GPUs from rayStartParams or the container's
    # limits, custom resources from the group's top-level `resources` (not what Ray detects on a started node).
    return [NodeGroup(name, group.get("labels", {}).get(ROLE_LABEL),
                      {k: float(v) for k, v in _get_ray_resources_from_group_spec(group, is_head).items()})
            for name, group, is_head in groups]


# ---------------------------------------------------------------------------------------------- demands


def learner_demand(job: str, config) -> Demand:
    """A ParallelConfig's workers (RL learners, SFT's Ray Train workers)."""
    return Demand(job, "learner", (config.worker_bundle,) * config.num_workers,
                  one_node=config.placement_strategy == "STRICT_PACK")


def engine_demand(job: str, spec, workers) -> Demand:
    """A generation stage (FERBench, a curation teacher): vLLM engines on rollout nodes, one bundle per
    tensor-parallel GPU; CPU engines and API clients on cpu nodes, as Ray Data's default."""
    from unifer_ray.engines.batch import vllm_worker_bundle

    if not workers.num_gpus or spec.engine == "openai":
        return Demand(job, "cpu", ({"CPU": workers.num_cpus},))
    if spec.engine == "hf":
        return Demand(job, "rollout", ({"CPU": workers.num_cpus, "GPU": workers.num_gpus},))
    bundle = vllm_worker_bundle(workers)
    if workers.accelerator_type:
        bundle[f"accelerator_type:{workers.accelerator_type}"] = 0.001  # what ray.data.llm adds
    return Demand(job, "rollout", (bundle,) * int(spec.vllm_kwargs.get("tensor_parallel_size", 1)), one_node=True)


def serve_demands(job: str, config) -> list[Demand]:
    """The Serve app (`unifer_ray.serve.app`): each model replica's placement group as Ray Serve LLM builds it (the
    replica actor merged into the first bundle, the accelerator type added), and the ingress replicas."""
    from ray.llm._internal.serve.core.server.llm_server import _merge_replica_actor_and_child_actor_bundles
    from ray.serve.llm import LLMConfig

    llm = LLMConfig.model_validate(config.llm_config)
    actor = llm.deployment_config.get("ray_actor_options", {})
    replica = {"CPU": actor.get("num_cpus", 1), "GPU": actor.get("num_gpus", 0), **actor.get("resources", {})}
    engine = llm.get_engine_config()
    bundles = _merge_replica_actor_and_child_actor_bundles(engine.placement_bundles, replica)
    return [Demand(f"{job}: model replica", "serve", tuple(bundles), one_node=engine.placement_strategy != "SPREAD"),
            Demand(f"{job}: ingress", "serve", ({"CPU": config.ingress.num_cpus},))]


def stage_demands(kind: str, data: dict, *, workdir: str | Path = ".") -> list[Demand]:
    """What the stage `kind` (rlvr, sft, curate_cot, curate_rlvr, bench, pipeline, serve) asks for, from its config
    section `data` (for serve: a Serve config file's contents)."""
    if kind == "rlvr":
        from unifer_ray.rl.config import RLVRConfig

        config = parse_config(data, RLVRConfig, source=kind)
        return [Demand("rlvr: prompts (Ray Data)", "cpu", (RAY_DATA_TASK,)),
                learner_demand("rlvr: learners", config.learner),
                Demand("rlvr: a rollout engine", "rollout", tuple(config.rollout.bundles), one_node=True)]
    if kind == "sft":
        from unifer_ray.train.config import SFTConfig

        config = parse_config(data, SFTConfig, source=kind)
        return [Demand("sft: data (Ray Data)", "cpu", (RAY_DATA_TASK,)), learner_demand("sft: workers", config)]
    if kind in ("curate_cot", "curate_rlvr"):
        from unifer_ray.curate.config import CotSetConfig, RlvrSetConfig

        config = parse_config(data, CotSetConfig if kind == "curate_cot" else RlvrSetConfig, source=kind)
        demands = [Demand(f"{kind}: decode, hash, filter", "cpu", ({"CPU": config.load_num_cpus},))]
        teacher = getattr(config, "teacher", None)
        if teacher is not None:
            spec = getattr(teacher, "engine", None)
            demands.append(engine_demand(f"{kind}: teacher", spec, teacher) if spec is not None
                           else Demand(f"{kind}: teacher", "cpu", ({"CPU": teacher.num_cpus},)))
        return demands
    if kind == "bench":
        from unifer_ray.bench.config import BenchConfig

        config = parse_config(data, BenchConfig, source=kind)
        return [Demand("bench: items and scores (Ray Data)", "cpu", (RAY_DATA_TASK,)),
                *(engine_demand(f"bench: {m.name}", m.engine, m) for m in config.models)]
    if kind == "pipeline":
        from unifer_ray.pipeline import PipelineConfig

        config = parse_config(data, PipelineConfig, source=kind)
        demands = [Demand("pipeline: FERBench items and scores (Ray Data)", "cpu", (RAY_DATA_TASK,)),
                   engine_demand("pipeline: FERBench", config.bench_model.engine, config.bench_model)]
        if config.serve.config is not None:
            demands += stage_demands("serve", read_yaml(Path(workdir) / config.serve.config))
        return demands
    if kind == "serve":
        from ray.serve.schema import ServeDeploySchema

        from unifer_ray.serve.config import ServeConfig

        schema = parse_config(data, ServeDeploySchema, source=kind)
        return [d for app in schema.applications
                for d in serve_demands(f"serve {app.name}", parse_config(app.args, ServeConfig, source=kind))]
    raise ValueError(f"unknown stage kind {kind!r}")


# ---------------------------------------------------------------------------------------------- the check


def holds(node: dict[str, float], bundles: list[dict[str, float]]) -> bool:
    return all(node.get(key, 0.0) >= sum(b.get(key, 0.0) for b in bundles) for bundle in bundles for key in bundle)


def unmet(demands: list[Demand], groups: list[NodeGroup]) -> list[str]:
    """Each demand that no node group of its role can hold, with the groups of that role that exist."""
    problems = []
    for demand in demands:
        candidates = [g for g in groups if g.role == demand.role]
        if demand.one_node:
            fits = any(holds(g.resources, list(demand.bundles)) for g in candidates)
        else:
            fits = all(any(holds(g.resources, [b]) for g in candidates) for b in demand.bundles)
        if not fits:
            offered = {g.name: g.resources for g in candidates} or f"no group labelled {ROLE_LABEL}={demand.role}"
            problems.append(f"{demand}: no such node (offered: {offered})")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cluster", required=True, help="cluster/aws.yaml or a KubeRay manifest")
    parser.add_argument("--config", required=True, help="a stage config file, or a Serve config file")
    parser.add_argument("--section", default=None, help="the file's section (default: the whole file)")
    parser.add_argument("--kind", default=None, help="rlvr, sft, curate_cot, curate_rlvr, bench, pipeline or serve "
                                                     "(default: the section's name)")
    args = parser.parse_args(argv)
    data = read_yaml(args.config)
    kind = args.kind or args.section
    if kind is None:
        parser.error("--kind is needed without --section")
    demands = stage_demands(kind, data[args.section] if args.section else data)
    problems = unmet(demands, node_groups(args.cluster))
    for problem in problems:
        print(problem)
    print(f"{args.config} [{kind}]: {len(demands) - len(problems)} of {len(demands)} actor groups fit {args.cluster}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())

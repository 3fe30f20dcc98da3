"""Cluster definitions: the AWS launcher YAML against Ray's own autoscaler schema, the KubeRay manifests' structure,
the RayService's Serve config against Serve's schema and our app's config, and the runtime env."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml
from ray.serve.llm import LLMConfig
from ray.serve.schema import ServeDeploySchema

from unifer_ray.serve.config import ServeConfig

CLUSTER = Path(__file__).resolve().parent.parent / "cluster"
GPU_ROLES = ("rollout", "learner", "serve")


def load(name: str) -> dict:
    return yaml.safe_load((CLUSTER / name).read_text())


def ray_autoscaler_schema() -> dict:
    return json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())


# ---------------------------------------------------------------------------------------------- AWS launcher


def test_aws_launcher_yaml_follows_rays_autoscaler_schema():
    jsonschema.validate(load("aws.yaml"), ray_autoscaler_schema())


def test_schema_check_catches_mistakes():
    """The schema check is not vacuous: typical mistakes in a launcher file fail it."""
    schema = ray_autoscaler_schema()
    for mistake in (
        lambda c: c.pop("provider"),
        lambda c: c["available_node_types"]["rollout"].update(min_worker=1),  # misspelt key
        lambda c: c["available_node_types"]["learner"]["resources"].update(GPU=0.5),  # must be an integer
        lambda c: c.update(idle_timeout_minute=5),
    ):
        config = load("aws.yaml")
        mistake(config)
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(config, schema)


def test_aws_node_types():
    config = load("aws.yaml")
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert "GPU" not in head["resources"]  # a CPU head
    assert config["idle_timeout_minutes"] > 0
    for role in GPU_ROLES:
        node = types[role]
        assert node["resources"]["GPU"] >= 1, role
        assert 0 <= node["min_workers"] <= node["max_workers"], role
        assert node["labels"] == {"unifer-role": role}
    assert sum(types[name].get("max_workers", 0) for name in types) >= config["max_workers"] >= 1
    # Rollouts are replaceable, so they run on spot; learners hold optimizer state, so they do not.
    assert types["rollout"]["node_config"]["InstanceMarketOptions"]["MarketType"] == "spot"
    assert "InstanceMarketOptions" not in types["learner"]["node_config"]


def test_aws_image_has_vllm_and_setup_installs_this_package():
    config = load("aws.yaml")
    assert config["docker"]["image"].startswith("rayproject/ray-llm:")  # Ray's image with vLLM
    assert config["docker"]["image"].split(":")[1].startswith(ray.__version__)
    assert any("pip install" in c and "/home/ray/unifer-ray" in c for c in config["setup_commands"])
    assert config["file_mounts"] == {"/home/ray/unifer-ray": "."}
    assert ".venv" in config["rsync_exclude"]


# ---------------------------------------------------------------------------------------------- KubeRay


def pods(group: dict) -> list[dict]:
    return group["template"]["spec"]["containers"]


def gpus(group: dict) -> int:
    return int(pods(group)[0]["resources"]["limits"].get("nvidia.com/gpu", 0))


def check_cluster_spec(spec: dict, worker_groups: tuple[str, ...]) -> None:
    assert spec["rayVersion"] == ray.__version__
    assert spec["enableInTreeAutoscaling"] is True
    head = spec["headGroupSpec"]
    assert gpus(head) == 0 and pods(head)[0]["image"]
    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    assert tuple(groups) == worker_groups
    for name, group in groups.items():
        assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"], name
        assert pods(group)[0]["image"] == pods(head)[0]["image"], name
        assert group["rayStartParams"]["labels"] == f"unifer-role={name}"
        if name in GPU_ROLES:
            assert gpus(group) >= 1, name
            assert pods(group)[0]["resources"]["requests"] == pods(group)[0]["resources"]["limits"], name


def test_raycluster_autoscales_with_a_group_per_role():
    manifest = load("kuberay/raycluster.yaml")
    assert (manifest["apiVersion"], manifest["kind"]) == ("ray.io/v1", "RayCluster")
    check_cluster_spec(manifest["spec"], ("cpu", "rollout", "learner", "serve"))
    assert manifest["spec"]["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"


def test_rayjob_runs_rlvr():
    manifest = load("kuberay/rayjob-rlvr.yaml")
    assert (manifest["apiVersion"], manifest["kind"]) == ("ray.io/v1", "RayJob")
    spec = manifest["spec"]
    assert spec["entrypoint"].split()[:2] == ["python", "jobs/rlvr.py"]
    assert "--config" in spec["entrypoint"]
    assert spec["shutdownAfterJobFinishes"] is True
    assert yaml.safe_load(spec["runtimeEnvYAML"])["working_dir"] == "/home/ray/unifer-ray"
    check_cluster_spec(spec["rayClusterSpec"], ("rollout", "learner"))


def test_rayservice_runs_our_serve_app():
    manifest = load("kuberay/rayservice.yaml")
    assert (manifest["apiVersion"], manifest["kind"]) == ("ray.io/v1", "RayService")
    serve_config = ServeDeploySchema.model_validate(yaml.safe_load(manifest["spec"]["serveConfigV2"]))
    [app] = serve_config.applications
    assert app.import_path == "unifer_ray.serve.app:build_app"
    config = ServeConfig.model_validate(app.args)  # the args are exactly what our builder takes
    llm = LLMConfig.model_validate(config.llm_config)  # Ray Serve LLM's LLMServer on vLLM, one GPU per replica
    [bundle] = llm.placement_group_config["bundles"]
    autoscaling = llm.deployment_config["autoscaling_config"]
    assert bundle["GPU"] == 1 and autoscaling["max_replicas"] > autoscaling["min_replicas"] >= 1
    # Every pod gets the API key variable the app names, from a secret.
    cluster = manifest["spec"]["rayClusterConfig"]
    check_cluster_spec(cluster, ("serve",))
    for group in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]:
        env = {e["name"]: e for e in pods(group)[0]["env"]}
        assert env[config.api_key_env]["valueFrom"]["secretKeyRef"]["name"] == "unifer-api-key"
    # Serve's autoscaler can add as many replicas as the serve group can hold pods.
    [serve_group] = cluster["workerGroupSpecs"]
    assert serve_group["maxReplicas"] * gpus(serve_group) >= autoscaling["max_replicas"] * bundle["GPU"]


# ---------------------------------------------------------------------------------------------- runtime env


def test_runtime_env_is_a_valid_ray_runtime_env():
    from ray.runtime_env import RuntimeEnv

    runtime_env = load("runtime_env.yaml")
    RuntimeEnv(**runtime_env)  # Ray validates the fields
    assert runtime_env["working_dir"] == "."
    assert {".venv", ".git", "runs"} <= set(runtime_env["excludes"])
    assert all(isinstance(v, str) for v in runtime_env["env_vars"].values())

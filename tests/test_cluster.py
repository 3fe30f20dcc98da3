"""Cluster definitions: the AWS launcher YAML against Ray's own autoscaler schema, the KubeRay manifests' structure,
the RayService's Serve config against Serve's schema and our app's config, and the runtime env."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml
from ray.serve.schema import ServeDeploySchema

from tests.helpers import needs_vllm
from unifer_ray.cluster_paths import check_config, cluster_mounts
from unifer_ray.placement import ROLES
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
    # Every node type is labelled with a role the placement helper knows (the head with `head`).
    assert {t["labels"]["unifer-role"] for t in types.values()} == {*ROLES, "head"}
    assert types["rollout-tp"]["labels"] == {"unifer-role": "rollout"} and types["rollout-tp"]["resources"]["GPU"] >= 2
    # Learners hold 7B training state: 80 GB GPUs (docs/memory-7b.md).
    assert types["learner"]["node_config"]["InstanceType"] in ("p4de.24xlarge", "p5.48xlarge", "p5e.48xlarge")
    assert sum(types[name].get("max_workers", 0) for name in types) >= config["max_workers"] >= 1
    # Rollouts are replaceable, so they run on spot; learners hold optimizer state, so they do not.
    assert types["rollout"]["node_config"]["InstanceMarketOptions"]["MarketType"] == "spot"
    assert "InstanceMarketOptions" not in types["learner"]["node_config"]


def test_aws_image_has_vllm_and_setup_installs_this_package():
    config = load("aws.yaml")
    assert config["docker"]["image"].startswith("rayproject/ray-llm:")  # Ray's image with vLLM
    assert config["docker"]["image"].split(":")[1].startswith(ray.__version__)
    assert any("pip install" in c and "/home/ray/unifer-ray" in c for c in config["setup_commands"])
    assert config["file_mounts"]["/home/ray/unifer-ray"] == "."
    assert ".venv" in config["rsync_exclude"]


def test_aws_nodes_share_the_token_and_run_autoscaler_v2():
    config = load("aws.yaml")
    assert config["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    for command in config["head_start_ray_commands"][1:] + config["worker_start_ray_commands"][1:]:
        assert "RAY_AUTH_MODE=token" in command
    assert "RAY_enable_autoscaler_v2=1" in config["head_start_ray_commands"][1]


# ---------------------------------------------------------------------------------------------- KubeRay


def pods(group: dict) -> list[dict]:
    return group["template"]["spec"]["containers"]


def gpus(group: dict) -> int:
    return int(pods(group)[0]["resources"]["limits"].get("nvidia.com/gpu", 0))


def check_cluster_spec(spec: dict, worker_groups: tuple[str, ...]) -> None:
    assert spec["rayVersion"] == ray.__version__
    assert spec["enableInTreeAutoscaling"] is True
    assert spec["autoscalerOptions"]["version"] == "v2"  # the autoscaler that reads label selectors
    head = spec["headGroupSpec"]
    assert head["labels"] == {"unifer-role": "head"}
    assert gpus(head) == 0 and pods(head)[0]["image"]
    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    assert tuple(groups) == worker_groups
    for name, group in groups.items():
        assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"], name
        assert pods(group)[0]["image"] == pods(head)[0]["image"], name
        # Top-level labels: KubeRay makes them Ray node labels and autoscaler v2 scales groups by them; labels in
        # rayStartParams would not be seen by the autoscaler.
        assert group["labels"] == {"unifer-role": name.removesuffix("-tp")}  # rollout-tp: rollout nodes too
        assert "labels" not in group["rayStartParams"]
        if name in GPU_ROLES:
            assert gpus(group) >= 1, name
            assert pods(group)[0]["resources"]["requests"] == pods(group)[0]["resources"]["limits"], name


def test_raycluster_autoscales_with_a_group_per_role():
    manifest = load("kuberay/raycluster.yaml")
    assert (manifest["apiVersion"], manifest["kind"]) == ("ray.io/v1", "RayCluster")
    spec = manifest["spec"]
    check_cluster_spec(spec, ("cpu", "rollout", "rollout-tp", "learner", "serve"))
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    # Token authentication from one secret on every pod (the user reads the same secret to submit jobs).
    for group in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]:
        env = {e["name"]: e for e in pods(group)[0]["env"]}
        assert env["RAY_AUTH_MODE"]["value"] == "token"
        assert env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "unifer-ray-token", "key": "auth_token"}


def test_rayjob_runs_rlvr():
    manifest = load("kuberay/rayjob-rlvr.yaml")
    assert (manifest["apiVersion"], manifest["kind"]) == ("ray.io/v1", "RayJob")
    spec = manifest["spec"]
    assert spec["entrypoint"].split()[:2] == ["python", "jobs/rlvr.py"]
    assert "--config" in spec["entrypoint"]
    assert spec["shutdownAfterJobFinishes"] is True
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert runtime_env["working_dir"] == "/home/ray/unifer-ray"
    assert runtime_env["env_vars"] == {k: v for k, v in load("runtime_env.yaml")["env_vars"].items()
                                       if k in runtime_env["env_vars"]}
    check_cluster_spec(spec["rayClusterSpec"], ("cpu", "rollout", "learner"))
    assert spec["rayClusterSpec"]["authOptions"] == {"mode": "token"}  # the operator's own submitter gets the token


@needs_vllm
def test_rayservice_runs_our_serve_app():
    from ray.serve.llm import LLMConfig  # it refuses to import without vLLM

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
    assert manifest["spec"]["rayClusterConfig"]["authOptions"] == {"mode": "token"}
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


# ---------------------------------------------------------------------------------------------- storage paths


REPO = CLUSTER.parent


def test_every_cluster_mounts_the_datasets_on_every_node():
    for name in ("aws.yaml", "kuberay/raycluster.yaml", "kuberay/rayjob-rlvr.yaml"):
        assert "/data/fer" in cluster_mounts(CLUSTER / name), name


@pytest.mark.parametrize("cluster", ["aws.yaml", "kuberay/raycluster.yaml", "kuberay/rayjob-rlvr.yaml"])
def test_the_7b_config_reads_only_what_the_cluster_nodes_see(cluster):
    problems = check_config(REPO / "configs" / "qwen2_5_vl_7b.yaml", CLUSTER / cluster,
                            runtime_env=CLUSTER / "runtime_env.yaml", workdir=REPO)
    assert problems == []


def test_the_path_check_names_each_path_a_node_cannot_see(tmp_path):
    config = yaml.safe_load((REPO / "configs" / "qwen2_5_vl_7b.yaml").read_text())
    config["sft"]["model"] = "/models/Qwen2.5-VL-7B-Instruct"  # a node's own disk: no cluster file mounts it
    config["rlvr"]["data"]["image_root"] = "runs/demo/data"  # relative, and not uploaded with the job
    config["rlvr"]["checkpoint_dir"] = "checkpoints/rlvr"  # workers on other nodes would each write their own
    config["rlvr"]["log_dir"] = "/home/ray/logs"  # the driver's own files: fine
    config["rlvr"]["model"] = "Qwen/Qwen2.5-VL-7B-Instruct"  # a hub id: every node resolves it into its own cache
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    problems = check_config(tmp_path / "c.yaml", CLUSTER / "aws.yaml", runtime_env=CLUSTER / "runtime_env.yaml",
                            workdir=REPO)
    by_field = {p.field: p for p in problems}
    assert set(by_field) == {"sft.model", "rlvr.data.image_root", "rlvr.checkpoint_dir"}
    assert "no mount" in by_field["sft.model"].reason and "/data/fer" in by_field["sft.model"].reason
    assert "excluded" in by_field["rlvr.data.image_root"].reason
    assert "each node" in by_field["rlvr.checkpoint_dir"].reason


def test_the_path_check_accepts_relative_inputs_inside_the_upload():
    problems = check_config(REPO / "configs" / "qwen2_5_vl_7b.yaml", CLUSTER / "aws.yaml",
                            runtime_env=CLUSTER / "runtime_env.yaml", section="pipeline", workdir=REPO)
    assert problems == []  # pipeline.serve.config: configs/serve.yaml travels with the job
    problems = check_config(REPO / "configs" / "tiny.yaml", CLUSTER / "aws.yaml",
                            runtime_env=CLUSTER / "runtime_env.yaml", section="sft", workdir=REPO)
    assert {p.field for p in problems} == {"sft.model", "sft.data[0]", "sft.image_root", "sft.output_dir",
                                           "sft.checkpoint_dir"}


# ---------------------------------------------------------------------------------------------- driver and placement


def test_the_driver_adds_only_the_thread_variables_a_submitted_job_leaves_out(monkeypatch):
    """Ray refuses a ray.init runtime env that repeats a key of the job's runtime env (docs/cluster.md's submission
    failed so): the job's values win, ours fill the gaps. The submission itself runs in tests/test_cluster_sim.py."""
    from unifer_ray.ray_runtime import HF_ENV, JOB_CONFIG_ENV, THREAD_ENV, driver_runtime_env

    monkeypatch.delenv(JOB_CONFIG_ENV, raising=False)
    for key in HF_ENV:
        monkeypatch.delenv(key, raising=False)
    assert driver_runtime_env() == {"env_vars": THREAD_ENV}  # the laptop: ours
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", "/tmp/laptop-hf")
    assert driver_runtime_env() == {"env_vars": THREAD_ENV | {"HF_HUB_OFFLINE": "1", "HF_HOME": "/tmp/laptop-hf"}}
    job = {"runtime_env": {"working_dir": ".", "env_vars": load("runtime_env.yaml")["env_vars"]}}
    monkeypatch.setenv(JOB_CONFIG_ENV, json.dumps(job))
    # What cluster/runtime_env.yaml leaves out; its HF_HOME (each node's local disk) wins over the driver's.
    assert driver_runtime_env() == {"env_vars": {"MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}}
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.delenv("HF_HOME")
    job["runtime_env"]["env_vars"] |= {"MKL_NUM_THREADS": "4"}
    monkeypatch.setenv(JOB_CONFIG_ENV, json.dumps(job))
    assert driver_runtime_env() is None


def test_a_dead_clusters_address_record_is_forgotten_and_a_live_ones_kept(tmp_path):
    """Ray's "current cluster" record (what `ray start` writes) pointing at a cluster that is gone made every Ray Train
    run wait 12 s at its end for the State API; a record of a cluster that answers is another program's: kept."""
    import socket

    from unifer_ray.ray_runtime import forget_a_dead_clusters_address

    record = tmp_path / "ray_current_cluster"
    assert forget_a_dead_clusters_address(str(tmp_path)) is False  # no record: nothing to do
    with socket.socket() as live:
        live.bind(("127.0.0.1", 0))
        live.listen()
        address = f"127.0.0.1:{live.getsockname()[1]}"
        record.write_text(address)
        assert forget_a_dead_clusters_address(str(tmp_path)) is False and record.exists()
    assert record.read_text() == address  # closed now: nothing answers there
    assert forget_a_dead_clusters_address(str(tmp_path)) is True and not record.exists()


def test_placement_selectors_follow_the_mode(monkeypatch):
    from unifer_ray import placement

    monkeypatch.setenv(placement.MODE_ENV, "labels")
    assert placement.actor_options("learner") == {"label_selector": {"unifer-role": "learner"}}
    assert placement.group_options("rollout", 2) == {
        "strategy": "STRICT_PACK", "bundle_label_selector": [{"unifer-role": "rollout"}] * 2}
    assert placement.group_options("learner", 3, "PACK") == {
        "strategy": "PACK", "bundle_label_selector": [{"unifer-role": "learner"}] * 3}
    with pytest.raises(ValueError, match="unknown node role"):
        placement.selector("gpu")
    monkeypatch.setenv(placement.MODE_ENV, "off")  # a laptop: no selector, or nothing would ever be scheduled
    assert placement.actor_options("learner") == {}
    assert placement.group_options("rollout", 2) == {"strategy": "STRICT_PACK"}
    monkeypatch.setenv(placement.MODE_ENV, "on")
    with pytest.raises(ValueError, match="UNIFER_PLACEMENT"):
        placement.enabled()


# ---------------------------------------------------------------------------------------------- GPU images and AMIs

DLAMI_PARAMETER = "/aws/service/deeplearning/ami/x86_64/base-oss-nvidia-driver-gpu-ubuntu-24.04/latest/ami-id"


def cuda_major_of_ray_llm() -> int:
    """The CUDA major version the installed Ray's `llm` extra is built for: its NIXL wheel is `nixl-cu<major>`."""
    from importlib.metadata import requires

    [nixl] = [r for r in requires("ray") if r.startswith("nixl-cu") and 'extra == "llm"' in r]
    return int(re.match(r"nixl-cu(\d+)", nixl).group(1))


def test_the_image_is_built_for_the_cuda_of_ray_llm_and_every_node_boots_an_ami_whose_driver_runs_it():
    from ray.autoscaler._private.aws.config import DEFAULT_AMI, _check_ami

    config = load("aws.yaml")
    image = config["docker"]["image"]
    tag = re.fullmatch(r"rayproject/ray-llm:(?P<ray>[\d.]+)-py(?P<py>\d+)-cu(?P<cuda>\d+)", image)
    assert tag and tag["ray"] == ray.__version__
    assert int(tag["cuda"]) // 10 == cuda_major_of_ray_llm() == 13  # cu130: CUDA 13.0, as vLLM 0.29.0's wheels
    dockerfile = (CLUSTER / "Dockerfile").read_text()
    assert f"FROM {image}\n" in dockerfile  # the KubeRay image starts from the same one

    # Without an ImageId Ray falls back to its Ubuntu 18.04 / CUDA 11.2 Deep Learning AMI: Ray's own check shows it
    # filling one in for a node type without, and keeping ours (the GPU Base AMI: driver >= 580, CUDA 13).
    for node in config["available_node_types"].values():
        assert node["node_config"]["ImageId"] == f"resolve:ssm:{DLAMI_PARAMETER}"
    bare = copy.deepcopy(config)
    del bare["available_node_types"]["rollout"]["node_config"]["ImageId"]
    for checked in (config, bare):
        _check_ami(checked)
    assert bare["available_node_types"]["rollout"]["node_config"]["ImageId"] == DEFAULT_AMI["us-west-2"]
    assert {n["node_config"]["ImageId"] for n in config["available_node_types"].values()} == {
        f"resolve:ssm:{DLAMI_PARAMETER}"}


def test_the_gpu_install_gives_a_working_learner():
    """`pip install -e '.[gpu]'` (README) and the images' installs bring DeepSpeed, the learners' default strategy."""
    import tomllib

    from unifer_ray.parallel import ParallelConfig

    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert ParallelConfig().strategy == "deepspeed"
    assert any(r.startswith("ray[llm]==") for r in extras["gpu"])
    assert any(r.startswith("deepspeed") for r in extras["gpu"])
    installs = [*load("aws.yaml")["setup_commands"], (CLUSTER / "Dockerfile").read_text()]
    for install in installs:
        [extra] = re.findall(r"unifer-ray\[(\w+)\]|'\.\[(\w+)\]'", install)
        assert any(r.startswith("deepspeed") for r in extras[next(e for e in extra if e)]), install
    assert "pip install -e '.[gpu]'" in (REPO / "README.md").read_text()


# ---------------------------------------------------------------------------------------------- IAM

# The boto3 calls of Ray's AWS node provider (which the autoscaler on the head makes) and the permission each needs.
EC2_CALL_ACTIONS = {"create_instances": "ec2:RunInstances", "create_tags": "ec2:CreateTags",
                    "start_instances": "ec2:StartInstances", "stop_instances": "ec2:StopInstances",
                    "terminate_instances": "ec2:TerminateInstances", "describe_images": "ec2:DescribeImages",
                    "describe_instance_types": "ec2:DescribeInstanceTypes", "filter": "ec2:DescribeInstances"}


def allowed(policy: dict) -> dict[str, set[str]]:
    actions: dict[str, set[str]] = {}
    for statement in policy["Statement"]:
        assert statement["Effect"] == "Allow"
        for action in [statement["Action"]] if isinstance(statement["Action"], str) else statement["Action"]:
            actions.setdefault(action, set()).add(statement["Resource"])
    return actions


def test_the_heads_profile_lets_the_autoscaler_launch_workers_with_theirs():
    from ray.autoscaler._private.aws import node_provider

    config = load("aws.yaml")
    types = config["available_node_types"]
    head = types[config["head_node_type"]]["node_config"]["IamInstanceProfile"]["Arn"]
    workers = {t["node_config"]["IamInstanceProfile"]["Arn"] for n, t in types.items() if n != config["head_node_type"]}
    assert head.endswith("/unifer-ray-head") and workers == {head.replace("unifer-ray-head", "unifer-ray-worker")}

    source = Path(node_provider.__file__).read_text()
    calls = set(re.findall(r"(?:self\.ec2(?:_fail_fast)?(?:\.meta\.client|\.instances)?|ec2)\.(\w+)\(", source))
    assert calls <= set(EC2_CALL_ACTIONS), f"Ray's node provider makes EC2 calls this test does not know: {calls}"
    head_policy = allowed(json.loads((CLUSTER / "iam" / "head-policy.json").read_text()))
    for call in calls | {"create_instances"}:
        assert EC2_CALL_ACTIONS[call] in head_policy, call
    # Launching a worker with its instance profile passes the workers' role; the ImageId is an SSM parameter.
    assert head_policy["iam:PassRole"] == {"arn:aws:iam::123456789012:role/unifer-ray-worker"}
    assert any(DLAMI_PARAMETER.startswith(r.split(":parameter", 1)[1].rstrip("*"))
               for r in head_policy["ssm:GetParameters"])
    worker_policy = allowed(json.loads((CLUSTER / "iam" / "worker-policy.json").read_text()))
    assert all(action.startswith("s3:") for action in worker_policy)


# ---------------------------------------------------------------------------------------------- every job has a node

CLUSTER_FILES = sorted(p.relative_to(CLUSTER).as_posix() for p in CLUSTER.rglob("*.yaml")
                       if p.name != "runtime_env.yaml")
JOB_SCRIPTS = {"jobs/rlvr.py": "rlvr", "jobs/sft.py": "sft", "jobs/bench.py": "bench", "jobs/pipeline.py": "pipeline"}


def every_stage() -> list:
    """Every stage a general cluster runs: each section of the 7B config, the FERBench config, the GPU Serve app."""
    from unifer_ray.cluster_fit import stage_demands

    config = yaml.safe_load((REPO / "configs" / "qwen2_5_vl_7b.yaml").read_text())
    demands = [d for section, data in config.items()
               for d in stage_demands("rlvr" if section.startswith("rlvr") else section, data, workdir=REPO)]
    demands += stage_demands("bench", yaml.safe_load((REPO / "configs" / "ferbench.yaml").read_text()))
    return demands + stage_demands("serve", yaml.safe_load((REPO / "configs" / "serve_gpu.yaml").read_text()))


def cluster_jobs(doc: dict) -> list:
    """What runs on a cluster file: a RayJob its entrypoint, a RayService its app, any other cluster every stage."""
    from unifer_ray.cluster_fit import stage_demands

    if doc.get("kind") == "RayJob":
        args = doc["spec"]["entrypoint"].split()
        kind = JOB_SCRIPTS[args[1]]
        config = yaml.safe_load((REPO / args[args.index("--config") + 1]).read_text())
        section = args[args.index("--section") + 1] if "--section" in args else kind
        return stage_demands(kind, config[section], workdir=REPO)
    if doc.get("kind") == "RayService":
        return stage_demands("serve", yaml.safe_load(doc["spec"]["serveConfigV2"]))
    assert doc.get("kind") == "RayCluster" or "available_node_types" in doc
    return every_stage()


@needs_vllm  # a Serve app's bundles are Ray Serve LLM's, which imports vLLM
@pytest.mark.parametrize("name", CLUSTER_FILES)
def test_every_actor_of_the_clusters_jobs_has_a_node_type_that_holds_it(name):
    from unifer_ray.cluster_fit import node_groups, unmet

    demands = cluster_jobs(load(name))
    assert {d.role for d in demands} >= ({"serve"} if "rayservice" in name else {"cpu", "learner", "rollout"})
    assert unmet(demands, node_groups(CLUSTER / name)) == []


@needs_vllm
def test_the_fit_check_finds_what_would_wait_forever(tmp_path):
    """The defects this check exists for, each put back into a cluster file or config."""
    from unifer_ray.cluster_fit import node_groups, stage_demands, unmet

    def problems(name: str, change) -> list[str]:
        doc = load(name)
        change(doc)
        (tmp_path / "c.yaml").write_text(yaml.safe_dump(doc))
        return unmet(cluster_jobs(doc), node_groups(tmp_path / "c.yaml"))

    def groups(doc: dict) -> list[dict]:
        return doc["spec"]["rayClusterSpec"]["workerGroupSpecs"]

    # A RayJob without a cpu group: the prompts' Ray Data read selects cpu nodes.
    [problem] = problems("kuberay/rayjob-rlvr.yaml", lambda d: groups(d).pop(0))
    assert problem.startswith("rlvr: prompts (Ray Data)") and "no group labelled unifer-role=cpu" in problem
    # A serve group that does not declare its accelerator type: the replica's accelerator_type:L40S is unknown.
    [problem] = problems("kuberay/rayservice.yaml",
                         lambda d: d["spec"]["rayClusterConfig"]["workerGroupSpecs"][0].pop("resources"))
    assert problem.startswith("serve unifer: model replica") and "accelerator_type:L40S" in problem
    # A rollout pod with fewer CPUs than an engine's bundle.
    def small_rollout(doc):
        limits = groups(doc)[1]["template"]["spec"]["containers"][0]["resources"]["limits"]
        limits["cpu"] = "4"
    [problem] = problems("kuberay/rayjob-rlvr.yaml", small_rollout)
    assert problem.startswith("rlvr: a rollout engine")
    # FERBench on a cluster without cpu nodes: its items are read and scored in Ray Data's cpu stages.
    ferbench = yaml.safe_load((REPO / "configs" / "ferbench.yaml").read_text())
    without_cpu = [g for g in node_groups(CLUSTER / "aws.yaml") if g.role != "cpu"]
    ferbench["models"] = [m for m in ferbench["models"] if m["engine"]["engine"] == "vllm"]  # GPU engines only
    [problem] = unmet(stage_demands("bench", ferbench), without_cpu)
    assert problem.startswith("bench: items and scores (Ray Data)") and "unifer-role=cpu" in problem
    # More strictly packed learners than a learner node has GPUs.
    config = yaml.safe_load((REPO / "configs" / "qwen2_5_vl_7b.yaml").read_text())["rlvr"]
    config["learner"]["num_workers"] = 9
    [problem] = unmet(stage_demands("rlvr", config), node_groups(CLUSTER / "aws.yaml"))
    assert problem.startswith("rlvr: learners: learner one node")


# Instance types the GPU groups are pinned to: vCPUs, memory (GiB), GPUs, GPU kind (Ray's accelerator_type).
INSTANCE_TYPES = {"g6e.xlarge": (4, 32, 1, "L40S"), "g6e.2xlarge": (8, 64, 1, "L40S"),
                  "g6e.12xlarge": (48, 384, 4, "L40S"), "p4de.24xlarge": (96, 1152, 8, "A100")}


def test_gpu_nodes_are_the_instance_types_their_resources_and_accelerator_say():
    """AWS node types and KubeRay GPU groups name an instance type; its GPUs are the kind the group declares (the
    autoscaler's accelerator_type), and a KubeRay pod asks for no more than the instance can give (the kubelet and
    system daemons keep part of each node)."""
    for name, node in load("aws.yaml")["available_node_types"].items():
        if node["resources"].get("GPU"):
            vcpus, _, node_gpus, kind = INSTANCE_TYPES[node["node_config"]["InstanceType"]]
            assert (node["resources"]["GPU"], node["resources"]["CPU"]) == (node_gpus, vcpus), name
            assert node["resources"][f"accelerator_type:{kind}"] == 1, name
    for manifest in ("kuberay/raycluster.yaml", "kuberay/rayjob-rlvr.yaml", "kuberay/rayservice.yaml"):
        spec = load(manifest)["spec"]
        spec = spec.get("rayClusterSpec") or spec.get("rayClusterConfig") or spec
        for group in spec["workerGroupSpecs"]:
            if not gpus(group):
                continue
            where = f"{manifest} {group['groupName']}"
            vcpus, memory, node_gpus, kind = INSTANCE_TYPES[
                group["template"]["spec"]["nodeSelector"]["node.kubernetes.io/instance-type"]]
            limits = pods(group)[0]["resources"]["limits"]
            assert gpus(group) == node_gpus, where  # a whole node: no two pods share its GPUs' NVLink/PCIe
            assert float(limits["cpu"]) <= vcpus - 0.5, where
            assert float(limits["memory"].removesuffix("Gi")) <= 0.92 * memory, where
            assert group["resources"] == {f"accelerator_type:{kind}": "1"}, where

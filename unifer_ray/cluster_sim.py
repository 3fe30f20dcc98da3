"""Rehearse a cluster on one machine: a Ray head on loopback that autoscales fake nodes of the node types of a
cluster file (`cluster/aws.yaml`), with the same labels and logical GPUs, then `ray job submit` of a stage.

    python -m unifer_ray.cluster_sim --cluster cluster/aws.yaml -- python jobs/placement.py
    make cluster-sim JOB="python jobs/rlvr.py --config /abs/path/rlvr.yaml"

Ray's own fake multi-node provider (`RAY_FAKE_CLUSTER=1`, FakeMultiNodeProvider, which `type: fake_multinode` names;
loaded through `type: external` because the wheel lacks its defaults file) starts every worker node as a real raylet
on this machine, under autoscaler v2 (the one that reads node labels; v1 ignores label selectors and
may start a rollout node for a learner). The work runs on CPUs; the GPUs are logical.

Every simulated node shares this machine's session log directory, so `ray job logs` shows each actor's line once
per node's log monitor; a real cluster shows it once.

Rules kept for shared machines: loopback only (every node binds 127.0.0.1), its own ports, temp dir and token, and
the head runs in its own process group, which `stop` ends (never `ray stop`, which ends every Ray process here).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import yaml

from unifer_ray.engines.processes import RAY_CLUSTER_ENV
from unifer_ray.placement import ROLE_LABEL
from unifer_ray.ray_runtime import free_port

REPO = Path(__file__).resolve().parent.parent
FAKE_HEAD_NODE_ID = "fffffffffffffffffffffffffffffffffffffffffffffffffff00000"  # the fake provider's head id
FAKE_HEAD_TYPE = "ray.head.default"
FAKE_PROVIDER = "unifer_ray.cluster_sim_provider.FakeNodesWithOwnRuntimeEnvDirs"  # Ray's, one env dir a node
HEAD_PORTS = ("port", "dashboard-port", "dashboard-agent-listen-port", "dashboard-agent-grpc-port",
              "runtime-env-agent-port", "metrics-export-port", "ray-client-server-port", "node-manager-port",
              "object-manager-port")
EMPTY_LAUNCHER_KEYS = {"file_mounts": {}, "cluster_synced_files": [], "file_mounts_sync_continuously": False,
                       "rsync_exclude": [], "rsync_filter": [], "initialization_commands": [], "setup_commands": [],
                       "head_setup_commands": [], "worker_setup_commands": [], "head_start_ray_commands": [],
                       "worker_start_ray_commands": []}


def simulated_config(cluster_file: Path, *, gcs_address: str, cpus_per_node: float = 2, max_per_type: int = 2,
                     idle_timeout_minutes: float = 0.5, object_store_bytes: int = 200 * 2**20) -> dict:
    """The fake_multinode autoscaling config mirroring `cluster_file`'s worker types: same names, labels and GPU
    counts; few logical CPUs (each fake node is real processes on this machine) and at most `max_per_type` each."""
    source = yaml.safe_load(cluster_file.read_text())
    types = {FAKE_HEAD_TYPE: {"resources": {}, "node_config": {}, "max_workers": 0}}
    for name, node in source["available_node_types"].items():
        if name == source["head_node_type"]:
            continue
        resources = {k: v for k, v in node["resources"].items() if k != "CPU"}
        types[name] = {
            "min_workers": node.get("min_workers", 0),
            "max_workers": min(node.get("max_workers", 1), max_per_type),
            "resources": {"CPU": cpus_per_node, **resources, "object_store_memory": object_store_bytes},
            "labels": dict(node.get("labels", {})),
            "node_config": {},
        }
    return {
        "cluster_name": "unifer-sim",
        "max_workers": max_per_type * (len(types) - 1),
        "upscaling_speed": source.get("upscaling_speed", 1.0),
        "idle_timeout_minutes": idle_timeout_minutes,
        # Ray's fake multi-node provider (cluster_sim_provider), loaded through the `external` hook: the wheel lacks
        # the defaults file (fake_multi_node/example.yaml) that `type: fake_multinode` reads at start.
        "provider": {"type": "external", "module": FAKE_PROVIDER, "gcs_address": gcs_address,
                     "launch_multiple": True, "head_node_id": FAKE_HEAD_NODE_ID},
        "auth": {"ssh_user": "ubuntu"},
        "docker": {},
        "head_node_type": FAKE_HEAD_TYPE,
        "available_node_types": types,
        **EMPTY_LAUNCHER_KEYS,
    }


@dataclass
class Head:
    """A running head: its dashboard address (for `ray job submit`), environment (token included) and process."""

    address: str
    env: dict[str, str]
    process: subprocess.Popen
    temp_dir: Path
    workdir: Path = REPO
    log_path: Path | None = None
    jobs: list[str] = field(default_factory=list)

    def ray(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        """A `ray` CLI command against this head (run from `workdir`, as a user would from the repository)."""
        return subprocess.run([str(Path(sys.executable).parent / "ray"), *args], env=self.env, cwd=self.workdir,
                              capture_output=True, text=True, timeout=timeout)

    def submit(self, entrypoint: list[str], *, runtime_env: str = "cluster/runtime_env.yaml", submission_id: str,
               wait_s: float = 120) -> None:
        """`ray job submit --runtime-env ... --no-wait -- <entrypoint>`, retried while the job agent comes up."""
        deadline = time.monotonic() + wait_s
        while True:
            done = self.ray("job", "submit", "--address", self.address, "--submission-id", submission_id,
                            "--runtime-env", runtime_env, "--no-wait", "--", *entrypoint)
            if done.returncode == 0:
                self.jobs.append(submission_id)
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"ray job submit failed: {done.stderr[-3000:]}")
            time.sleep(2)

    def wait_ready(self, timeout: float = 180) -> None:
        """Until the job API answers and the state API lists the head alive: both come up a little after the head, and
        on a busy machine the second can come well after the first."""
        deadline = time.monotonic() + timeout
        while not self._answers():
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the head did not come up; see {self.log_path}")
            time.sleep(2)

    def _answers(self) -> bool:
        try:
            self.jobs_client.list_jobs()
            return bool(self.alive_nodes())
        except Exception:  # noqa: BLE001 - whatever a dashboard still starting answers: not up yet
            return False

    # Polls go through Ray's job and state SDKs in this process, not the `ray` CLI: each CLI call is a new Python
    # process (about 1.5 s of CPU), and a test polling it every few seconds took a core from the job it watched.
    @property
    def _auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.env['RAY_AUTH_TOKEN']}"}

    @property
    def jobs_client(self):
        from ray.job_submission import JobSubmissionClient

        return JobSubmissionClient(self.address, headers=self._auth)

    def status(self, submission_id: str) -> str:
        return self.jobs_client.get_job_status(submission_id).value

    def logs(self, submission_id: str) -> str:
        return self.jobs_client.get_job_logs(submission_id)

    def wait(self, submission_id: str, timeout: float, poll=None) -> str:
        """Wait for a job to end; `poll()` runs between checks (e.g. to interfere with the run)."""
        client = self.jobs_client
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            state = client.get_job_status(submission_id).value
            if state in ("SUCCEEDED", "FAILED", "STOPPED"):
                return state
            if poll is not None:
                poll()
            time.sleep(3)
        return "TIMEOUT"

    def state(self, kind: str) -> list[dict]:
        """What the cluster itself reports of its `kind` (nodes, actors, ...), dead ones included, as `ray list <kind>
        --detail` shows them."""
        from ray.util.state.api import StateApiClient
        from ray.util.state.common import ListApiOptions, StateResource

        client = StateApiClient(self.address, headers=self._auth)
        rows = client.list(StateResource(kind), ListApiOptions(detail=True, limit=10000), raise_on_missing_output=False)
        return [dataclasses.asdict(row) for row in rows]

    def alive_nodes(self) -> list[dict]:
        return [n for n in self.state("nodes") if n["state"] == "ALIVE"]

    def preempt(self, node_id: str) -> int:
        """Take a worker node away the way a spot reclaim does: its raylet and every process below it (workers, their
        engines) are killed at once, with no warning to Ray, as when the machine vanishes. Returns the raylet's pid;
        the autoscaler sees a dead instance."""
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit():
                continue
            try:
                cmdline = (proc / "cmdline").read_bytes().decode(errors="replace")
                if "raylet" not in cmdline.split("\0")[0]:
                    continue
                environ = (proc / "environ").read_bytes().decode(errors="replace")
                if os.getpgid(int(proc.name)) != self.process.pid:
                    continue  # never touch a process this head did not start
            except OSError:
                continue
            if node_id in cmdline or f"RAY_OVERRIDE_NODE_ID_FOR_TESTING={node_id}" in environ:
                raylet = psutil.Process(int(proc.name))
                machine = [raylet, *raylet.children(recursive=True)]
                for process in machine:
                    with contextlib.suppress(psutil.NoSuchProcess):
                        process.kill()
                psutil.wait_procs(machine, timeout=10)
                return raylet.pid
        raise LookupError(f"no raylet of node {node_id} on this machine")

    def stop(self, grace_s: float = 5) -> None:
        """End the head's process group (the head, its autoscaler, the fake nodes and their workers): SIGTERM, then
        SIGKILL to whatever is left after `grace_s`. The head's GCS and `ray start --block` outlast any grace
        (still there 20 s after SIGTERM, measured), so a longer wait only delays the end."""
        pgid = self.process.pid  # the head leads its own session (start_new_session)
        group = [p for p in psutil.process_iter() if _in_group(p, pgid)]
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGTERM)
        psutil.wait_procs(group, timeout=grace_s)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGKILL)
        self.process.wait()
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def _in_group(process: psutil.Process, pgid: int) -> bool:
    try:
        return os.getpgid(process.pid) == pgid
    except (ProcessLookupError, PermissionError):
        return False


def start_head(*, cluster_file: Path | None = None, num_cpus: float = 0, labels: dict[str, str] | None = None,
               log_path: Path | None = None, workdir: Path = REPO, **sim_options) -> Head:
    """Start a head on loopback with token authentication, in its own process group.

    With `cluster_file`, the head autoscales fake nodes of that file's worker types (autoscaler v2)."""
    ports = {name: free_port() for name in HEAD_PORTS}
    temp_dir = Path(tempfile.mkdtemp(prefix="usim-", dir="/tmp"))  # short: Ray's socket paths are limited
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_") and k != "PYTHONPATH"}
    env |= {
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": secrets.token_hex(32),  # this head's own token, never the user's ~/.ray/auth_token
        "RAY_USAGE_STATS_ENABLED": "0",
        # The job API lives in the dashboard, which a busy 2-core machine can take longer than Ray's 60 s to start.
        "RAY_DASHBOARD_STARTUP_TIMEOUT_S": "300",
    } | RAY_CLUSTER_ENV
    args = [str(Path(sys.executable).parent / "ray"), "start", "--head", "--block", "--num-cpus", str(num_cpus),
            "--node-ip-address", "127.0.0.1",
            "--dashboard-host", "127.0.0.1", "--include-dashboard", "true", "--disable-usage-stats",
            "--temp-dir", str(temp_dir)]
    if labels:
        args += ["--labels", ",".join(f"{k}={v}" for k, v in labels.items())]
    args += [arg for name, port in ports.items() for arg in (f"--{name}", str(port))]
    if cluster_file is not None:
        config = simulated_config(cluster_file, gcs_address=f"127.0.0.1:{ports['port']}", **sim_options)
        config_path = temp_dir / "autoscaling.yaml"
        config_path.write_text(yaml.safe_dump(config))
        args.append(f"--autoscaling-config={config_path}")
        env |= {
            "RAY_FAKE_CLUSTER": "1",
            "RAY_enable_autoscaler_v2": "1",  # v2 schedules pending work by label selector
            "RAY_CLOUD_INSTANCE_ID": FAKE_HEAD_NODE_ID,
            "RAY_OVERRIDE_NODE_ID_FOR_TESTING": FAKE_HEAD_NODE_ID,
            "AUTOSCALER_UPDATE_INTERVAL_S": "1",
            # The fake provider gives each node the address get_node_ip_address() returns; with this switch that
            # is 127.0.0.1 instead of the machine's outward address.
            "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        }
    log = open(log_path, "w") if log_path else subprocess.DEVNULL
    process = subprocess.Popen(args, env=env,
                               stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=workdir)
    if log_path:
        log.close()
    head = Head(f"http://127.0.0.1:{ports['dashboard-port']}", env, process, temp_dir, workdir, log_path)
    try:
        head.wait_ready()
    except BaseException:
        head.stop()
        raise
    return head


def placement_table(head: Head) -> list[tuple[str, str, str]]:
    """(actor class, node role, node type) of every live actor: where the autoscaler put each group."""
    nodes = {n["node_id"]: n for n in head.state("nodes")}
    rows = []
    for actor in head.state("actors"):
        if actor["state"] != "ALIVE":
            continue
        node = nodes.get(actor.get("node_id"), {})
        labels = node.get("labels") or {}
        rows.append((actor["class_name"], labels.get(ROLE_LABEL, "-"), labels.get("ray.io/node-group", "-")))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cluster", default="cluster/aws.yaml", help="launcher file whose node types to mirror")
    parser.add_argument("--runtime-env", default="cluster/runtime_env.yaml")
    parser.add_argument("--timeout", type=float, default=3600)
    parser.add_argument("--idle-timeout-minutes", type=float, default=0.5)
    parser.add_argument("entrypoint", nargs=argparse.REMAINDER, help="-- python jobs/<stage>.py ...")
    args = parser.parse_args(argv)
    entrypoint = [a for a in args.entrypoint if a != "--"] or ["python", "jobs/placement.py"]
    head = start_head(cluster_file=Path(args.cluster), labels={ROLE_LABEL: "head"}, workdir=Path.cwd(),
                      idle_timeout_minutes=args.idle_timeout_minutes)
    try:
        print(f"simulated cluster: dashboard {head.address}; submitting: {' '.join(entrypoint)}", flush=True)
        head.submit(entrypoint, runtime_env=args.runtime_env, submission_id="sim-job")
        seen: set[tuple[str, str, str]] = set()

        def report() -> None:
            for row in set(placement_table(head)) - seen:
                print(f"  placed: {row[0]:<28} on a {row[1]} node", flush=True)
                seen.add(row)

        state = head.wait("sim-job", args.timeout, poll=report)
        print(head.logs("sim-job"))
        print(f"job: {state}; waiting for the workers to scale back to zero", flush=True)
        deadline = time.monotonic() + args.idle_timeout_minutes * 60 + 120
        while len(head.alive_nodes()) > 1 and time.monotonic() < deadline:
            time.sleep(5)
        print(f"alive nodes now: {len(head.alive_nodes())} (the head)", flush=True)
        return 0 if state == "SUCCEEDED" else 1
    finally:
        head.stop()


if __name__ == "__main__":
    sys.exit(main())

"""Shared fixtures: one real local Ray cluster per session, the real tiny model, real synthetic datasets."""

from __future__ import annotations

import contextlib
import os

# Two cores: every process (this one, Ray workers) keeps torch to one thread.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")

import psutil
import pytest

from tests.helpers import RUN_MARK, this_runs_engines, wait_for_engines_to_end

# Every vLLM engine process this run starts must be gone when it ends. The run marks its processes through the
# environment, which Ray's workers and their engine processes inherit, so other runs' engines are never counted.
os.environ[RUN_MARK] = str(os.getpid())
ENGINE_STARTED_BY: dict[int, str] = {}  # engine pid -> the test during which it appeared


@contextlib.contextmanager
def engines_started_during(item):
    """Record the engine processes that appear during this phase of a test."""
    before = this_runs_engines()
    try:
        yield
    finally:
        for pid in this_runs_engines() - before:
            ENGINE_STARTED_BY.setdefault(pid, item.nodeid)


# The slowest modules first (seconds of tests each, `make test` on 2 cores, 2026-12-03), the rest after them in
# their own order. pytest-xdist hands each worker the next whole module when it is free (`--dist loadfile`); by
# default it orders modules by their number of tests, which put the 7 tests and 600 s of test_rl_system after 30
# modules of fast ones, so that one worker finished it alone: 23 min of wall clock for 20 min of tests a worker.
SLOWEST_MODULES = ("test_rl_system",  # 596 s
                   "test_serve",  # 279
                   "test_pipeline",  # 205
                   "test_cluster_sim",  # 187
                   "test_rl_failures",  # 184
                   "test_sft_ray",  # 173
                   "test_bench",  # 158
                   "test_curate_pipelines",  # 132
                   "test_vllm_engine",  # 130
                   "test_rl_equivalence",  # 103
                   "test_rl_zero3",  # 79
                   "test_hf")  # 71


def pytest_collection_modifyitems(items):
    def rank(item) -> int:
        name = item.path.stem
        return SLOWEST_MODULES.index(name) if name in SLOWEST_MODULES else len(SLOWEST_MODULES)

    items.sort(key=rank)  # stable: a module's tests keep their order


# Phase by phase: the check below runs inside the last test's teardown, and kills what it finds.
@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item):
    with engines_started_during(item):
        return (yield)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    with engines_started_during(item):
        return (yield)


@pytest.fixture(scope="session", autouse=True)
def no_engine_outlives_the_run():
    """Fail the run if an engine process it started outlived it (after a grace period for exits under way): an error
    at the last test's teardown, which a pytest-xdist worker reports to the run like any other. Set up before every
    other session fixture, so torn down after them (the Ray cluster included)."""
    yield
    survivors = wait_for_engines_to_end()
    if not survivors:
        return
    lines = []
    for process in survivors:
        with contextlib.suppress(psutil.NoSuchProcess):
            lines.append(f"  pid {process.pid} {process.name()}, started during "
                         f"{ENGINE_STARTED_BY.get(process.pid, 'a teardown or a session fixture')}")
            process.kill()
    pytest.fail("vLLM engine processes outlived this test run (killed now):\n" + "\n".join(lines), pytrace=False)


@pytest.fixture(scope="session")
def ray_cluster(s3_server):
    """A local Ray cluster whose workers also reach the loopback S3 server (its variables are set before start)."""
    import ray

    from unifer_ray.engines.processes import RAY_CLUSTER_ENV
    from unifer_ray.ray_runtime import forget_a_dead_clusters_address

    os.environ.update(RAY_CLUSTER_ENV)  # engines end with the actors that own them
    forget_a_dead_clusters_address()  # an earlier run's `ray start` nodes leave one (tests/test_rl_failures.py)
    ray.init(
        address="local",  # this run's own cluster, whatever else runs Ray on the machine
        num_cpus=4,  # logical CPUs on 2 cores, so that fractional actors and tasks can overlap
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={"env_vars": {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}},
    )
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    from unifer_ray.models.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny_model") / "tiny", seed=0)


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory):
    from unifer_ray.data.synthetic import write_synthetic_datasets

    root = tmp_path_factory.mktemp("synthetic")
    write_synthetic_datasets(root, train_per_class=4, test_per_class=3, seed=0)
    return root


@pytest.fixture(scope="session")
def ferbench_files(synthetic_root, tmp_path_factory):
    """The FERBench files of the synthetic test splits, one per dataset."""
    from unifer_ray.data.convert import convert_ferbench
    from unifer_ray.labels import DATASETS

    out = tmp_path_factory.mktemp("ferbench")
    files = []
    for spec in DATASETS.values():
        path = out / spec.ferbench_file
        convert_ferbench(spec.key, synthetic_root / spec.name, path, split="test")
        files.append(path)
    return files


@pytest.fixture(scope="session")
def s3_server():
    """A real S3 API server (moto's standalone server) on loopback; yields a fresh bucket's URI prefix.

    The endpoint and credentials go into the environment, so boto3, PyArrow and Ray workers started afterwards
    all talk to it.
    """
    import socket

    import boto3
    from moto.server import ThreadedMotoServer

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    boto3.client("s3").create_bucket(Bucket="unifer-test")
    yield "s3://unifer-test"
    server.stop()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v

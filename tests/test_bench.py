"""FERBench on a real local Ray cluster with the real tiny model: counts add up, bad items are kept, reruns resume."""

from __future__ import annotations

import json

import pytest

from tests.helpers import VLLM_TEST_KWARGS, needs_vllm
from unifer_ray.bench.config import BenchConfig, BenchFile, BenchModel
from unifer_ray.bench.items import read_items
from unifer_ray.bench.runner import run_bench, warn_if_the_pool_fills_the_cluster
from unifer_ray.engines.spec import EngineSpec
from unifer_ray.progress import shown


def _model(model_dir, name="tiny", **kw) -> BenchModel:
    return BenchModel(name=name, engine=EngineSpec(engine="hf", model=str(model_dir), max_batch_size=8),
                      sampling={"max_new_tokens": 6}, image_size=56, batch_size=8, num_cpus=1, **kw)


def bad_item_lines(good: list[dict], synthetic_root, folder: str) -> list[str]:
    """Four bad lines: a missing file, a corrupt image, a label outside the candidates, malformed JSON."""
    (synthetic_root / "corrupt.jpg").write_bytes(b"this is not a jpeg")
    return [
        json.dumps({**good[0], "image_path": f"/{folder}/does_not_exist.jpg"}),
        json.dumps({**good[0], "image_path": "/corrupt.jpg"}),
        json.dumps({**good[1], "image_path": "/x.jpg", "true_label": "boredom"}),
        '{"image_path": "/y.jpg", "true_label": ',
    ]


def test_bench_counts_add_up_with_bad_items(ray_cluster, tiny_model_dir, synthetic_root, ferbench_files, tmp_path,
                                            capfd):
    good = json.loads(ferbench_files[0].read_text())[:6]
    bad_lines = bad_item_lines(good, synthetic_root, "RAF-DB/aligned")
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text("\n".join([json.dumps(g) for g in good] + bad_lines) + "\n")
    config = BenchConfig(files=[BenchFile(path=str(mixed), image_root=str(synthetic_root))],
                         models=[_model(tiny_model_dir)], out_dir=str(tmp_path / "out"))

    (run,) = run_bench(config)
    assert run.items == 10
    assert (run.scored, run.errors) == (6, 4)
    errors = [json.loads(line) for line in open(run.errors_path)]
    reasons = " | ".join(e["reason"] for e in errors)
    assert "does_not_exist.jpg" in reasons and "not a decodable image" in reasons
    assert "boredom" in reasons and "malformed JSON" in reasons
    assert {e.get("row") for e in errors if e.get("row")} == {9, 10}  # the two bad lines name their line numbers
    results = [json.loads(line) for line in open(run.results_path)]
    assert len(results) == 6 and all(r["status"] == "scored" and r["model"] == "tiny" for r in results)
    assert all(r["engine"] == "hf" for r in results)
    assert all(r["latency_s"] > 0 and r["num_tokens"] > 0 for r in results)
    assert {r["id"] for r in results} == {f"rafdb:{g['image_path']}" for g in good}
    # The model's progress, as a log shows it: plain lines, the last one with the run's totals (8 items were sent:
    # the 6 good ones and the 2 whose images fail to load).
    progress = [line for line in capfd.readouterr().err.split("\n") if line.startswith("tiny: ")]
    accuracy = sum(r["correct_strict"] for r in results) / len(results)
    assert progress and progress[-1].startswith("tiny: 8/8 items (100%)")
    assert progress[-1].endswith(f"| accuracy {shown(accuracy)} errors 2")

    # A rerun skips the finished items and retries only the failed ones (which fail again).
    (rerun,) = run_bench(config)
    assert rerun.generated == 2 and (rerun.scored, rerun.errors) == (6, 4)


@pytest.fixture(scope="module")
def vllm_engine(tiny_model_dir):
    """The tests' vLLM engine in this process, for the answers FERBench's engine stage must give (an engine in processes
    of its own would take two more process starts, and their imports, on 2 cores)."""
    from unifer_ray.engines.vllm_engine import VLLMEngine

    engine = VLLMEngine(EngineSpec(engine="vllm", model=str(tiny_model_dir), vllm_kwargs=VLLM_TEST_KWARGS))
    yield engine
    engine.close()


@needs_vllm
@pytest.mark.parametrize("render_ahead", [False, True], ids=["rendered-by-the-engine", "rendered-ahead"])
def test_bench_on_vllm_keeps_every_item(ray_cluster, tiny_model_dir, synthetic_root, ferbench_files, vllm_engine,
                                        tmp_path, render_ahead):
    """FERBench through the CPU engine stage (OneProcessVLLM), its requests rendered by the engine itself (the
    default) or ahead in a request actor: bad items and a prompt longer than the model's context are error rows
    with their reasons, the rest is scored by vLLM, and the answers are the in-process engine's."""
    good = json.loads(ferbench_files[1].read_text())[:12]
    bad_lines = bad_item_lines(good, synthetic_root, "FERPlus") + [
        json.dumps({**good[2], "image_path": good[3]["image_path"], "prompt": "why " * 1200}),  # longer than context
    ]
    mixed = tmp_path / "mixed.jsonl"
    lines = [json.dumps(g) for g in good[:3]] + bad_lines + [json.dumps(g) for g in good[4:]]
    mixed.write_text("\n".join(lines) + "\n")
    engine = EngineSpec(engine="vllm", model=str(tiny_model_dir), vllm_kwargs=VLLM_TEST_KWARGS)
    model = BenchModel(name="tiny-vllm", engine=engine, sampling={"max_new_tokens": 12}, image_size=56,
                       batch_size=4, max_concurrent_batches=2, render_ahead=render_ahead)
    config = BenchConfig(files=[BenchFile(path=str(mixed), image_root=str(synthetic_root))], models=[model],
                         out_dir=str(tmp_path / "out"))

    (run,) = run_bench(config)
    assert run.items == 16 and (run.scored, run.errors) == (11, 5)
    assert ("VLLMRequests" in run.stats) == render_ahead
    errors = {e["id"]: e["reason"] for e in (json.loads(line) for line in open(run.errors_path))}
    reasons = " | ".join(errors.values())
    assert "does_not_exist.jpg" in reasons and "not a decodable image" in reasons
    assert "boredom" in reasons and "malformed JSON" in reasons
    assert "maximum context length is 1024" in errors[f"ferplus:{good[3]['image_path']}"]
    results = [json.loads(line) for line in open(run.results_path)]
    assert len(results) == 11 and all(r["engine"] == "vllm 0.29.0" and r["num_tokens"] > 0 for r in results)

    # The same items through the in-process vLLM engine (the same settings) give the same responses.
    from unifer_ray.data.images import load_image
    from unifer_ray.engines import ChatRequest, SamplingParams

    by_id = {f"ferplus:{g['image_path']}": g for g in good}
    ids = sorted(r["id"] for r in results)
    requests = [ChatRequest.single_image(load_image(str(synthetic_root) + by_id[i]["image_path"], 56),
                                         by_id[i]["prompt"])
                for i in ids]
    expected = [group[0].text for group in vllm_engine.generate(requests, SamplingParams(max_new_tokens=12))]
    assert [next(r["response"] for r in results if r["id"] == i) for i in ids] == expected


def test_bench_all_four_datasets_two_models(ray_cluster, tiny_model_dir, synthetic_root, ferbench_files, tmp_path):
    from unifer_ray.bench.job import bench_and_score

    files = [BenchFile(path=str(f), image_root=str(synthetic_root), limit=5) for f in ferbench_files]
    glance = _model(tiny_model_dir, "tiny-b").model_copy(update={"items_per_dataset": 2})
    config = BenchConfig(files=files, models=[_model(tiny_model_dir, "tiny-a"), glance],
                         out_dir=str(tmp_path / "out"))
    runs, metrics = bench_and_score(config)
    assert [r.scored for r in runs] == [20, 8]  # tiny-b: the first 2 items of each of the 4 datasets
    # The same weights and greedy decoding: both models answer identically.
    a = {r["id"]: r["response"] for r in map(json.loads, open(runs[0].results_path))}
    b = {r["id"]: r["response"] for r in map(json.loads, open(runs[1].results_path))}
    first_two = [item["id"] for f in files for item in read_items(f.path, image_root=f.image_root, limit=2).rows]
    assert sorted(b) == sorted(first_two) and b == {i: a[i] for i in b}
    assert set(metrics) == {"tiny-a", "tiny-b"}
    assert set(metrics["tiny-a"]) >= {"rafdb", "ferplus", "affectnet", "sfew", "overall"}
    assert metrics["tiny-a"]["overall"]["n"] == 20 and metrics["tiny-b"]["overall"]["n"] == 8
    board = (tmp_path / "out" / "report" / "leaderboard.md").read_text()
    assert "tiny-a" in board and "tiny-b" in board


def test_a_pool_that_takes_every_cpu_is_warned_about(ray_cluster, tiny_model_dir, synthetic_root, ferbench_files,
                                                     tmp_path, caplog):
    # The session cluster has 4 CPUs: 3 actors of 1 CPU leave 1 for loading; 4 leave none.
    config = BenchConfig(files=[BenchFile(path=str(ferbench_files[0]), image_root=str(synthetic_root))],
                         models=[_model(tiny_model_dir)], out_dir=str(tmp_path))
    assert not warn_if_the_pool_fills_the_cluster(_model(tiny_model_dir, concurrency=3), config, 900)
    with caplog.at_level("WARNING", logger="unifer_ray.bench.runner"):
        assert warn_if_the_pool_fills_the_cluster(_model(tiny_model_dir, concurrency=4), config, 900)
    assert "the engine stage's actors hold 4 of the cluster's 4 CPUs" in caplog.text


@needs_vllm
def test_models_run_side_by_side_only_as_many_as_leave_a_decode_task_room(ray_cluster, tiny_model_dir, tmp_path,
                                                                         ferbench_files, synthetic_root, caplog):
    """The session cluster has 4 CPUs. A vLLM engine of 1 CPU with a request actor beside it holds 1.25: two such runs
    and a decode task of 0.5 fit (3.0), three do not (4.25: the demo's deadlock); engines rendering their own rows and
    hf actors of 1 CPU: three fit (3.5). Engines sized on the cluster: one per 2,048 requests, the CPUs but one at
    most."""
    from unifer_ray.bench.runner import models_side_by_side

    def config(engine: str, at_once: int, **workers) -> BenchConfig:
        workers = {"concurrency": 1, "num_cpus": 1} | workers
        models = [BenchModel(name=f"m{i}", engine=EngineSpec(engine=engine, model=str(tiny_model_dir)), **workers)
                  for i in range(3)]
        return BenchConfig(files=[BenchFile(path=str(ferbench_files[0]), image_root=str(synthetic_root))],
                           models=models, out_dir=str(tmp_path), models_at_once=at_once)

    with caplog.at_level("INFO", logger="unifer_ray.bench.runner"):
        assert models_side_by_side(config("vllm", 3, render_ahead=True), [900] * 3) == 2
    assert "2 model(s) at once, not models_at_once=3: 3 at once would hold 3.75 of the cluster's 4 CPUs" in caplog.text
    assert models_side_by_side(config("vllm", 3), [900] * 3) == 3
    assert models_side_by_side(config("hf", 3), [900] * 3) == 3
    assert models_side_by_side(config("vllm", 1), [900] * 3) == 1
    sized = config("vllm", 3, concurrency=None)
    assert models_side_by_side(sized, [900] * 3) == 3
    assert models_side_by_side(sized, [900, 900, 4096]) == 2  # 2 engines + 1 + a decode task: 3.5; + 1 more: 4.5


def test_engines_and_batches_in_flight_are_sized_on_the_cluster(ray_cluster, tiny_model_dir):
    """The session cluster has 4 CPUs: a vLLM engine per CPU but one (left for the stages around them), one per
    2,048 requests at most; one hf actor on CPUs; batches in flight fill the engine's max_num_seqs, and one more to
    refill for an engine of several ranks (ray.data.llm's AsyncLLM); written values win."""
    from unifer_ray.engines.batch import one_process_engine, sized_workers

    vllm = EngineSpec(engine="vllm", model=str(tiny_model_dir))
    model = BenchModel(name="m", engine=vllm, batch_size=64)
    sized = sized_workers(model, vllm)
    assert one_process_engine(vllm, model)
    assert (sized.concurrency, sized.max_concurrent_batches) == (3, 4)  # 256 sequences on CPUs: 4 batches
    assert [sized_workers(model, vllm, requests).concurrency for requests in (900, 2049, 4096, 10**6)] == [1, 2, 2, 3]
    assert sized_workers(model.model_copy(update={"num_cpus": 2}), vllm).concurrency == 1
    few = vllm.model_copy(update={"vllm_kwargs": {"max_num_seqs": 32}})
    assert sized_workers(model.model_copy(update={"engine": few}), few).max_concurrent_batches == 1
    ranks = vllm.model_copy(update={"vllm_kwargs": {"tensor_parallel_size": 2}})
    assert not one_process_engine(ranks, model)
    assert sized_workers(model.model_copy(update={"engine": ranks}), ranks).concurrency == 1  # 2 CPUs an engine
    assert sized_workers(model.model_copy(update={"engine": ranks}), ranks).max_concurrent_batches == 5
    beside = vllm.model_copy(update={"one_process": False})  # ray.data.llm's engine stage on CPUs, as asked
    assert not one_process_engine(beside, model)
    on_gpus = model.model_copy(update={"num_gpus": 1})  # GPU engines: ray.data.llm's engine stage, whatever it says
    assert not one_process_engine(vllm.model_copy(update={"one_process": True}), on_gpus)
    assert sized_workers(model.model_copy(update={"engine": beside}), beside).max_concurrent_batches == 5
    written = model.model_copy(update={"concurrency": 2, "max_concurrent_batches": 3})
    assert sized_workers(written, vllm) == written
    hf = _model(tiny_model_dir)
    assert sized_workers(hf, hf.engine).concurrency == 1


def test_engines_of_several_ranks_get_ray_data_llms_engine_stage_with_a_bundle_per_rank(tiny_model_dir):
    """The processor config of a 2-rank GPU engine: vLLM gets the ranks, each rank a bundle with a GPU, and the
    processor's own template, tokenizer and multi-modal stages stay off (our request stage does their work)."""
    from unifer_ray.engines.batch import vllm_processor_config

    spec = EngineSpec(engine="vllm", model=str(tiny_model_dir), vllm_kwargs={"tensor_parallel_size": 2})
    workers = BenchModel(name="m", engine=spec, batch_size=32, concurrency=1, max_concurrent_batches=3, num_gpus=1)
    config = vllm_processor_config(spec, workers, seeded=True)
    assert config.engine_kwargs["tensor_parallel_size"] == 2
    assert "max_num_seqs" not in config.engine_kwargs  # on GPUs vLLM's own limits, not the CPU ones
    assert config.placement_group_config["bundle_per_worker"] == {"CPU": workers.num_cpus, "GPU": 1}
    assert (config.batch_size, config.max_concurrent_batches) == (32, 3)
    assert not any(stage["enabled"] for stage in (config.chat_template_stage, config.tokenize_stage,
                                                  config.prepare_multimodal_stage))

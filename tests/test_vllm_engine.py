"""The vllm engine (vLLM 0.29's CPU build) on the real tiny model, against the transformers reference engine."""

from __future__ import annotations

import json
import os

import pytest

from tests.helpers import NO_VLLM, recomputed_logprobs

# A missing vLLM skips the module; an installed one that fails to import fails it.
pytest.importorskip("vllm", reason=NO_VLLM, exc_type=ModuleNotFoundError)

from unifer_ray.data.images import load_image
from unifer_ray.engines import ChatRequest, EngineSpec, SamplingParams, create_engine, engine_label, resolve_engine
from unifer_ray.engines.hf import HFEngine
from unifer_ray.engines.platform import cpu_engine_dtype
from unifer_ray.engines.vllm_engine import VLLMEngine
from unifer_ray.rl.rollout import share_seeds


def compiled_spec(model_dir) -> EngineSpec:
    return EngineSpec(engine="vllm", model=str(model_dir), vllm_kwargs={"max_model_len": 1024, "enforce_eager": False})


@pytest.fixture(scope="module")
def compiled_engine(tiny_model_dir):
    """vLLM's compiled path (torch.compile), which CPU engines leave off by default, in this process: the module's
    engine for the tests that compare vLLM with the reference (one engine start fewer than an eager one beside it)."""
    engine = VLLMEngine(compiled_spec(tiny_model_dir))
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def hf_engine(tiny_model_dir):
    return HFEngine.from_spec(EngineSpec(engine="hf", model=str(tiny_model_dir), max_batch_size=16))


@pytest.fixture(scope="module")
def ferbench_requests(synthetic_root, ferbench_files):
    """Every synthetic FERBench test item of the four datasets, as FERBench sends them (224×224 images)."""
    return [ChatRequest.single_image(load_image(str(synthetic_root) + item["image_path"], 224), item["prompt"])
            for path in ferbench_files for item in json.loads(path.read_text())]


def test_auto_is_vllm_where_it_is_installed(tiny_model_dir):
    spec = EngineSpec(model=str(tiny_model_dir))
    assert resolve_engine(spec) == "vllm"
    assert engine_label(spec) == "vllm 0.29.0"
    assert engine_label(spec.model_copy(update={"engine": "hf"})) == "hf"


def test_a_cpu_engine_runs_in_its_owners_process_quietly_and_leaves_its_environment_as_it_was(tiny_model_dir,
                                                                                             ferbench_requests):
    """One rank on CPUs: no engine core or worker process beside this one (nothing to start, nothing to outlive its
    owner), and the switch that made it so is gone again. Images do not make it log (vLLM's CPU worker, in its
    owner's process, warned twice at every image). Closed, it has taken down the torch.distributed group it made
    this process's default, so that the process can form its own (test_rl_equivalence's learner does)."""
    import logging

    import torch.distributed as dist

    from unifer_ray.engines.processes import engine_pids
    from unifer_ray.engines.vllm_env import ONE_PROCESS_ENV

    assert not dist.is_initialized()
    worker_log, records = logging.getLogger("vllm.v1.worker.cpu_worker"), []
    handler = logging.Handler()
    handler.emit = records.append
    worker_log.addHandler(handler)
    engine = VLLMEngine(EngineSpec(engine="vllm", model=str(tiny_model_dir), vllm_kwargs={"max_model_len": 1024}))
    try:
        assert engine_pids() == [] and dist.is_initialized()
        assert all(key not in os.environ for key in ONE_PROCESS_ENV)
        assert engine.generate([ChatRequest([{"role": "user", "content": "hi"}])], SamplingParams(max_new_tokens=2))
        assert len(engine.generate(ferbench_requests[:3], SamplingParams(max_new_tokens=2))) == 3
    finally:
        engine.close()
        worker_log.removeHandler(handler)
    assert not dist.is_initialized()
    assert [record.getMessage() for record in records if record.levelno >= logging.WARNING] == []


def test_a_compiled_engine_started_again_takes_its_compiled_model_from_the_cache(tiny_model_dir, request):
    """torch's compile cache holds the model that a compiled engine compiled: the next engine of the same model and
    settings (here the module's compiled engine) finds it there (a hit, no miss). With torch's AOT compile, vLLM's
    default on this torch, every start compiled the model afresh, the cache untouched (engines/vllm_env.py
    CPU_BUILD_ENV). One engine after the other: an in-process engine's close takes down the distributed group that
    another would still use."""
    from torch._dynamo.utils import counters

    VLLMEngine(compiled_spec(tiny_model_dir)).close()
    hits, misses = counters["inductor"]["fxgraph_cache_hit"], counters["inductor"]["fxgraph_cache_miss"]
    request.getfixturevalue("compiled_engine")
    assert counters["inductor"]["fxgraph_cache_hit"] > hits
    assert counters["inductor"]["fxgraph_cache_miss"] == misses


def test_greedy_parity_with_the_reference_engine(compiled_engine, hf_engine, ferbench_requests):
    """vLLM's greedy tokens are the reference's, up to ties: where the two first differ, the reference itself rates
    both tokens within 0.01 nats (float32 kernels differ in rounding, and a random-init model's next-token
    distribution is nearly flat, so near-ties are common; a trained model's answers agree, see docs/benchmarks.md)."""
    params = SamplingParams(max_new_tokens=32, logprobs=True)
    ours = compiled_engine.generate(ferbench_requests, params)
    reference = hf_engine.generate(ferbench_requests, params)
    identical = 0
    for request, [a], [b] in zip(ferbench_requests, ours, reference):
        first = next((i for i, (x, y) in enumerate(zip(a.token_ids, b.token_ids)) if x != y), None)
        if first is None:
            identical += a.token_ids == b.token_ids
            continue
        rated = recomputed_logprobs(hf_engine, request, a.token_ids[: first + 1], 1.0)[first]
        assert abs(rated - b.logprobs[first]) < 0.01, (first, rated, b.logprobs[first])
    print(f"greedy parity vllm vs hf: {identical}/{len(ferbench_requests)} identical responses, the rest near-ties")
    assert len(ferbench_requests) >= 80 and identical >= len(ferbench_requests) // 3


def test_logprobs_match_the_reference_after_temperature(compiled_engine, hf_engine, ferbench_requests):
    """vLLM's processed log-probabilities are those of softmax(logits / T), as the float32 hf engine reports them:
    within float32's rounding for a float32 engine, within two bfloat16 steps (8-bit mantissa) for a bfloat16 one.
    Read at temperature 1 instead, the random-init model's near-flat distribution puts them up to 1.7% off (checked):
    above both bounds."""
    tolerance = {"abs": 5e-3} if cpu_engine_dtype() == "float32" else {"rel": 2 * 2**-8}
    params = SamplingParams(max_new_tokens=8, temperature=0.7, seed=11, logprobs=True)
    for request in ferbench_requests[:6]:
        [[sample]] = compiled_engine.generate([request], params)
        assert len(sample.logprobs) == len(sample.token_ids) > 0
        expected = recomputed_logprobs(hf_engine, request, sample.token_ids, 0.7)
        assert sample.logprobs == pytest.approx(expected, **tolerance)


def test_n_samples_have_distinct_seeds_and_reproduce(compiled_engine, ferbench_requests):
    params = SamplingParams(max_new_tokens=12, temperature=1.0, n=4, seed=5)
    first = compiled_engine.generate(ferbench_requests[:3], params)
    assert [len(group) for group in first] == [4, 4, 4]
    assert len({tuple(c.token_ids) for c in first[0]}) == 4  # four samples, not four copies
    assert compiled_engine.generate(ferbench_requests[:3], params) == first
    # Request i's sample k has seed 5 + 4i + k: request 1 alone with seed 9 draws request 1's samples.
    [alone] = compiled_engine.generate([ferbench_requests[1]], params.model_copy(update={"seed": 9}))
    assert alone == first[1]


def test_a_batch_split_as_rollout_workers_split_it_draws_the_same_samples(compiled_engine, ferbench_requests):
    """The shares two rollout workers generate, with the seeds the group gives them, draw the whole batch's
    samples."""
    requests = ferbench_requests[:5]
    params = SamplingParams(max_new_tokens=10, temperature=1.0, n=3, seed=100, logprobs=True)
    whole = compiled_engine.generate(requests, params)
    shares = []
    for rows, seed in share_seeds(len(requests), 2, params.seed, params.n):
        shares += compiled_engine.generate([requests[i] for i in rows], params.model_copy(update={"seed": seed}))
    assert [[c.token_ids for c in group] for group in shares] == [[c.token_ids for c in group] for group in whole]
    assert len({tuple(c.token_ids) for group in whole for c in group}) > len(whole)  # samples, not copies


def test_stops_at_the_end_of_turn(tiny_model_dir, ferbench_requests, tmp_path):
    """A model that always ends its turn at once: vLLM stops on <|im_end|>, reports it, and decodes an empty text."""
    import torch

    from unifer_ray.models.loading import load_model_and_processor

    model, processor = load_model_and_processor(str(tiny_model_dir), dtype="float32")
    end_of_turn = processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
    with torch.no_grad():  # one feature that every hidden state carries and only <|im_end|>'s output row reads
        model.get_input_embeddings().weight[:, 0] = 100.0
        model.lm_head.weight.zero_()
        model.lm_head.weight[end_of_turn, 0] = 1.0
    model.save_pretrained(tmp_path / "ends")
    processor.save_pretrained(tmp_path / "ends")
    engine = VLLMEngine(EngineSpec(engine="vllm", model=str(tmp_path / "ends"), vllm_kwargs={"max_model_len": 1024}))
    groups = engine.generate(ferbench_requests[:3], SamplingParams(max_new_tokens=16, logprobs=True))
    engine.close()
    for [completion] in groups:
        assert completion.token_ids == [end_of_turn] and completion.text == ""
        assert completion.finish_reason == "stop" and len(completion.logprobs) == 1


def test_create_engine_builds_vllm(tiny_model_dir):
    # The vllm engine's own refusal: a spec routed to the hf engine fails with another message.
    with pytest.raises(FileNotFoundError, match="no_model does not exist \\(engine 'vllm' loads local directories"):
        create_engine(EngineSpec(engine="vllm", model=str(tiny_model_dir) + "/no_model"))


def test_the_one_process_engine_stage_keeps_a_refused_request_as_its_rows_error(tiny_model_dir, ferbench_requests):
    """OneProcessVLLM adds each rendered request on its own: one that the engine refuses (rendered for a longer
    context than the engine has) is that row's error, a row that failed before the engine has no request and stays
    empty, and the others are generated as the engine generates them from the decoded images."""
    import numpy as np
    import vllm
    from transformers import AutoProcessor

    from unifer_ray.engines.batch import EngineWorkers, OneProcessVLLM, VLLMRequests, vllm_engine_kwargs
    from unifer_ray.engines.hf import chat_text

    kwargs = vllm_engine_kwargs(EngineSpec(engine="vllm", model=str(tiny_model_dir),
                                           vllm_kwargs={"max_model_len": 1024}), EngineWorkers())
    # The request actor of `render_ahead`, rendering for a longer context than the engine has.
    longer = VLLMRequests(model=str(tiny_model_dir), revision=None, sampling={"max_new_tokens": 8},
                          engine_kwargs=kwargs | {"max_model_len": 4096})
    first, second = ferbench_requests[:2]
    question = first.messages[0]["content"][1]["text"]
    batch = {"id": np.array(["a", "b", "c"], dtype=object),
             "prompt": np.array([question, "why " * 1200, question], dtype=object),
             "image": np.stack([np.asarray(request.images()[0]) for request in (first, second, second)]),
             "error": np.array(["", "", "image: not a decodable image"], dtype=object)}
    requests = longer(batch)
    assert all(requests["engine_input"][:2]) and requests["engine_input"][2] is None

    stage = OneProcessVLLM(model=str(tiny_model_dir), engine_kwargs=kwargs)
    try:
        out = stage(requests)
        processor = AutoProcessor.from_pretrained(tiny_model_dir, local_files_only=True)
        prompt = {"prompt": chat_text(processor, first), "multi_modal_data": {"image": first.images()}}
        [expected] = stage.llm.generate([prompt], vllm.SamplingParams(max_tokens=8, temperature=0.0), use_tqdm=False)
    finally:
        stage.llm.llm_engine.engine_core.shutdown()
    assert "engine_input" not in out and list(out["id"]) == ["a", "b", "c"]
    assert out["generated_text"][0] == expected.outputs[0].text and out["num_generated_tokens"][0] > 0
    assert out["__inference_error__"][0] == ""
    assert "longer than the maximum model length of 1024" in out["__inference_error__"][1]
    assert out["generated_text"][1] == ""
    assert (out["generated_text"][2], out["num_generated_tokens"][2], out["__inference_error__"][2]) == ("", 0, "")

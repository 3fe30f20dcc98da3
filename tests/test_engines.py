"""Engines on the real tiny model (hf), a real HTTP server (openai), and engine selection."""

from __future__ import annotations

import asyncio
import base64
import io
import socket
import sys
import threading
import time

import numpy as np
import pytest
import torch
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from PIL import Image

from tests.helpers import needs_vllm, recomputed_logprobs
from unifer_ray.engines import ChatRequest, EngineSpec, SamplingParams, create_engine, resolve_engine
from unifer_ray.engines.hf import HFEngine
from unifer_ray.engines.openai_api import OpenAIEngine, RequestFailed


def random_image(size: tuple[int, int], seed: int) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(pixels)


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    return HFEngine.from_spec(EngineSpec(engine="hf", model=str(tiny_model_dir), max_batch_size=4))


@pytest.fixture(scope="module")
def requests_():
    """Different image sizes and prompt lengths (so rows are padded differently), and one text-only request."""
    sizes = [(56, 56), (112, 84), (84, 56), (56, 112), (112, 112)]
    requests = [ChatRequest.single_image(random_image(size, i), "Which expression? " * (i + 1))
                for i, size in enumerate(sizes)]
    return requests + [ChatRequest([{"role": "user", "content": "Describe the brows."}])]


def test_batched_greedy_equals_one_by_one(engine, requests_):
    params = SamplingParams(max_new_tokens=8)
    batched = engine.generate(requests_, params)  # chunks of 4 and 2
    assert len(batched) == len(requests_) and all(len(group) == 1 for group in batched)
    for request, [completion] in zip(requests_, batched):
        [[alone]] = engine.generate([request], params)
        assert completion.token_ids == alone.token_ids
        assert completion.text == alone.text
    assert len({tuple(group[0].token_ids) for group in batched}) > 1  # the rows really differ


def test_sampling_n_completions_reproducible_per_seed(engine, requests_):
    params = SamplingParams(max_new_tokens=6, temperature=1.0, n=3, seed=7)
    first = engine.generate(requests_[:3], params)
    assert [len(group) for group in first] == [3, 3, 3]
    assert engine.generate(requests_[:3], params) == first
    other = engine.generate(requests_[:3], params.model_copy(update={"seed": 8}))
    assert other != first
    assert len({tuple(c.token_ids) for c in first[0]}) > 1  # n samples, not n copies
    # Request i's samples come from seed 7 + 3i, as in vLLM: request 2 alone with seed 13 draws request 2's samples.
    assert engine.generate(requests_[2:3], params.model_copy(update={"seed": 13})) == first[2:]


def test_greedy_n_gives_n_equal_completions(engine, requests_):
    [group] = engine.generate(requests_[:1], SamplingParams(max_new_tokens=4, n=2))
    assert len(group) == 2 and group[0] == group[1] and group[0] is not group[1]


@pytest.mark.parametrize("temperature", [0.0, 0.7])
def test_logprobs_are_the_sampled_tokens(engine, requests_, temperature):
    params = SamplingParams(max_new_tokens=5, temperature=temperature, seed=3, logprobs=True)
    groups = engine.generate(requests_[:2], params)
    for request, [completion] in zip(requests_, groups):
        assert len(completion.logprobs) == len(completion.token_ids) > 0
        assert all(value <= 0 for value in completion.logprobs)
        expected = recomputed_logprobs(engine, request, completion.token_ids, temperature or 1.0)
        assert completion.logprobs == pytest.approx(expected, abs=1e-4)
    assert all(c.logprobs is None for group in engine.generate(requests_[:2], SamplingParams(max_new_tokens=2))
               for c in group)


def test_max_new_tokens_gives_finish_reason_length(engine, requests_):
    groups = engine.generate(requests_, SamplingParams(max_new_tokens=3))
    for [completion] in groups:
        assert completion.finish_reason == "length" and len(completion.token_ids) == 3


def test_load_state_dict_updates_weights_and_stops_at_end_of_turn(tiny_model_dir, requests_):
    engine = HFEngine.from_spec(EngineSpec(engine="hf", model=str(tiny_model_dir)))
    params = SamplingParams(max_new_tokens=4, logprobs=True)
    before = engine.generate(requests_[:2], params)
    # Every hidden state gets a large positive feature d that only <|im_end|>'s output row reads: the model
    # now ends its turn at once.
    end_of_turn = engine.processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
    state = engine.model.state_dict()
    embed_key = next(k for k in state if k.endswith("embed_tokens.weight"))
    embed, head = state[embed_key].clone(), torch.zeros_like(state["lm_head.weight"])
    embed[:, 0] = 100.0
    head[end_of_turn, 0] = 1.0
    engine.load_state_dict({embed_key: embed, "lm_head.weight": head})
    assert engine.model.state_dict()["lm_head.weight"].data_ptr() == state["lm_head.weight"].data_ptr()  # in place
    after = engine.generate(requests_[:2], params)
    assert after != before
    for [completion] in after:
        assert completion.token_ids == [end_of_turn] and completion.text == ""
        assert completion.finish_reason == "stop" and len(completion.logprobs) == 1
    with pytest.raises(KeyError, match="not.a.weight"):
        engine.load_state_dict({"not.a.weight": torch.zeros(1)})


# --- engine selection ---------------------------------------------------------------------------------------------

def test_auto_picks_hf_without_vllm(tiny_model_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # as if vllm were not installed, on any machine
    spec = EngineSpec(model=str(tiny_model_dir))
    assert resolve_engine(spec) == "hf"
    assert isinstance(create_engine(spec), HFEngine)


def test_vllm_without_vllm_is_a_clear_error(tiny_model_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)
    with pytest.raises(ImportError, match="engine 'vllm' needs the vllm package.*use engine 'hf'"):
        create_engine(EngineSpec(engine="vllm", model=str(tiny_model_dir)))


def test_hf_names_a_missing_model_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="no_model"):
        create_engine(EngineSpec(engine="hf", model=str(tmp_path / "no_model")))


# --- openai engine against a real HTTP server ---------------------------------------------------------------------

class ChatServer:
    """A deterministic OpenAI-style /v1/chat/completions server, on a free local port, in a thread."""

    def __init__(self):
        self.bodies: list[dict] = []
        self.in_flight = 0
        self.max_in_flight = 0
        app = FastAPI()
        app.post("/v1/chat/completions")(self.chat)
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.base_url = f"http://127.0.0.1:{self.sock.getsockname()[1]}/v1"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self):
        self.thread.start()
        while not self.server.started:
            time.sleep(0.01)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join()

    async def chat(self, request: Request):
        if request.headers.get("authorization") != "Bearer test-key":
            return JSONResponse({"error": {"message": "bad key"}}, status_code=401)
        body = await request.json()
        self.bodies.append(body)
        parts = body["messages"][-1]["content"]
        [image_part] = [p for p in parts if p["type"] == "image_url"]
        header, data = image_part["image_url"]["url"].split(",", 1)
        if header != "data:image/png;base64":
            return JSONResponse({"error": {"message": f"not a base64 PNG data URL: {header}"}}, status_code=400)
        image = Image.open(io.BytesIO(base64.b64decode(data)))
        text = next(p["text"] for p in parts if p["type"] == "text")
        if "fail" in text:
            return JSONResponse({"error": {"message": "boom"}}, status_code=500, headers={"retry-after-ms": "1"})
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        await asyncio.sleep(0.2)
        self.in_flight -= 1
        choices = []
        for i in range(body["n"]):
            answer = (f"<think>{image.width}x{image.height} {image.getpixel((0, 0))} seed={body.get('seed')}</think>"
                      f"<answer>{i}</answer>")
            logprobs = {"content": [{"token": "a", "logprob": -0.5, "bytes": [97], "top_logprobs": []}] * 3}
            choices.append({"index": i, "message": {"role": "assistant", "content": answer},
                            "finish_reason": "length" if body["max_tokens"] < 5 else "stop",
                            "logprobs": logprobs if body.get("logprobs") else None})
        return {"id": "chat-1", "object": "chat.completion", "created": 0, "model": body["model"], "choices": choices}


def openai_spec(base_url: str, **overrides) -> EngineSpec:
    return EngineSpec(engine="openai", model="served-model", base_url=base_url, api_key_env="TEST_FER_API_KEY",
                      max_concurrency=2, timeout_s=10, **overrides)


def test_openai_engine_over_http(monkeypatch):
    monkeypatch.setenv("TEST_FER_API_KEY", "test-key")
    images = [random_image((32 + 8 * i, 24), seed=i) for i in range(5)]
    requests = [ChatRequest.single_image(image, f"question {i}") for i, image in enumerate(images)]
    with ChatServer() as server:
        engine = create_engine(openai_spec(server.base_url))
        params = SamplingParams(max_new_tokens=16, temperature=0.5, n=2, seed=5, logprobs=True)
        groups = engine.generate(requests, params)
        engine.close()
    assert server.max_in_flight == 2  # concurrent, and bounded by max_concurrency
    assert len(groups) == 5
    for image, group in zip(images, groups):
        assert [c.text for c in group] == [
            f"<think>{image.width}x{image.height} {image.getpixel((0, 0))} seed=5</think><answer>{i}</answer>"
            for i in range(2)
        ]
        assert all(c.logprobs == [-0.5] * 3 and c.finish_reason == "stop" and c.token_ids == [] for c in group)
    body = server.bodies[0]
    assert body["model"] == "served-model" and body["max_tokens"] == 16 and body["temperature"] == 0.5
    assert body["top_p"] == 1.0 and body["logprobs"] is True


def test_openai_engine_omits_unset_seed_and_reports_length(monkeypatch):
    monkeypatch.setenv("TEST_FER_API_KEY", "test-key")
    with ChatServer() as server:
        [[completion]] = OpenAIEngine(openai_spec(server.base_url)).generate(
            [ChatRequest.single_image(random_image((20, 20), 0), "q")], SamplingParams(max_new_tokens=4))
    assert "seed" not in server.bodies[0]
    assert completion.finish_reason == "length" and completion.logprobs is None


def test_openai_server_error_names_the_request(monkeypatch):
    monkeypatch.setenv("TEST_FER_API_KEY", "test-key")
    requests = [ChatRequest.single_image(random_image((20, 20), i), text)
                for i, text in enumerate(["ok", "please fail"])]
    with ChatServer() as server:
        with pytest.raises(RequestFailed, match="request 1 failed: InternalServerError") as caught:
            engine = OpenAIEngine(openai_spec(server.base_url), max_retries=2)
            engine.generate(requests, SamplingParams(max_new_tokens=4))
    assert caught.value.index == 1
    assert sum("fail" in str(body["messages"]) for body in server.bodies) == 3  # one try and two retries


def test_openai_connection_refused_names_the_request(monkeypatch):
    monkeypatch.setenv("TEST_FER_API_KEY", "test-key")
    with socket.socket() as sock:  # a port that nothing listens on once closed
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    engine = OpenAIEngine(openai_spec(f"http://127.0.0.1:{port}/v1"), max_retries=0)
    with pytest.raises(RequestFailed, match="request 0 failed: APIConnectionError"):
        engine.generate([ChatRequest.single_image(random_image((20, 20), 0), "q")], SamplingParams())


def test_openai_missing_key_names_the_variable(monkeypatch):
    monkeypatch.delenv("TEST_FER_API_KEY", raising=False)
    with pytest.raises(RuntimeError, match=r"\$TEST_FER_API_KEY"):
        create_engine(openai_spec("http://127.0.0.1:1/v1"))


def test_the_vllm_request_stage_hands_the_engine_its_processors_own_pixels(tiny_model_dir):
    """Images leave the request stage at the model's grid: the processor inside vLLM then computes the same pixel
    values from them as from the decoded image (nothing left for it to resize), and each carries a content id."""
    from transformers import AutoProcessor

    from unifer_ray.engines.batch import vllm_requests

    images = np.stack([np.asarray(random_image((224, 224), seed)) for seed in (0, 1, 0)])
    batch = {"id": np.array(["a", "b", "c", "d"], dtype=object),
             "prompt": np.array(["Which?", "Which?", "Which?", "Why?"], dtype=object),
             "image": np.concatenate([images, np.zeros((1, 224, 224, 3), dtype=np.uint8)]),
             "error": np.array(["", "", "", "image: not a decodable image"], dtype=object)}
    requests = vllm_requests(batch, model=str(tiny_model_dir), sampling={"max_new_tokens": 8})

    processor = AutoProcessor.from_pretrained(tiny_model_dir, local_files_only=True).image_processor
    for i in range(3):
        [image] = requests["multimodal_data"][i]["image"]
        assert image.shape == (112, 112, 3) and image.dtype == np.uint8  # the tiny model's budget: 112² pixels
        ours, own = processor(images=[image], return_tensors="pt"), processor(images=[images[i]], return_tensors="pt")
        assert torch.equal(ours["pixel_values"], own["pixel_values"])
        assert torch.equal(ours["image_grid_thw"], own["image_grid_thw"])
    uuids = [requests["multimodal_uuids"][i]["image"][0] for i in range(3)]
    assert uuids[0] == uuids[2] != uuids[1]  # the same pixels, the same id
    tokenizer = AutoProcessor.from_pretrained(tiny_model_dir, local_files_only=True).tokenizer
    image_pad = tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert image_pad in requests["tokenized_prompt"][0] and image_pad not in requests["tokenized_prompt"][3]
    assert tokenizer.decode(requests["tokenized_prompt"][3]).endswith("Why?<|im_end|>\n<|im_start|>assistant\n")
    assert requests["multimodal_data"][3] is None and requests["sampling_params"][3]["max_tokens"] == 1
    assert [p["max_tokens"] for p in requests["sampling_params"][:3]] == [8, 8, 8]


@needs_vllm
def test_for_an_engine_in_one_process_the_request_stage_renders_what_the_engine_would(tiny_model_dir):
    """With the engine's renderer, each request leaves the request stage rendered: the tokens (the image's
    placeholders expanded) and patches that vLLM makes from the chat text and the decoded image, keyed by the content
    id of the pixels; a row that failed before has no request, and one longer than the context fails here."""
    from transformers import AutoProcessor

    from unifer_ray.engines.batch import (
        EngineWorkers,
        at_model_grid,
        engine_renderer,
        image_uuid,
        vllm_engine_kwargs,
        vllm_requests,
    )
    from unifer_ray.engines.hf import chat_text

    images = np.stack([np.asarray(random_image((224, 224), seed)) for seed in (0, 1, 2, 3)])
    batch = {"id": np.array(["a", "b", "c", "d"], dtype=object),
             "prompt": np.array(["Which?", "Which?", "Why?", "why " * 1200], dtype=object), "image": images,
             "error": np.array(["", "", "image: not a decodable image", ""], dtype=object)}
    kwargs = vllm_engine_kwargs(EngineSpec(engine="vllm", model=str(tiny_model_dir),
                                           vllm_kwargs={"max_model_len": 1024}), EngineWorkers())
    renderer = engine_renderer(str(tiny_model_dir), kwargs)
    requests = vllm_requests(batch, model=str(tiny_model_dir), sampling={"max_new_tokens": 8}, renderer=renderer)
    assert "multimodal_data" not in requests and "tokenized_prompt" not in requests

    processor = AutoProcessor.from_pretrained(tiny_model_dir, local_files_only=True)
    for i in (0, 1):
        ours = requests["engine_input"][i]
        text = chat_text(processor, ChatRequest.single_image(Image.fromarray(images[i]), "Which?"))
        [own] = renderer.render_cmpl([{"prompt": text, "multi_modal_data": {"image": [images[i]]}}],
                                     skip_mm_cache=True)
        assert ours["prompt_token_ids"] == own["prompt_token_ids"]
        [ours_image], [own_image] = ours["mm_kwargs"]["image"], own["mm_kwargs"]["image"]
        for field in ("pixel_values", "image_grid_thw"):
            assert torch.equal(ours_image[field].data, own_image[field].data)
        assert ours["mm_hashes"]["image"] == [image_uuid(at_model_grid(images[i], processor.image_processor))]
    assert requests["engine_input"][2] is None and requests["error"][2] == "image: not a decodable image"
    assert requests["engine_input"][3] is None and "maximum context length is 1024" in requests["error"][3]
    assert [p["max_tokens"] for p in requests["sampling_params"]] == [8, 8, 1, 1]


def test_a_rendered_request_pickles_its_tensors_as_arrays_that_plain_pickle_reads_back():
    """The request stage's pickling writes a CPU tensor as its numpy array (only a view's own elements), rebuilt as a
    tensor of the same dtype and values by plain pickle.loads; a tensor numpy cannot hold keeps torch's pickling."""
    import pickle

    from unifer_ray.engines.batch import pickled_request

    patches = torch.randint(0, 256, (4, 1176), dtype=torch.uint8)
    request = {"prompt_token_ids": [1, 2, 3], "pixel_values": patches[1:2], "grid": torch.tensor([1, 8, 8]),
               "slices": [slice(0, torch.tensor(64))], "embeds": torch.ones(2, 3, dtype=torch.bfloat16)}
    data = pickled_request(request)
    back = pickle.loads(data)
    assert back["prompt_token_ids"] == [1, 2, 3] and back["slices"][0].stop == 64
    for key in ("pixel_values", "grid", "embeds"):
        assert type(back[key]) is torch.Tensor and back[key].dtype == request[key].dtype
        assert torch.equal(back[key], request[key])
    assert len(data) < len(pickle.dumps(request)) - 3 * 1176  # the view alone, not its tensor's four rows
    assert b"_rebuild_tensor" not in pickled_request({"grid": torch.tensor([1, 8, 8])})
    assert b"_rebuild_tensor" in pickled_request({"embeds": request["embeds"]})


def test_long_runs_on_cpu_engines_compile_and_a_written_choice_wins():
    from unifer_ray.engines.batch import COMPILE_FROM_REQUESTS, EngineWorkers, compiled_for_long_runs

    spec, cpus = EngineSpec(engine="vllm", model="m", vllm_kwargs={"max_model_len": 1024}), EngineWorkers()
    long_run = compiled_for_long_runs(spec, cpus, COMPILE_FROM_REQUESTS)
    assert long_run.vllm_kwargs == {"max_model_len": 1024, "enforce_eager": False}
    for short in (None, COMPILE_FROM_REQUESTS - 1):
        assert compiled_for_long_runs(spec, cpus, short) == spec
    two = EngineWorkers(concurrency=2)  # each engine sees half the run
    assert compiled_for_long_runs(spec, two, 2 * COMPILE_FROM_REQUESTS - 1) == spec
    assert compiled_for_long_runs(spec, two, 2 * COMPILE_FROM_REQUESTS) == long_run
    eager = spec.model_copy(update={"vllm_kwargs": {"enforce_eager": True}})
    assert compiled_for_long_runs(eager, cpus, 10**6) == eager
    assert compiled_for_long_runs(spec, EngineWorkers(num_gpus=1), 10**6) == spec  # vLLM's own choice on GPUs
    hf = spec.model_copy(update={"engine": "hf"})
    assert compiled_for_long_runs(hf, cpus, 10**6) == hf

"""A GenerationEngine as a Ray Data actor: the inference stage of FERBench and of curation teachers."""

from __future__ import annotations

import time

import numpy as np
from PIL import Image

from unifer_ray.engines.base import ChatRequest, SamplingParams
from unifer_ray.engines.spec import EngineSpec


class EngineActor:
    """Callable class for `Dataset.map_batches`: `image` (uint8 HxWx3) + `prompt` → `responses` (n per row).

    Rows that arrive with an `error` pass through untouched. A batch whose generation fails is not lost: its rows
    get the error, and a rerun retries them.
    """

    def __init__(self, engine: dict, sampling: dict, torch_threads: int = 1):
        import torch

        from unifer_ray.engines import create_engine

        torch.set_num_threads(torch_threads)  # fractional-CPU actors share cores: never oversubscribe them
        self.engine = create_engine(EngineSpec.model_validate(engine))
        self.params = SamplingParams.model_validate(sampling)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(batch["prompt"])
        errors = np.array(batch["error"], dtype=object)
        responses = np.empty(n, dtype=object)
        responses[:] = [[] for _ in range(n)]
        num_tokens = np.zeros(n, dtype=np.int64)
        latency = np.zeros(n, dtype=np.float64)
        todo = [i for i in range(n) if not errors[i]]
        if todo:
            requests = [ChatRequest.single_image(Image.fromarray(batch["image"][i]), str(batch["prompt"][i]))
                        for i in todo]
            start = time.perf_counter()
            try:
                outputs = self.engine.generate(requests, self.params)
            except Exception as exc:  # noqa: BLE001 - any engine failure is recorded per row, never raised
                for i in todo:
                    errors[i] = f"generation: {type(exc).__name__}: {exc}"
                outputs = []
            elapsed = time.perf_counter() - start
            for i, completions in zip(todo, outputs):
                responses[i] = [c.text for c in completions]
                num_tokens[i] = sum(len(c.token_ids) for c in completions)
                latency[i] = elapsed / len(todo)  # amortised over the batch: what an item costs at this batch size
        out = {k: v for k, v in batch.items() if k != "image"}  # pixels are not needed downstream
        return {**out, "responses": responses, "num_tokens": num_tokens, "latency_s": latency, "error": errors}

    def __del__(self):
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.close()

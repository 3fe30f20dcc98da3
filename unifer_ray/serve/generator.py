"""The model deployment: one GenerationEngine per replica, fed by dynamic batching.

Requests arrive already validated, with decoded images (the HTTP ingress does that on its own CPUs, so this
replica spends its time generating). `@serve.batch` collects them; an engine call is grouped by sampling
parameters so that one `generate` call serves every request of a group.
"""

# The helpers come before the deployment class: Serve may serialize the class as soon as it is decorated.
import asyncio
from dataclasses import dataclass

from ray import serve

from unifer_ray.engines import ChatRequest, Completion, GenerationEngine, SamplingParams, create_engine
from unifer_ray.serve.config import ServeConfig


class GenerationFailed(RuntimeError):
    """The engine failed on a request; the message says how."""


@dataclass
class Job:
    """One request waiting for the engine."""

    request: ChatRequest
    params: SamplingParams

    @property
    def group(self) -> str | None:
        """Requests of one group share a generate call. Seeded sampling runs alone (None), so that its samples
        depend on its seed only, not on which requests it happened to be batched with."""
        if self.params.seed is not None and self.params.temperature > 0:
            return None
        return self.params.model_dump_json(exclude={"seed"})  # greedy decoding ignores the seed


def generate_groups(engine: GenerationEngine, jobs: list[Job]) -> list[list[Completion] | Exception]:
    """One generate call per group of jobs. A failing group is re-run one job at a time, so that a request that
    breaks the engine fails alone; its result is the exception."""
    groups: dict[str, list[int]] = {}
    for i, job in enumerate(jobs):
        groups.setdefault(job.group or f"alone-{i}", []).append(i)
    results: list[list[Completion] | Exception] = [[] for _ in jobs]
    for members in groups.values():
        try:
            outputs = engine.generate([jobs[i].request for i in members], jobs[members[0]].params)
        except Exception as exc:  # noqa: BLE001 - returned per request, never raised in the replica
            outputs = [generate_groups(engine, [jobs[i]])[0] for i in members] if len(members) > 1 else [exc]
        for i, output in zip(members, outputs):
            results[i] = output
    return results


# How many batches Serve may hand over at once. Serve forms the next batch while the engine runs the current
# one; those batches wait in `Generator.waiting` and are merged into the engine's next call.
ARRIVING_BATCHES = 4


@serve.deployment
class Generator:
    def __init__(self, config: ServeConfig):
        import torch

        torch.set_num_threads(config.torch_threads)  # replicas share cores with other actors
        self.model_name = config.model_name
        self.max_batch_size = config.batching.max_batch_size
        # One engine call is at most one Serve batch: the engine must not split it further.
        spec = config.engine.model_copy(update={"max_batch_size": self.max_batch_size})
        self.engine = create_engine(spec)
        self.engine_lock = asyncio.Lock()
        self.waiting: list[tuple[Job, asyncio.Future]] = []
        self.collect.set_max_batch_size(self.max_batch_size)
        self.collect.set_batch_wait_timeout_s(config.batching.batch_wait_timeout_s)

    async def ready(self) -> str:
        """Answers at once, even while the engine generates: the health probe of the whole path."""
        return self.model_name

    async def generate(self, request: ChatRequest, params: SamplingParams) -> list[Completion]:
        result = await self.collect(Job(request, params))
        if isinstance(result, Exception):
            raise GenerationFailed(f"{type(result).__name__}: {result}")
        return result

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.05, max_concurrent_batches=ARRIVING_BATCHES)
    async def collect(self, jobs: list[Job]) -> list[list[Completion] | Exception]:
        """Serve's batches, merged while the engine is busy.

        An idle engine takes a batch as soon as Serve forms it (full, or after batch_wait_timeout_s). Batches that
        Serve forms while the engine is busy would each run on their own, however small; instead they join
        `waiting`, and every engine call takes the oldest max_batch_size jobs there, so that the call after a busy
        one is as full as the waiting requests allow. One engine call at a time; each caller leaves as soon as its
        own jobs are done.
        """
        loop = asyncio.get_running_loop()
        futures = [loop.create_future() for _ in jobs]
        self.waiting += zip(jobs, futures)
        async with self.engine_lock:
            while not all(future.done() for future in futures):
                chunk = self.waiting[: self.max_batch_size]
                del self.waiting[: len(chunk)]
                # The engine blocks: a thread keeps this replica answering (health probes, arriving requests).
                results = await asyncio.to_thread(generate_groups, self.engine, [job for job, _ in chunk])
                for (_, future), result in zip(chunk, results):
                    future.set_result(result)
        return [future.result() for future in futures]

    def __del__(self):
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.close()

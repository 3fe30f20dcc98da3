"""Weights into vLLM engines (GPU only; vLLM is imported lazily, inside the processes that have it).

- `WeightReceiver` is mixed into every vLLM worker (`worker_extension_cls`) so that the rollout actor can reach
  its methods with `LLM.collective_rpc`: `unifer_load_weights` (a state dict from the object store) and the NCCL
  pair `unifer_init_weight_group` / `unifer_receive_weights`.
- `NCCLSender` is learner rank 0's end: one NCCL group with every vLLM worker (vLLM's `StatelessProcessGroup` +
  `PyNcclCommunicator`, so that it never touches the learners' own torch.distributed group).
- Buckets: the trainable parameters in order, packed into flat tensors of one dtype and at most `bucket_bytes`;
  one broadcast per bucket, and the receiver hands each bucket's views to the model's `load_weights`, which maps
  Hugging Face names to vLLM's own (fused qkv, gate_up...).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

WEIGHT_RECEIVER = "unifer_ray.rl.vllm_weights.WeightReceiver"


def plan_buckets(params: list[tuple[str, tuple[int, ...], torch.dtype]], bucket_bytes: int,
                 dtype: torch.dtype | None) -> list[dict]:
    """[{"dtype": name, "params": [(name, shape), ...]}] for (name, shape, dtype) triples: consecutive parameters of
    one dtype, each bucket at most `bucket_bytes` (a larger parameter gets a bucket of its own). `dtype` casts
    everything to it (None: each parameter keeps its own)."""
    buckets: list[dict] = []
    size = 0
    for name, shape, param_dtype in params:
        sent = dtype or param_dtype
        kind = str(sent).removeprefix("torch.")
        nbytes = int(torch.Size(shape).numel()) * sent.itemsize
        if not buckets or buckets[-1]["dtype"] != kind or size + nbytes > bucket_bytes:
            buckets.append({"dtype": kind, "params": []})
            size = 0
        buckets[-1]["params"].append((name, tuple(shape)))
        size += nbytes
    return buckets


def unflatten(flat: torch.Tensor, bucket: dict) -> Iterator[tuple[str, torch.Tensor]]:
    offset = 0
    for name, shape in bucket["params"]:
        numel = int(torch.Size(shape).numel())
        yield name, flat[offset : offset + numel].view(shape)
        offset += numel


def nccl_communicator(master_addr: str, master_port: int, rank: int, world_size: int, device: torch.device):
    from vllm.distributed.device_communicators.pynccl import PyNcclCommunicator
    from vllm.distributed.utils import StatelessProcessGroup

    group = StatelessProcessGroup.create(host=master_addr, port=master_port, rank=rank, world_size=world_size)
    return PyNcclCommunicator(group, device=device)


class NCCLSender:
    """Learner rank 0's side: broadcasts flat buckets to every vLLM worker."""

    def __init__(self, master_addr: str, master_port: int, world_size: int, device: torch.device):
        self.device = device
        self.communicator = nccl_communicator(master_addr, master_port, 0, world_size, device)

    def send(self, named: dict[str, torch.Tensor], bucket: dict) -> None:
        dtype = getattr(torch, bucket["dtype"])
        flat = torch.cat([named[name].detach().reshape(-1).to(self.device, dtype) for name, _ in bucket["params"]])
        self.communicator.broadcast(flat, src=0, stream=torch.cuda.current_stream())
        torch.cuda.current_stream().synchronize()


class WeightReceiver:
    """Mixed into vLLM's worker class: `self.model_runner.model` and `self.device` are the worker's."""

    def unifer_load_weights(self, state: dict[str, torch.Tensor]) -> None:
        self.model_runner.model.load_weights(weights=[(name, t.to(self.device)) for name, t in state.items()])

    def unifer_init_weight_group(self, master_addr: str, master_port: int, rank_offset: int, world_size: int) -> None:
        from vllm.distributed.parallel_state import get_world_group

        rank = get_world_group().rank + rank_offset  # this worker's rank inside its engine, after learner rank 0
        self.unifer_weight_group = nccl_communicator(master_addr, master_port, rank, world_size, self.device)

    def unifer_receive_weights(self, buckets: list[dict]) -> None:
        for bucket in buckets:
            numel = sum(int(torch.Size(shape).numel()) for _, shape in bucket["params"])
            flat = torch.empty(numel, dtype=getattr(torch, bucket["dtype"]), device=self.device)
            self.unifer_weight_group.broadcast(flat, src=0, stream=torch.cuda.current_stream())
            self.model_runner.model.load_weights(weights=list(unflatten(flat, bucket)))
        torch.cuda.synchronize()

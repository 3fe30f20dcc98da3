"""Log-probabilities of the sampled tokens without a full-vocabulary fp32 log-softmax.

`torch.log_softmax(logits.float(), -1).gather(...)` keeps, for a 7B Qwen2.5-VL micro-batch of 2 × 1,024 completion
tokens and its 152,064-token vocabulary, three fp32 (B, T, V) tensors alive (the upcast, the log-softmax and its
gradient): 3 × 1.25 GB, next to the bf16 logits the model returned. Here rows are handled `chunk` at a time: each
chunk is upcast alone, only its log-sum-exp is kept for the backward pass, and the backward recomputes the chunk's
softmax. Peak extra memory is one fp32 chunk (256 × 152,064 × 4 B = 156 MB), whatever the batch.

The result equals the full computation (tests/test_rl_logprobs.py): values and gradients.
"""

from __future__ import annotations

import torch

DEFAULT_CHUNK = 256  # rows (tokens) per fp32 chunk


class _SelectedLogProb(torch.autograd.Function):
    """log softmax(x / T)[target] for one chunk of rows; saves the input and the log-sum-exp, not the softmax."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor, temperature: float) -> torch.Tensor:
        scaled = logits.float() / temperature
        lse = torch.logsumexp(scaled, dim=-1)
        selected = scaled.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - lse
        ctx.save_for_backward(logits, targets, lse)
        ctx.temperature = temperature
        return selected

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        logits, targets, lse = ctx.saved_tensors
        probs = torch.exp(logits.float() / ctx.temperature - lse.unsqueeze(-1))
        # d/dx [x_t/T - lse(x/T)] = (onehot_t - softmax(x/T)) / T
        grad_logits = probs.mul_(-grad.unsqueeze(-1))
        grad_logits.scatter_add_(-1, targets.unsqueeze(-1), grad.unsqueeze(-1))
        return grad_logits.div_(ctx.temperature).to(logits.dtype), None, None


def _entropy(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    scaled = logits.float() / temperature
    logp = torch.log_softmax(scaled, dim=-1)
    return -(logp.exp() * logp).sum(-1)


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0, *,
                   with_entropy: bool = False, chunk: int = DEFAULT_CHUNK) -> tuple[torch.Tensor, torch.Tensor | None]:
    """fp32 log-probabilities (...,) of `targets` under softmax(logits / temperature), logits (..., V) in any dtype
    (the model's bf16 on GPUs); and the per-token entropy (no gradient) when asked. Differentiable in `logits`."""
    shape = targets.shape
    flat_logits = logits.reshape(-1, logits.shape[-1])
    flat_targets = targets.reshape(-1)
    pieces = [_SelectedLogProb.apply(flat_logits[i : i + chunk], flat_targets[i : i + chunk], temperature)
              for i in range(0, flat_targets.numel(), chunk)]
    logprobs = torch.cat(pieces).reshape(shape) if pieces else flat_logits.new_zeros(shape, dtype=torch.float32)
    entropy = None
    if with_entropy:
        with torch.no_grad():
            parts = [_entropy(flat_logits[i : i + chunk], temperature) for i in range(0, flat_targets.numel(), chunk)]
            entropy = torch.cat(parts).reshape(shape) if parts else logprobs.detach().clone()
    return logprobs, entropy

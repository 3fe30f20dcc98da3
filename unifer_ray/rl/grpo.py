"""The GRPO objective: group-normalised advantages, the clipped ratio, the k3 KL estimator, loss aggregation, and
the truncated importance-sampling correction for samples drawn by the rollout engine rather than by π_old.

Aggregations (what one optimizer step minimises; `L_i` = completion i's tokens, `B` = completions in the batch):
- `grpo`: the mean over completions of each completion's token mean, Σ_i Σ_t ℓ_it / (B · L_i);
- `dr_grpo`: a constant normaliser, Σ_i Σ_t ℓ_it / (B · max_new_tokens), so long answers are not down-weighted;
- `dapo`: the token mean over the whole batch, Σ_i Σ_t ℓ_it / Σ_i L_i.
Each is a per-completion weight on its token-loss sum (`sequence_weights`), computed once for the global batch, so
the loss is the same however the batch is sharded over learners and micro-batches (tests/test_rl_equivalence.py).
Advantage estimators and aggregations are registries by name (ADVANTAGES, AGGREGATIONS): the names the config
accepts.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from unifer_ray.registry import lookup


def _std_scaled(rewards: np.ndarray, eps: float) -> np.ndarray:
    """GRPO: (r - mean) / (std + eps), the sample std (n - 1)."""
    centred = rewards - rewards.mean(axis=1, keepdims=True)
    return centred / (rewards.std(axis=1, ddof=1, keepdims=True) + eps)


def _mean_centred(rewards: np.ndarray, eps: float) -> np.ndarray:
    """Dr. GRPO: r - mean. Dividing by the std up-weights groups whose rewards barely differ."""
    return rewards - rewards.mean(axis=1, keepdims=True)


ADVANTAGES = {"grpo": _std_scaled, "dr_grpo": _mean_centred}


def group_advantages(rewards: np.ndarray, estimator: str, *, eps: float) -> tuple[np.ndarray, np.ndarray]:
    """Advantages of rewards shaped (groups, G) by the ADVANTAGES `estimator`. Also returns which groups' rewards
    are all equal: their advantages are zero, so they teach nothing but the KL term."""
    rewards = np.asarray(rewards, dtype=np.float64)
    if rewards.ndim != 2 or rewards.shape[1] < 2:
        raise ValueError(f"rewards must be shaped (groups, G >= 2), got {rewards.shape}")
    all_equal = (rewards == rewards[:, :1]).all(axis=1)
    return lookup(ADVANTAGES, estimator, "advantage estimator")(rewards, eps), all_equal


def _grpo_weights(lengths: np.ndarray, max_new_tokens: int) -> np.ndarray:
    return 1.0 / (len(lengths) * np.maximum(lengths, 1.0))  # an empty completion has no token to weigh


def _dr_grpo_weights(lengths: np.ndarray, max_new_tokens: int) -> np.ndarray:
    return np.full(len(lengths), 1.0 / (len(lengths) * max_new_tokens))


def _dapo_weights(lengths: np.ndarray, max_new_tokens: int) -> np.ndarray:
    return np.full(len(lengths), 1.0 / max(lengths.sum(), 1.0))


AGGREGATIONS = {"grpo": _grpo_weights, "dr_grpo": _dr_grpo_weights, "dapo": _dapo_weights}


def sequence_weights(lengths: np.ndarray, aggregation: str, max_new_tokens: int) -> np.ndarray:
    """The weight of each completion's token-loss sum in the batch loss (see the module docstring)."""
    weigh = lookup(AGGREGATIONS, aggregation, "loss aggregation")
    return weigh(np.asarray(lengths, dtype=np.float64), max_new_tokens)


def truncated_is_weights(old_logprobs: torch.Tensor, rollout_logprobs: torch.Tensor, cap: float) -> torch.Tensor:
    """Per-token weights min(π_old / π_rollout, cap), without gradient (truncated importance sampling, as in TRL's
    vLLM correction and verl's TIS): the rollout engine's own log-probabilities of the tokens it sampled correct
    for its numerics and for its policy lag, and the cap bounds the variance."""
    return torch.exp(old_logprobs.detach() - rollout_logprobs).clamp(max=cap)


def rollout_mismatch(old_logprobs: torch.Tensor, rollout_logprobs: torch.Tensor, mask: torch.Tensor,
                     cap: float | None) -> dict[str, float]:
    """Sums over the masked tokens: |log π_old - log π_rollout| (`gap`), the k3 estimate of KL(rollout || old)
    (`mismatch_k3`: r - 1 - log r with r = π_old / π_rollout, ≥ 0, of mean zero when the two agree), and the tokens
    whose ratio the cap truncated (`is_clipped`)."""
    log_ratio = (old_logprobs - rollout_logprobs).detach()
    ratio = torch.exp(log_ratio)
    clipped = ratio > cap if cap is not None else torch.zeros_like(mask, dtype=torch.bool)
    return {"gap": float((log_ratio.abs() * mask).sum()), "mismatch_k3": float(((ratio - 1 - log_ratio) * mask).sum()),
            "is_clipped": float((clipped.float() * mask).sum())}


@dataclass
class TokenLoss:
    loss: torch.Tensor  # (B, T) per-token loss: clipped policy-gradient term + beta · KL
    kl: torch.Tensor  # (B, T) k3 estimate of KL(policy || reference); zeros when beta = 0
    clipped: torch.Tensor  # (B, T) bool: the clipped term was the smaller one (its gradient is zero)
    ratio: torch.Tensor  # (B, T) π / π_old


def token_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, ref_logprobs: torch.Tensor | None,
               advantages: torch.Tensor, *, clip_low: float, clip_high: float, beta: float,
               is_weights: torch.Tensor | None = None) -> TokenLoss:
    """Per-token GRPO loss. `advantages` is (B,) or (B, 1); the log-probabilities and `is_weights` are (B, T).

    ℓ = -w min(ρ A, clip(ρ, 1 - clip_low, 1 + clip_high) A) + β (exp(q - p) - (q - p) - 1),
    with ρ = exp(p - p_old),
    p the policy's and q the reference's log-probability of the sampled token (the k3 estimator, ≥ 0), and w the
    importance weight of the sample (`truncated_is_weights`; 1 without).
    """
    advantages = advantages.reshape(-1, 1).to(logprobs.dtype)
    ratio = torch.exp(logprobs - old_logprobs)
    unclipped = ratio * advantages
    clipped = torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high) * advantages
    loss = -torch.minimum(unclipped, clipped)
    if is_weights is not None:
        loss = loss * is_weights
    if beta > 0:
        if ref_logprobs is None:
            raise ValueError("beta > 0 needs the reference model's log-probabilities")
        delta = ref_logprobs - logprobs
        kl = torch.exp(delta) - delta - 1.0
        loss = loss + beta * kl
    else:
        kl = torch.zeros_like(logprobs)
    return TokenLoss(loss=loss, kl=kl, clipped=clipped < unclipped, ratio=ratio)


def aggregate(loss: torch.Tensor, mask: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Σ_i weights_i Σ_t mask_it loss_it: the batch loss, or this micro-batch's share of it."""
    return (loss * mask * weights.reshape(-1, 1).to(loss.dtype)).sum()

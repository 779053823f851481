"""PPO and critic-free RL as pure functions: KL penalties, per-token rewards, advantages (GAE,
GRPO, RLOO), the clipped policy and value losses, and the adaptive KL coefficient.

Every tensor is response-aligned: position t of row b is the t-th generated token of sequence b,
`mask` (B, T) is 1 on real response tokens and 0 on padding after them. Each function takes
tensors and hyperparameters and returns tensors (and a dict of detached metrics); none keeps
state except `KLController`, which is a tiny object with a state_dict for resume.

References (equations quoted beside the lines that implement them):
- InstructGPT (Ouyang et al. 2022) and Ziegler et al. 2019: the reward model's score at the
  last token minus beta * KL to the SFT reference at every token; the adaptive KL controller.
- "The N+ Implementation Details of RLHF with PPO" (Huang et al. 2024): masked whitening,
  GAE with gamma=1, value clipping, approx-KL 0.5 * mean(log-ratio^2), the EOS trick.
- "Secrets of RLHF Part I: PPO" (Zheng et al. 2023): token-level KL penalty, advantage
  whitening, critic initialised from the reward model.
- GRPO (Shao et al. 2024, DeepSeekMath): group-normalised advantages, k3 KL in the loss.
- RLOO (Ahmadian et al. 2024, "Back to Basics"): the leave-one-out baseline.
- Schulman, "Approximating KL divergence" (2020): the k1 / k2 / k3 estimators.
"""

from __future__ import annotations

import math

import torch


# ---- masked statistics ----------------------------------------------------------------------

def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """sum(x * mask) over `dim` (all positions if None). x, mask (B, T)."""
    return (x * mask).sum() if dim is None else (x * mask).sum(dim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """sum(x * mask) / sum(mask), over `dim` (all positions if None); 0 where the mask is empty.
    x, mask (B, T)."""
    mask = mask.to(x.dtype)
    return masked_sum(x, mask, dim) / mask.sum(dim).clamp(min=1)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of the masked entries of x (Bessel-corrected when `unbiased` and n > 1)."""
    mask = mask.to(x.dtype)
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    n = mask.sum()
    if unbiased and n > 1:
        var = var * n / (n - 1)
    return var


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True,
                  eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / sqrt(var + eps) over the masked entries (N+ details #9, TRL's `masked_whiten`);
    with shift_mean=False the mean is added back (scale only: rewards keep their sign). The
    variance is unbiased, as in those references. Masked-out entries come back as 0."""
    mask = mask.to(x.dtype)
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    whitened = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * mask


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> float:
    """1 - Var(returns - values) / Var(returns) over masked tokens: 1 is a perfect critic, 0 one
    that predicts the mean, negative one worse than that (nan if the returns do not vary)."""
    var_returns = masked_var(returns, mask).item()
    if var_returns == 0:
        return float("nan")
    return 1.0 - masked_var(returns - values, mask).item() / var_returns


# ---- KL between the policy and the reference ------------------------------------------------

def kl_k1(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """k1 = log pi(y) - log pi_ref(y): unbiased for KL(pi || pi_ref) under y ~ pi, can be < 0."""
    return logprobs - ref_logprobs


def kl_k2(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """k2 = 0.5 * (log pi - log pi_ref)^2: biased, >= 0, low variance."""
    return 0.5 * (logprobs - ref_logprobs) ** 2


def kl_k3(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """k3 = exp(log pi_ref - log pi) - (log pi_ref - log pi) - 1: unbiased and >= 0 (Schulman
    2020); GRPO's KL term in the loss (DeepSeekMath eq. 4)."""
    log_ratio = ref_logprobs - logprobs
    return torch.exp(log_ratio) - log_ratio - 1


KL_ESTIMATORS = {"k1": kl_k1, "k2": kl_k2, "k3": kl_k3}


def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str = "k1") -> torch.Tensor:
    """Per-token KL estimate (B, T) by name: 'k1', 'k2' or 'k3' (see KL_ESTIMATORS)."""
    if estimator not in KL_ESTIMATORS:
        raise ValueError(f"unknown KL estimator {estimator!r}; choose from {sorted(KL_ESTIMATORS)}")
    return KL_ESTIMATORS[estimator](logprobs, ref_logprobs)


def token_rewards(scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor,
                  kl_coef: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token rewards of InstructGPT / Ziegler et al.:

        r_t = -beta * KL_t                 at every response token t,
        r_T += score                       at the last real token T of each row.

    scores (B,) sequence scores (reward model or scorer, after any penalty / normalisation);
    kl (B, T) per-token KL estimates; mask (B, T). Padding gets reward 0. Returns
    (rewards (B, T), non_score_rewards (B, T) = -beta * KL_t * mask).
    """
    mask = mask.to(kl.dtype)
    non_score = -kl_coef * kl * mask                                               # (B, T)
    last = (mask.sum(1).long() - 1).clamp(min=0)                                   # (B,)
    rewards = non_score.clone()
    rows = torch.arange(kl.shape[0], device=kl.device)
    rewards[rows, last] += scores.to(kl.dtype) * (mask.sum(1) > 0)
    return rewards, non_score


# ---- advantages -----------------------------------------------------------------------------

def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0,
        lam: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016), backwards over each row:

        delta_t = r_t + gamma * V_{t+1} - V_t          (V after the last real token = 0)
        A_t     = delta_t + gamma * lam * A_{t+1}
        returns_t = A_t + V_t                           (the critic's regression target)

    rewards, values, mask (B, T); the mask is a prefix of 1s per row (right padding). With
    lam = 1 the advantage is the discounted reward-to-go minus V_t. Returns (advantages,
    returns), both (B, T), 0 on padding. No gradient flows through.
    """
    mask = mask.to(rewards.dtype)
    rewards, values = rewards.detach() * mask, values.detach() * mask
    T = rewards.shape[1]
    advantages = torch.zeros_like(rewards)
    next_value = torch.zeros_like(rewards[:, 0])                                   # (B,)
    next_adv = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(T)):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        adv = (delta + gamma * lam * next_adv) * mask[:, t]
        advantages[:, t] = adv
        # at padding, carry zeros so the last real token sees V_{T+1} = 0 and A_{T+1} = 0
        next_value, next_adv = values[:, t] * mask[:, t], adv
    return advantages, (advantages + values) * mask


def grpo_advantages(scores: torch.Tensor, group_size: int, scale_std: bool = True,
                    eps: float = 1e-4) -> torch.Tensor:
    """GRPO's outcome advantages (DeepSeekMath eq. 3 with outcome supervision):

        A_i = (s_i - mean(s_group)) / (std(s_group) + eps)

    scores (N,) with N = prompts x group_size, each prompt's samples contiguous. std is the
    unbiased sample std (as TRL's GRPOTrainer); scale_std=False leaves it out (Dr. GRPO,
    Liu et al. 2025). A group whose samples all score the same gets advantage 0. Returns (N,).
    """
    groups = _groups(scores, group_size)                                            # (P, G)
    centred = groups - groups.mean(1, keepdim=True)
    if scale_std:
        centred = centred / (groups.std(1, keepdim=True) + eps)
    return centred.reshape(-1)


def rloo_advantages(scores: torch.Tensor, group_size: int) -> torch.Tensor:
    """REINFORCE leave-one-out (Kool et al. 2019; Ahmadian et al. 2024 eq. 4):

        A_i = s_i - 1/(G-1) * sum_{j != i} s_j  =  G/(G-1) * (s_i - mean(s_group))

    scores (N,) with each prompt's G samples contiguous. Returns (N,)."""
    groups = _groups(scores, group_size)                                            # (P, G)
    G = group_size
    baseline = (groups.sum(1, keepdim=True) - groups) / (G - 1)                     # mean of the others
    return (groups - baseline).reshape(-1)


def _groups(scores: torch.Tensor, group_size: int) -> torch.Tensor:
    if group_size < 2:
        raise ValueError(f"group_size must be >= 2 for a group baseline, got {group_size}")
    if scores.numel() % group_size:
        raise ValueError(f"{scores.numel()} scores do not split into groups of {group_size}")
    return scores.detach().float().view(-1, group_size)                            # (P, G)


ADVANTAGES = {"grpo": grpo_advantages, "rloo": rloo_advantages}


# ---- losses ---------------------------------------------------------------------------------

def policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                mask: torch.Tensor, clip_eps: float = 0.2) -> tuple[torch.Tensor, dict]:
    """PPO's clipped surrogate (Schulman et al. 2017, eq. 7), as a loss to minimise:

        ratio_t = exp(log pi(y_t) - log pi_old(y_t))
        L = mean_t max(-A_t * ratio_t, -A_t * clip(ratio_t, 1 - eps, 1 + eps))

    averaged over the masked tokens of the minibatch. logprobs (B, T) with gradient;
    old_logprobs, advantages, mask (B, T). Metrics (detached floats): clipfrac (share of tokens
    where the clipped term is the one used), approx_kl = 0.5 * mean(log-ratio^2) between the old
    and new policy (N+ details), ratio (mean).
    """
    log_ratio = logprobs - old_logprobs                                            # (B, T)
    ratio = torch.exp(log_ratio)
    pg_losses = -advantages * ratio
    pg_losses_clipped = -advantages * torch.clamp(ratio, 1.0 - clip_eps, 1.0 + clip_eps)
    loss = masked_mean(torch.maximum(pg_losses, pg_losses_clipped), mask)
    with torch.no_grad():
        metrics = {
            "clipfrac": masked_mean((pg_losses_clipped > pg_losses).float(), mask).item(),
            "approx_kl": masked_mean(0.5 * log_ratio.float() ** 2, mask).item(),
            "ratio": masked_mean(ratio.float(), mask).item(),
        }
    return loss, metrics


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor,
               mask: torch.Tensor, clip_range: float = 0.2) -> tuple[torch.Tensor, dict]:
    """The critic's clipped regression (N+ details #12; OpenAI baselines' PPO2):

        V_clip = V_old + clip(V - V_old, -c, c)
        L_V = 0.5 * mean_t max((V - R)^2, (V_clip - R)^2)

    values (B, T) with gradient; old_values, returns, mask (B, T). clip_range 0 turns the
    clipping off. Metrics: vf_clipfrac (share of tokens where the clipped term is larger)."""
    losses = (values - returns) ** 2
    if clip_range > 0:
        clipped = old_values + torch.clamp(values - old_values, -clip_range, clip_range)
        losses_clipped = (clipped - returns) ** 2
        vf_clipfrac = masked_mean((losses_clipped > losses).float(), mask).item()
        losses = torch.maximum(losses, losses_clipped)
    else:
        vf_clipfrac = 0.0
    return 0.5 * masked_mean(losses, mask), {"vf_clipfrac": vf_clipfrac}


# ---- the KL coefficient ---------------------------------------------------------------------

class KLController:
    """The KL coefficient beta: fixed (target None), or adaptive (Ziegler et al. 2019, sec. 2.2):

        e = clip(KL / target - 1, -0.2, 0.2)
        beta <- beta * (1 + e * n / horizon)

    after each batch of n rollouts whose mean sequence KL was `KL` (nats). beta grows while the
    policy drifts past the target and shrinks while it stays inside.
    """

    def __init__(self, kl_coef: float, target: float | None = None, horizon: int = 10000):
        if kl_coef < 0:
            raise ValueError(f"kl_coef must be >= 0, got {kl_coef}")
        if target is not None and (target <= 0 or horizon <= 0):
            raise ValueError("an adaptive KL controller needs target > 0 and horizon > 0")
        self.value, self.target, self.horizon = float(kl_coef), target, horizon

    def update(self, kl: float, n_steps: int) -> float:
        """Adapt beta to the batch's mean sequence KL `kl` over `n_steps` rollouts; return it."""
        if self.target is not None and math.isfinite(kl):
            error = min(max(kl / self.target - 1.0, -0.2), 0.2)
            self.value *= 1.0 + error * n_steps / self.horizon
        return self.value

    def state_dict(self) -> dict:
        return {"value": self.value, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict) -> None:
        self.value = float(state["value"])

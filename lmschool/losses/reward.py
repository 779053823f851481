"""Reward-model loss: Bradley-Terry on the scalar head's score at each answer's last token.

A reward model is the policy's network with the LM head replaced by one scalar per position
(`Transformer(head="score")`). A sequence's reward is the score at its final token, the
`<|im_end|>` that closes the answer (`rewards_at`): causal attention means that position has read
the whole prompt and answer. The Bradley-Terry model (InstructGPT eq. 1) says the rater prefers
y_c over y_r with probability sigma(r(x, y_c) - r(x, y_r)), so the loss is its negative
log-likelihood. Options:

- `margin`: -log sigma(r_c - r_r - m) asks for a gap of at least m (Llama 2's margin; a number,
  or one per pair from the data's "margin" field);
- `centring`: + c * (r_c + r_r)^2 keeps rewards near 0 (Eisenstein et al. 2023, TRL's
  `center_rewards_coefficient`): the Bradley-Terry loss only sees differences, so without it the
  mean reward drifts freely.

The loss functions are pure: rewards in, per-pair losses and detached metrics out.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def rewards_at(scores: torch.Tensor, last_index: torch.Tensor) -> torch.Tensor:
    """The score of each row at its last token. scores (B, T), last_index (B,) -> (B,) float32."""
    return scores.gather(1, last_index[:, None]).squeeze(1).float()


def sequence_rewards(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    """Raw rewards (no bias) of a batch's answers: rows of one answer each (input_ids (B, T),
    last_index (B,), optional position_ids and segment_ids (B, T), e.g. left padding: segment -1
    at the pads) -> (B,); or shared-prompt rows (`collate_shared`: branch_ids, position_ids (G, T),
    answer_last (A,)) -> (A,), each read at its answer's last token."""
    if "branch_ids" in batch:
        scores = model(batch["input_ids"], position_ids=batch["position_ids"],
                       branch_ids=batch["branch_ids"])                            # (G, T)
        return scores.reshape(-1)[batch["answer_last"]].float()                   # (A,)
    scores = model(batch["input_ids"], position_ids=batch.get("position_ids"),
                   segment_ids=batch.get("segment_ids"))                         # (B, T)
    return rewards_at(scores, batch["last_index"])


def bradley_terry_loss(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor,
                       margin: torch.Tensor | float = 0.0, centring: float = 0.0
                       ) -> tuple[torch.Tensor, dict]:
    """Per-pair losses -log sigma(r_c - r_r - margin) + centring * (r_c + r_r)^2, and metrics.

    chosen_rewards, rejected_rewards (B,); margin a number or (B,). Metrics (detached 0-d tensors,
    means over the pairs, no host sync): accuracy (r_c > r_r strictly: a tie counts as wrong), margin (mean r_c - r_r),
    reward_chosen, reward_rejected.
    """
    delta = chosen_rewards - rejected_rewards                                     # (B,)
    losses = -F.logsigmoid(delta - margin)                                        # (B,) InstructGPT eq. 1
    if centring:
        losses = losses + centring * (chosen_rewards + rejected_rewards) ** 2      # Eisenstein et al. 2023
    delta = delta.detach()
    metrics = {"accuracy": (delta > 0).float().mean(), "margin": delta.mean(),
               "reward_chosen": chosen_rewards.detach().mean(),
               "reward_rejected": rejected_rewards.detach().mean()}
    return losses, metrics


def reward_loss(model: torch.nn.Module, batch: dict, *, margin: float = 0.0, centring: float = 0.0
                ) -> tuple[torch.Tensor, dict]:
    """The trainer's loss_fn: a pair batch -> mean Bradley-Terry loss over its B pairs. Either
    rows 0..B-1 chosen and B..2B-1 rejected (lmschool.data.preference.pair_batch), or one row per
    distinct answer with chosen_index / rejected_index (B,) (`collate_unique`). A batch "margin"
    (B,) tensor, if present, is added to the config's margin."""
    rewards = sequence_rewards(model, batch)                                      # (rows,)
    if "chosen_index" in batch:
        chosen, rejected = rewards[batch["chosen_index"]], rewards[batch["rejected_index"]]  # (B,)
    else:
        B = rewards.shape[0] // 2
        chosen, rejected = rewards[:B], rewards[B:]                               # (B,)
    pair_margin = batch["margin"] + margin if "margin" in batch else margin
    losses, metrics = bradley_terry_loss(chosen, rejected, pair_margin, centring)
    return losses.mean(), metrics

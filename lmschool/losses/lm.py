"""Language-modelling loss: next-token cross-entropy over the positions that count.

`labels` are the input ids shifted left by one, with -100 where no loss is taken (prompt
tokens in SFT, padding). Logits are upcast to float32 before the softmax: in bf16 the
log-sum-exp over a large vocabulary loses the precision that small loss differences need.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE = -100


def token_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-token negative log-likelihood. logits (B, T, V), labels (B, T) -> (B, T), 0 at IGNORE."""
    B, T, V = logits.shape
    nll = F.cross_entropy(logits.reshape(B * T, V).float(), labels.reshape(B * T),
                          ignore_index=IGNORE, reduction="none")
    return nll.view(B, T)


def lm_loss(model: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, dict]:
    """Mean next-token loss over target tokens. batch: input_ids (B, T), labels (B, T), and for
    packed rows position_ids and segment_ids (B, T) (the model attends within each segment)."""
    logits = model(batch["input_ids"], position_ids=batch.get("position_ids"),
                   segment_ids=batch.get("segment_ids"))                    # (B, T, V)
    labels = batch["labels"]
    n = (labels != IGNORE).sum().clamp(min=1)
    V = logits.shape[-1]
    loss = F.cross_entropy(logits.reshape(-1, V).float(), labels.reshape(-1), ignore_index=IGNORE,
                           reduction="sum") / n
    return loss, {}


def target_lm_loss(model: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, dict]:
    """`lm_loss` with the LM head run at the target positions only: the same number where most
    positions are not targets (SFT's prompts and padding), in less time. Not for torch.compile
    (the number of targets changes the shapes) nor for pre-training (every position is one)."""
    labels = batch["labels"]
    at = labels != IGNORE                                                   # (B, T)
    logits = model(batch["input_ids"], position_ids=batch.get("position_ids"),
                   segment_ids=batch.get("segment_ids"), at=at)             # (N, V)
    nll = F.cross_entropy(logits.float(), labels[at], reduction="sum")
    return nll / at.sum().clamp(min=1), {}

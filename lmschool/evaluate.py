"""Evaluation measures shared by the stages: held-out loss and bits per byte (more to come:
reward accuracy, teacher scores, win rates, KL).

Bits per byte makes losses comparable across tokenizers: the total information the model needs
for the held-out text, in bits, divided by the text's UTF-8 size. End-of-document tokens are
left out of both sides (they are not text).
"""

from __future__ import annotations

import math

import torch

from lmschool.losses.lm import token_nll


@torch.no_grad()
def lm_loss_and_bpb(model, batches, *, special_ids: set[int], bytes_per_text_token: float | None) -> dict:
    """Mean next-token loss (nats) over all targets, and bits per byte over text targets.

    bytes_per_text_token: UTF-8 bytes of the split divided by its non-special tokens (from the
    data's meta.json); None skips bits per byte.
    """
    device = next(model.parameters()).device
    total_nll, total_n, text_nll, text_n = 0.0, 0, 0.0, 0
    special = torch.tensor(sorted(special_ids), dtype=torch.long, device=device)
    for batch in batches:
        x, y = batch["input_ids"].to(device), batch["labels"].to(device)
        nll = token_nll(model(x), y).float()                                   # (B, T)
        is_text = ~torch.isin(y, special)
        total_nll += nll.sum().item()
        total_n += y.numel()
        text_nll += nll[is_text].sum().item()
        text_n += int(is_text.sum().item())
    out = {"val_loss": total_nll / max(total_n, 1), "val_tokens": total_n}
    if bytes_per_text_token and text_n:
        out["val_bpb"] = text_nll / math.log(2) / (text_n * bytes_per_text_token)
    return out

"""The rollout record: everything a policy-gradient update needs about a batch of sampled answers.

One `Rollout` travels from sampling to the update (OpenRLHF's `Experience`): the sequences and
where each response token sits, filled in as the iteration goes with the reward's scores, the
log-probs under the sampling policy and the reference, the critic's values, and the advantages
and returns computed from them. `rows(idx)` takes a minibatch of it, trimmed to its longest
sequence. Below it, the forward passes that read a model over the record's response positions:
`response_logprobs` (with each position's entropy) and `response_values`, and `in_chunks` to run
them a few rows at a time without gradient. Both read the rows packed (`pack`: several sequences
laid end to end in one row, each attending only to itself, the answers to one prompt sharing it)
where that saves a good share of the padded positions: answers sampled at T = 1 differ widely in
length, and the padding after the short ones is otherwise computed like real tokens (about a
third of a rollout's positions); GRPO's G answers to a prompt would compute the prompt G times.

Shapes: N rows, L longest sequence (prompt + response), R longest response. Position t of a
response-aligned tensor is the t-th generated token of its row; `mask` is 1 on real response
tokens and 0 on the padding after them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lmschool.data.sft import best_fit_decreasing


@dataclass
class Rollout:
    """Sequences (prompt + response), right-padded, and what an update knows about each response."""

    input_ids: torch.Tensor   # (N, L) prompt + response ids, pad after
    positions: torch.Tensor   # (N, R) index in L of the position whose logits predict response token t
    tokens: torch.Tensor      # (N, R) y_t, the response ids, pad after
    mask: torch.Tensor        # (N, R) float, 1 on response tokens
    last_index: torch.Tensor  # (N,) index in L of each row's last token (where a reward model reads)
    # filled in by the iteration, in this order (None until then; for GRPO / RLOO values and
    # returns stay None: no critic)
    scores: torch.Tensor | None = None        # (N,) s, the sequence score after penalties / whitening
    old_logprobs: torch.Tensor | None = None  # (N, R) log pi_old(y_t), the policy that sampled
    entropy: torch.Tensor | None = None       # (N, R) H(pi_old(. | y_<t)), logged
    ref_logprobs: torch.Tensor | None = None  # (N, R) log pi_ref(y_t), the frozen reference
    values: torch.Tensor | None = None        # (N, R) V_old(s_t), the critic's before the update
    advantages: torch.Tensor | None = None    # (N, R) A_t (GAE, or the sequence's group advantage)
    returns: torch.Tensor | None = None       # (N, R) R_t = A_t + V_t, the critic's target (GAE)

    @property
    def size(self) -> int:
        return self.input_ids.shape[0]

    @staticmethod
    def build(sequences: list[list[int]], prompt_lens: list[int], pad_id: int, device) -> Rollout:
        """The record of sampled sequences (each a prompt of prompt_lens[i] ids + its response)."""
        N, L = len(sequences), max(len(s) for s in sequences)
        R = max(1, max(len(s) - p for s, p in zip(sequences, prompt_lens)))
        input_ids = torch.full((N, L), pad_id, dtype=torch.long)
        tokens = torch.full((N, R), pad_id, dtype=torch.long)
        mask = torch.zeros(N, R)
        for i, (s, p) in enumerate(zip(sequences, prompt_lens)):
            input_ids[i, :len(s)] = torch.as_tensor(s)
            tokens[i, :len(s) - p] = torch.as_tensor(s[p:], dtype=torch.long)
            mask[i, :len(s) - p] = 1
        starts = torch.as_tensor(prompt_lens)[:, None] - 1                                # (N, 1)
        positions = (starts + torch.arange(R)[None]).clamp(max=L - 1)                     # (N, R)
        last_index = torch.as_tensor([len(s) - 1 for s in sequences])                     # (N,)
        return Rollout(input_ids.to(device), positions.to(device), tokens.to(device), mask.to(device),
                       last_index.to(device))

    def rows(self, idx: torch.Tensor) -> Rollout:
        """A subset of rows (a minibatch), trimmed to their longest sequence and response."""
        mask = self.mask[idx]
        R = max(1, int(mask.sum(1).max()))
        L = int(self.last_index[idx].max()) + 1

        def cut(x):   # (N, R) -> (n, R'), (N,) -> (n,)
            return None if x is None else x[idx] if x.dim() == 1 else x[idx, :R]

        return Rollout(self.input_ids[idx, :L], self.positions[idx, :R].clamp(max=L - 1),
                       self.tokens[idx, :R], mask[:, :R], self.last_index[idx], cut(self.scores),
                       cut(self.old_logprobs), cut(self.entropy), cut(self.ref_logprobs), cut(self.values),
                       cut(self.advantages), cut(self.returns))


# ---- packing: fewer padded positions --------------------------------------------------------------

PACK_WIDTH = 128       # packed rows are this wide, or as wide as the longest sequence if that is wider
PACK_SAVING = 0.15     # pack only where it removes at least this share of the positions to compute


@dataclass
class Packed:
    """A rollout's sequences laid end to end in P rows of width W (best fit, longest first), the
    sequences that answer one prompt sharing it: the prompt (but its last token) once, then each
    answer after that last token as a branch that attends to the prompt and to itself only
    (`model.tree_mask`). A sequence's positions count as in its own row and it attends only to
    itself and its prompt, so every position gets the numbers it gets unpacked, up to rounding."""

    input_ids: torch.Tensor     # (P, W)
    position_ids: torch.Tensor  # (P, W) 0, 1, ... within each sequence
    segment_ids: torch.Tensor   # (P, W) the row in the rollout of the prompt's first sequence; -1 on the filler
    branch_ids: torch.Tensor    # (P, W) 0 on a shared prompt, k on its k-th answer, -1 on the filler
    positions: torch.Tensor     # (N, R) where the rollout's `positions` lie in the flattened (P * W)


def pack(batch: Rollout, width: int = PACK_WIDTH, min_saving: float = PACK_SAVING,
         shared_prompts: bool = True) -> Packed | None:
    """The rows of `batch` packed into rows of max(width, longest unit) positions, or None where
    that would compute fewer than `min_saving` of the padded positions less (rows of alike length;
    a single row). A unit is a sequence, or with shared_prompts the sequences of one prompt (GRPO's
    group) as one tree. Attention within a packed row costs more than within a short padded one
    (its mask is not skipped), which is why rows stay narrow: on L4-256, 8 rollouts of 25-105
    tokens, a training forward and backward took 0.78x the padded time packed in rows of 128, 0.81x
    in 256, 0.94x in one row of 512 (bench/RESULTS.md, session 11)."""
    lengths = (batch.last_index + 1).tolist()
    prompt_lens = (batch.positions[:, 0] + 1).tolist()
    N, L = len(lengths), batch.input_ids.shape[1]
    ids = batch.input_ids.cpu()
    units: dict[tuple, list[int]] = {}
    for i in range(N):
        units.setdefault(tuple(ids[i, :prompt_lens[i]].tolist()) if shared_prompts else (i,), []).append(i)
    # in an order of their own (not the rows'): the same sequences are laid out the same way in any
    # order, so a no-grad pass over a rollout and the update's forward compute the same numbers
    members = sorted((sorted(u, key=lambda i: ids[i, :lengths[i]].tolist()) for u in units.values()),
                     key=lambda u: ids[u[0], :lengths[u[0]]].tolist())
    sizes = [prompt_lens[u[0]] - 1 + sum(lengths[i] - prompt_lens[i] + 1 for i in u) for u in members]
    W = max(width, max(sizes))
    rows = best_fit_decreasing(sizes, W)
    if len(rows) * W > (1 - min_saving) * N * L:
        return None
    input_ids = torch.zeros(len(rows), W, dtype=torch.long)
    position_ids = torch.zeros(len(rows), W, dtype=torch.long)
    segment_ids = torch.full((len(rows), W), -1, dtype=torch.long)
    branch_ids = torch.full((len(rows), W), -1, dtype=torch.long)
    start = torch.zeros(N, dtype=torch.long)   # flat index of each sequence's position 0, as its branch sees it
    for r, row in enumerate(rows):
        offset = 0
        for u in row:
            group = members[u]
            P = prompt_lens[group[0]]
            input_ids[r, offset:offset + P - 1] = ids[group[0], :P - 1]              # the prompt but its last token
            position_ids[r, offset:offset + P - 1] = torch.arange(P - 1)
            segment_ids[r, offset:offset + P - 1] = group[0]
            branch_ids[r, offset:offset + P - 1] = 0
            offset += P - 1
            for k, i in enumerate(group, start=1):                                  # last prompt token + answer
                n = lengths[i] - P + 1
                input_ids[r, offset:offset + n] = ids[i, P - 1:lengths[i]]
                position_ids[r, offset:offset + n] = torch.arange(P - 1, lengths[i])
                segment_ids[r, offset:offset + n] = group[0]
                branch_ids[r, offset:offset + n] = k
                start[i] = r * W + offset - (P - 1)
                offset += n
    device = batch.input_ids.device
    last = batch.last_index.cpu()[:, None]                                               # (N, 1)
    # a response position past a row's end (its padding) reads the row's last token: masked anyway
    positions = start[:, None] + torch.minimum(batch.positions.cpu(), last)             # (N, R)
    return Packed(input_ids.to(device), position_ids.to(device), segment_ids.to(device), branch_ids.to(device),
                  positions.to(device))


# ---- forward passes over a rollout ------------------------------------------------------------------

def response_hidden(model, batch: Rollout, packing: bool = True, shared_prompts: bool = True) -> torch.Tensor:
    """The model's final hidden states at the positions whose logits predict each response
    token: (N, R, C), read packed where that saves enough (`pack`)."""
    packed = pack(batch, shared_prompts=shared_prompts) if packing else None
    if packed is None:
        h = model.hidden(batch.input_ids)                                               # (N, L, C)
        return h.gather(1, batch.positions[..., None].expand(-1, -1, h.shape[-1]))      # (N, R, C)
    h = model.hidden(packed.input_ids, packed.position_ids, segment_ids=packed.segment_ids,
                     branch_ids=packed.branch_ids)                                      # (P, W, C)
    return h.flatten(0, 1)[packed.positions]                                            # (N, R, C)


def response_logprobs(model, batch: Rollout, temperature: float, entropy_grad: bool = False,
                      packing: bool = True, shared_prompts: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """log pi_T(y_t) = log_softmax(logits / T)[y_t] of each response token, as the sampler
    computed it, and the entropy H = -sum_v p_v log p_v of each of those distributions (detached
    unless entropy_grad). Only response positions go through the LM head. Returns
    (logprobs (N, R), entropy (N, R)), float32."""
    h = response_hidden(model, batch, packing, shared_prompts)                           # (N, R, C)
    logits = model.lm_head(h).float() / temperature                                     # (N, R, V)
    logp_all = logits.log_softmax(-1)
    logprobs = logp_all.gather(-1, batch.tokens[..., None]).squeeze(-1)                  # (N, R)
    with torch.set_grad_enabled(entropy_grad and torch.is_grad_enabled()):
        entropy = -(logp_all.exp() * logp_all).sum(-1)                                  # (N, R)
    return logprobs, entropy


class ResponseLogprobs(torch.nn.Module):
    """`response_logprobs` of a policy as a module's forward: DDP averages the gradients of what runs
    through the forward of the module it wraps, and response_logprobs calls hidden() and the head."""

    def __init__(self, policy: torch.nn.Module):
        super().__init__()
        self.policy = policy

    def forward(self, batch: Rollout, temperature: float, entropy_grad: bool = False, packing: bool = True,
                shared_prompts: bool = True):
        return response_logprobs(self.policy, batch, temperature, entropy_grad, packing, shared_prompts)


def response_values(critic, batch: Rollout, packing: bool = True, shared_prompts: bool = True) -> torch.Tensor:
    """The critic's V(s_t) for the state before each response token, read packed where that
    saves enough (`pack`). Returns (N, R) float32."""
    packed = pack(batch, shared_prompts=shared_prompts) if packing else None
    if packed is None:
        return critic(batch.input_ids).float().gather(1, batch.positions)               # (N, R)
    values = critic(packed.input_ids, packed.position_ids, segment_ids=packed.segment_ids,
                    branch_ids=packed.branch_ids)                                       # (P, W)
    return values.float().flatten()[packed.positions]                                   # (N, R)


def by_length(lengths: torch.Tensor, chunk: int) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Row chunks of `chunk` rows of alike length (rows sorted by `lengths` (N,), stable), so each
    chunk, trimmed to its longest row, carries little padding; and the order, to put results back
    (`out[order] = results in chunk order`)."""
    order = torch.argsort(lengths.cpu(), stable=True)
    return [order[i:i + chunk] for i in range(0, order.numel(), chunk)], order


def unsort(sorted_rows: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """Rows computed in `by_length`'s order, put back in the original one."""
    result = torch.empty_like(sorted_rows)
    result[order.to(result.device)] = sorted_rows
    return result


@torch.no_grad()
def in_chunks(fn, batch: Rollout, chunk: int) -> list[torch.Tensor]:
    """fn over chunks of `chunk` rows of `batch` (memory: a chunk's logits at a time), its (n, r)
    outputs padded back to (N, R), in the rows' order, and returned as a list (one per output of
    fn). Rows of alike length go together: the same numbers with less padding to compute."""
    chunks, order = by_length(batch.last_index, chunk)
    parts = [fn(batch.rows(rows.to(batch.input_ids.device))) for rows in chunks]
    R = batch.tokens.shape[1]
    out = []
    for k in range(len(parts[0]) if isinstance(parts[0], tuple) else 1):
        pieces = [p[k] if isinstance(p, tuple) else p for p in parts]
        out.append(unsort(torch.cat([torch.nn.functional.pad(x, (0, R - x.shape[1])) for x in pieces]), order))
    return out

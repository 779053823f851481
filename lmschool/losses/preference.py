"""Preference losses: DPO and its relatives, one pure function each, picked by name from `LOSSES`.

Every loss takes *sequence* log-probabilities of whole responses (the sum over the response's
tokens, `sequence_logprobs`), never logits, plus what else it needs (lengths, labels, a KL
estimate) and its hyperparameters, and returns `(losses (B,), metrics)`: one loss per example
(the stage takes the mean) and a dict of detached 0-dim tensors (batch means) to log:

    rewards/chosen, rewards/rejected   the implicit rewards (for DPO: beta * log-ratio to the reference)
    margins                            rewards/chosen - rewards/rejected
    accuracy                           share of pairs whose chosen reward is the higher

Notation, as in the papers: x the prompt, y_w the chosen ("winning") and y_l the rejected answer,
pi the policy, pi_ref the frozen reference (the SFT model), sigma the logistic function,
h = log pi(y_w|x)/pi_ref(y_w|x) - log pi(y_l|x)/pi_ref(y_l|x) (`logits` below: the difference of
the policy's and the reference's log-ratios). All shapes are (B,) unless written otherwise.

    loss         reference  needs                     paper
    dpo          yes        -                         Rafailov et al. 2023
    cdpo         yes        label_smoothing           Mitchell 2023 (conservative DPO)
    robust_dpo   yes        label_smoothing           Chowdhury et al. 2024
    ipo          yes        -                         Azar et al. 2023
    simpo        no         lengths, gamma            Meng et al. 2024
    orpo         no         lengths                   Hong et al. 2024
    kto          yes        labels, KL estimate       Ethayarajh et al. 2024 (unpaired data)

`paired_loss(name, ...)` calls any of the paired ones with the arguments it takes; `chosen_nll`
gives the optional SFT term on the chosen answers (the stage adds `sft_weight * chosen_nll`).
"""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F

from lmschool.losses.lm import token_nll


def sequence_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log pi(y|x) per row: the sum of the log-probs of the target tokens. logits (B, T, V), labels
    (B, T) = next-token targets with -100 outside the response -> (B,) float32."""
    return -token_nll(logits, labels).sum(-1)


def chosen_nll(policy_chosen: torch.Tensor, chosen_len: torch.Tensor) -> torch.Tensor:
    """The SFT term: mean negative log-likelihood per token of the chosen answer,
    -log pi(y_w|x) / |y_w| (B,). Added with a small weight, it keeps DPO from lowering the
    chosen answers' probability together with the rejected ones' (Pal et al. 2024, "Smaug")."""
    return -policy_chosen / chosen_len.clamp(min=1)


def _pair_metrics(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor, **extra) -> dict:
    chosen_rewards, rejected_rewards = chosen_rewards.detach(), rejected_rewards.detach()
    return {"rewards/chosen": chosen_rewards.mean(), "rewards/rejected": rejected_rewards.mean(),
            "margins": (chosen_rewards - rejected_rewards).mean(),
            "accuracy": (chosen_rewards > rejected_rewards).float().mean(),
            **{k: v.detach().mean() for k, v in extra.items()}}


def _logratios(policy_chosen, policy_rejected, ref_chosen, ref_rejected):
    chosen_logratios = policy_chosen - ref_chosen            # log pi(y_w|x) / pi_ref(y_w|x)
    rejected_logratios = policy_rejected - ref_rejected      # log pi(y_l|x) / pi_ref(y_l|x)
    return chosen_logratios, rejected_logratios, chosen_logratios - rejected_logratios  # ..., h


def dpo(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
        ref_rejected: torch.Tensor, *, beta: float) -> tuple[torch.Tensor, dict]:
    """Direct Preference Optimization (Rafailov et al. 2023, "Direct Preference Optimization: Your
    Language Model is Secretly a Reward Model", eq. 7):

        L = -log sigma(beta * h),   h = log pi(y_w|x)/pi_ref(y_w|x) - log pi(y_l|x)/pi_ref(y_l|x)

    The Bradley-Terry likelihood of the label under the implicit reward r(x, y) = beta * log
    pi(y|x)/pi_ref(y|x). Its gradient is -beta * sigma(-beta h) * grad h: large where the implicit
    reward ranks the pair wrongly, beta/2 at h = 0. Inputs: sequence log-probs (B,) of the policy
    and of the frozen reference; beta > 0 (typical 0.1: a smaller beta lets the policy move further
    from the reference)."""
    chosen_logratios, rejected_logratios, logits = _logratios(policy_chosen, policy_rejected,
                                                              ref_chosen, ref_rejected)
    losses = -F.logsigmoid(beta * logits)
    return losses, _pair_metrics(beta * chosen_logratios, beta * rejected_logratios)


def cdpo(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
         ref_rejected: torch.Tensor, *, beta: float, label_smoothing: float = 0.1) -> tuple[torch.Tensor, dict]:
    """Conservative DPO (Mitchell 2023, "A note on DPO with noisy preferences & relationship to
    IPO"): each label is taken to be flipped with probability eps, so the target is a soft label:

        L = -(1 - eps) log sigma(beta h) - eps log sigma(-beta h)

    Its minimum sits at a finite h = log((1 - eps) / eps) / beta instead of h -> infinity, so the
    policy stops pulling pairs apart once they are ranked with the confidence the labels deserve.
    eps = label_smoothing in [0, 0.5); eps = 0 is DPO."""
    chosen_logratios, rejected_logratios, logits = _logratios(policy_chosen, policy_rejected,
                                                              ref_chosen, ref_rejected)
    eps = label_smoothing
    losses = -(1 - eps) * F.logsigmoid(beta * logits) - eps * F.logsigmoid(-beta * logits)
    return losses, _pair_metrics(beta * chosen_logratios, beta * rejected_logratios)


def robust_dpo(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
               ref_rejected: torch.Tensor, *, beta: float, label_smoothing: float = 0.1
               ) -> tuple[torch.Tensor, dict]:
    """Robust DPO (Chowdhury, Kini, Natarajan 2024, "Provably Robust DPO: Aligning Language Models
    with Noisy Feedback", eq. 7): an unbiased estimate of the clean-label DPO loss when each
    label is flipped with known probability eps < 1/2:

        L = [(1 - eps) (-log sigma(beta h)) + eps log sigma(-beta h)] / (1 - 2 eps)

    Its expectation over the label noise equals DPO's loss on the noise-free labels. Unlike cDPO
    it is not bounded below: it keeps pushing h, like DPO. eps = label_smoothing in [0, 0.5)."""
    chosen_logratios, rejected_logratios, logits = _logratios(policy_chosen, policy_rejected,
                                                              ref_chosen, ref_rejected)
    eps = label_smoothing
    losses = ((1 - eps) * -F.logsigmoid(beta * logits) + eps * F.logsigmoid(-beta * logits)) / (1 - 2 * eps)
    return losses, _pair_metrics(beta * chosen_logratios, beta * rejected_logratios)


def ipo(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
        ref_rejected: torch.Tensor, *, beta: float) -> tuple[torch.Tensor, dict]:
    """Identity Preference Optimisation (Azar et al. 2023, "A General Theoretical Paradigm to
    Understand Learning from Human Preferences", eq. 17), with tau = beta:

        L = (h - 1 / (2 tau))^2

    A squared loss that regresses the log-ratio gap h to a fixed target 1/(2 tau) instead of
    pushing it to infinity, so it does not over-fit deterministic preferences as DPO can. h is
    in sequence log-probs, as in the paper (TRL divides by the length first)."""
    chosen_logratios, rejected_logratios, logits = _logratios(policy_chosen, policy_rejected,
                                                              ref_chosen, ref_rejected)
    losses = (logits - 1 / (2 * beta)) ** 2
    return losses, _pair_metrics(beta * chosen_logratios, beta * rejected_logratios)


def simpo(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, chosen_len: torch.Tensor,
          rejected_len: torch.Tensor, *, beta: float, gamma: float = 1.0) -> tuple[torch.Tensor, dict]:
    """SimPO (Meng, Xia, Chen 2024, "SimPO: Simple Preference Optimization with a Reference-Free
    Reward", eq. 6): no reference model; the implicit reward is the length-normalised log-prob
    r(x, y) = beta / |y| * log pi(y|x), and the pair must be separated by a target margin gamma:

        L = -log sigma(beta / |y_w| log pi(y_w|x) - beta / |y_l| log pi(y_l|x) - gamma)

    The length normalisation matches the reward to what generation ranks (the mean token
    log-prob) and removes DPO's pull towards longer answers. chosen_len, rejected_len (B,): the
    responses' token counts; the paper's beta is 2 to 2.5 and gamma about beta / 2."""
    chosen_rewards = beta * policy_chosen / chosen_len.clamp(min=1)
    rejected_rewards = beta * policy_rejected / rejected_len.clamp(min=1)
    losses = -F.logsigmoid(chosen_rewards - rejected_rewards - gamma)
    return losses, _pair_metrics(chosen_rewards, rejected_rewards)


def log1mexp(a: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(a)) for a < 0, accurate near 0 (Maechler 2012): log(-expm1(a))."""
    return torch.log(-torch.expm1(a))


def orpo(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, chosen_len: torch.Tensor,
         rejected_len: torch.Tensor, *, beta: float) -> tuple[torch.Tensor, dict]:
    """ORPO (Hong, Lee, Thorne 2024, "ORPO: Monolithic Preference Optimization without Reference
    Model", eqs. 2-7), with lambda = beta: the SFT loss on the chosen answer plus an odds-ratio term,

        P(y|x) = exp(log pi(y|x) / |y|)        (the mean token probability)
        odds(y|x) = P(y|x) / (1 - P(y|x))
        L = -log pi(y_w|x) / |y_w|  -  lambda log sigma(log odds(y_w|x) - log odds(y_l|x))

    No reference model and no separate SFT stage needed. log odds = a - log(1 - exp(a)) with
    a = the mean log-prob, computed with `log1mexp`; a is kept just below 0 (a mean token
    probability of 1 has infinite odds). The logged rewards are beta * a, as in TRL."""
    mean_chosen = (policy_chosen / chosen_len.clamp(min=1)).clamp(max=-1e-6)     # a_w = log P(y_w|x)
    mean_rejected = (policy_rejected / rejected_len.clamp(min=1)).clamp(max=-1e-6)
    log_odds = (mean_chosen - log1mexp(mean_chosen)) - (mean_rejected - log1mexp(mean_rejected))
    nll = -mean_chosen
    losses = nll - beta * F.logsigmoid(log_odds)
    return losses, _pair_metrics(beta * mean_chosen, beta * mean_rejected, log_odds_ratio=log_odds, nll=nll)


def kto_kl(policy_kl: torch.Tensor, ref_kl: torch.Tensor) -> torch.Tensor:
    """KTO's reference point z_0: a batch estimate of KL(pi || pi_ref), the mean log-ratio of
    *mismatched* pairs (prompt x_i with another example's answer y_j), clipped at 0 and detached
    (no gradient flows through it, as in the paper). policy_kl, ref_kl (B,) -> 0-dim."""
    return (policy_kl - ref_kl).mean().clamp(min=0).detach()


def kto(policy_logps: torch.Tensor, ref_logps: torch.Tensor, labels: torch.Tensor, kl: torch.Tensor, *,
        beta: float, desirable_weight: float = 1.0, undesirable_weight: float = 1.0
        ) -> tuple[torch.Tensor, dict]:
    """KTO (Ethayarajh et al. 2024, "KTO: Model Alignment as Prospect Theoretic Optimization",
    eq. 8): for unpaired answers, each marked desirable or not. With r = log pi(y|x)/pi_ref(y|x)
    and the reference point z_0 = `kl` (see `kto_kl`):

        v(x, y) = lambda_D sigma(beta (r - z_0))   if y is desirable
                  lambda_U sigma(beta (z_0 - r))   if not
        L = lambda_y - v(x, y)

    An answer gains only by beating the policy's current average drift from the reference, so
    it cannot win by raising every log-ratio. labels (B,) bool: True = desirable; lambda_D =
    desirable_weight, lambda_U = undesirable_weight (the paper keeps lambda_D n_D / (lambda_U n_U)
    in [1, 4/3]). Metrics are over the batch's desirable / undesirable examples (left out where
    the batch has none)."""
    labels = labels.bool()
    rewards = policy_logps - ref_logps                                     # r
    desirable = desirable_weight * (1 - torch.sigmoid(beta * (rewards - kl)))
    undesirable = undesirable_weight * (1 - torch.sigmoid(beta * (kl - rewards)))
    losses = torch.where(labels, desirable, undesirable)
    r = (beta * rewards).detach()
    metrics = {"kl": kl.detach()}
    if labels.any():
        metrics["rewards/chosen"] = r[labels].mean()
    if (~labels).any():
        metrics["rewards/rejected"] = r[~labels].mean()
    if labels.any() and (~labels).any():
        metrics["margins"] = metrics["rewards/chosen"] - metrics["rewards/rejected"]
    return losses, metrics


# ---- the table --------------------------------------------------------------------------------

LOSSES = {"dpo": dpo, "cdpo": cdpo, "robust_dpo": robust_dpo, "ipo": ipo, "simpo": simpo,
          "orpo": orpo, "kto": kto}

# beta when the config leaves it out: the papers' values (SimPO's reward is a mean token log-prob,
# so its beta is larger; ORPO's beta is its lambda)
DEFAULT_BETA = {"dpo": 0.1, "cdpo": 0.1, "robust_dpo": 0.1, "ipo": 0.1, "simpo": 2.0, "orpo": 0.1, "kto": 0.1}

REFERENCE_FREE = frozenset({"simpo", "orpo"})


def needs_reference(name: str) -> bool:
    """Whether the loss compares the policy with a frozen reference model."""
    return name not in REFERENCE_FREE


def paired_loss(name: str, *, policy_chosen: torch.Tensor, policy_rejected: torch.Tensor,
                ref_chosen: torch.Tensor | None = None, ref_rejected: torch.Tensor | None = None,
                chosen_len: torch.Tensor | None = None, rejected_len: torch.Tensor | None = None,
                **hparams) -> tuple[torch.Tensor, dict]:
    """Call the paired loss `name` with the inputs it takes: (policy, reference) log-probs for the
    reference-based ones, (policy log-probs, lengths) for simpo and orpo; of `hparams` (beta,
    label_smoothing, gamma ...) only those the loss has are passed."""
    if name not in LOSSES or name == "kto":
        raise ValueError(f"unknown paired loss {name!r}; choose one of "
                         f"{', '.join(k for k in LOSSES if k != 'kto')}")
    fn = LOSSES[name]
    accepted = inspect.signature(fn).parameters
    kwargs = {k: v for k, v in hparams.items() if k in accepted}
    if needs_reference(name):
        return fn(policy_chosen, policy_rejected, ref_chosen, ref_rejected, **kwargs)
    return fn(policy_chosen, policy_rejected, chosen_len, rejected_len, **kwargs)

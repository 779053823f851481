"""Preference losses (lmschool/losses/preference.py): each against a value worked out by hand,
each against the paper's formula written out independently (float64 numpy) on random inputs, and
the gradients the theory predicts (DPO's beta/2 at equal log-ratios, cDPO's and IPO's finite
optima)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lmschool.losses.preference import (DEFAULT_BETA, LOSSES, chosen_nll, cdpo, dpo, ipo, kto, kto_kl,
                                        needs_reference, orpo, paired_loss, robust_dpo, sequence_logprobs,
                                        simpo)


def t(*values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def close(a, b, tol=1e-6) -> bool:
    return abs(float(a) - float(b)) < tol


# ---- hand-worked values --------------------------------------------------------------------------

# One pair: log pi(y_w) = -10, log pi(y_l) = -12, log pi_ref(y_w) = log pi_ref(y_l) = -11.
# Chosen log-ratio = -10 - (-11) = 1, rejected log-ratio = -12 - (-11) = -1, h = 1 - (-1) = 2.
PAIR = dict(policy_chosen=t(-10.0), policy_rejected=t(-12.0), ref_chosen=t(-11.0), ref_rejected=t(-11.0))


def test_dpo_by_hand():
    """beta = 0.1, h = 2: beta h = 0.2, L = -log sigma(0.2) = log(1 + e^-0.2) = log(1.8187308)
    = 0.5981389. Rewards: beta x log-ratio = 0.1 and -0.1, margin 0.2, accuracy 1.
    Second pair, policy = reference (h = 0): L = log 2 = 0.6931472, margin 0, accuracy 0 (a tie is
    not a win)."""
    losses, m = dpo(t(-10.0, -5.0), t(-12.0, -7.0), t(-11.0, -5.0), t(-11.0, -7.0), beta=0.1)
    assert close(losses[0], 0.5981389) and close(losses[1], 0.6931472)
    assert close(m["rewards/chosen"], (0.1 + 0.0) / 2) and close(m["rewards/rejected"], (-0.1 + 0.0) / 2)
    assert close(m["margins"], 0.1) and close(m["accuracy"], 0.5)


def test_cdpo_by_hand():
    """beta = 0.1, eps = 0.1, h = 2 (beta h = 0.2): L = -0.9 log sigma(0.2) - 0.1 log sigma(-0.2)
    = 0.9 x 0.5981389 + 0.1 x log(1 + e^0.2) = 0.5383250 + 0.1 x 0.7981389 = 0.6181389."""
    losses, m = cdpo(**PAIR, beta=0.1, label_smoothing=0.1)
    assert close(losses[0], 0.6181389) and close(m["margins"], 0.2)


def test_robust_dpo_by_hand():
    """beta = 0.1, eps = 0.1, h = 2: L = [0.9 x (-log sigma(0.2)) + 0.1 x log sigma(-0.2)] / (1 - 0.2)
    = (0.5383250 - 0.0798139) / 0.8 = 0.4585111 / 0.8 = 0.5731389."""
    losses, _ = robust_dpo(**PAIR, beta=0.1, label_smoothing=0.1)
    assert close(losses[0], 0.5731389)


def test_ipo_by_hand():
    """tau = beta = 0.1: the target gap is 1 / (2 x 0.1) = 5; h = 2 gives L = (2 - 5)^2 = 9.
    With beta = 0.25 the target is 2 and L = 0."""
    losses, m = ipo(**PAIR, beta=0.1)
    assert close(losses[0], 9.0) and close(m["accuracy"], 1.0)
    assert close(ipo(**PAIR, beta=0.25)[0][0], 0.0)


def test_simpo_by_hand():
    """beta = 2, gamma = 1. Chosen: log-prob -6 over 3 tokens (mean -2), reward 2 x -2 = -4.
    Rejected: -12 over 4 tokens (mean -3), reward -6. L = -log sigma(-4 - (-6) - 1) = -log sigma(1)
    = log(1 + e^-1) = 0.3132617; margin 2, accuracy 1. No reference model is read."""
    losses, m = simpo(t(-6.0), t(-12.0), t(3.0), t(4.0), beta=2.0, gamma=1.0)
    assert close(losses[0], 0.3132617)
    assert close(m["rewards/chosen"], -4.0) and close(m["rewards/rejected"], -6.0) and close(m["margins"], 2.0)


def test_orpo_by_hand():
    """lambda = beta = 0.1. Chosen: 2 tokens of probability 1/2, log-prob 2 log 0.5, so
    P = 0.5, odds 0.5/0.5 = 1, log odds 0. Rejected: 1 token of probability 0.2, odds 0.2/0.8 =
    0.25, log odds -1.3862944. Log odds ratio 1.3862944; log sigma(1.3862944) = -log(1 + 1/4)
    = -0.2231436. NLL of the chosen answer per token = log 2 = 0.6931472.
    L = 0.6931472 + 0.1 x 0.2231436 = 0.7154615."""
    losses, m = orpo(t(2 * math.log(0.5)), t(math.log(0.2)), t(2.0), t(1.0), beta=0.1)
    assert close(losses[0], 0.7154615)
    assert close(m["log_odds_ratio"], 1.3862944) and close(m["nll"], 0.6931472)


def test_kto_by_hand():
    """beta = 0.1, z_0 = 0.5. A desirable answer with r = 2.5: v = sigma(0.1 x (2.5 - 0.5)) =
    sigma(0.2) = 0.5498340, L = 1 - v = 0.4501660. An undesirable one with r = -1.5 and
    lambda_U = 1.5: v = 1.5 sigma(0.1 x (0.5 + 1.5)) = 0.8247510, L = 1.5 - v = 0.6752490.
    Rewards (beta r): 0.25 and -0.15, margin 0.4."""
    losses, m = kto(t(-7.5, -11.5), t(-10.0, -10.0), torch.tensor([True, False]), t(0.5),
                    beta=0.1, undesirable_weight=1.5)
    assert close(losses[0], 0.4501660) and close(losses[1], 0.6752490)
    assert close(m["rewards/chosen"], 0.25) and close(m["rewards/rejected"], -0.15) and close(m["margins"], 0.4)


def test_kto_kl_by_hand():
    """Mismatched log-ratios 1, 2, -0.5: mean 2.5 / 3 = 0.8333333. If the mean is negative
    (-1, 0.5: mean -0.25) it is clipped to 0. No gradient flows through it."""
    policy = t(1.0, 2.0, -0.5).requires_grad_()
    z0 = kto_kl(policy, t(0.0, 0.0, 0.0))
    assert close(z0, 0.8333333) and not z0.requires_grad
    assert float(kto_kl(t(-1.0, 0.5), t(0.0, 0.0))) == 0.0


def test_chosen_nll_and_sequence_logprobs_by_hand():
    """Two-token vocabulary, uniform logits: each target token has log-prob log(1/2). A row with
    three targets (and one -100 position) has sequence log-prob 3 log 0.5 = -2.0794415; per token
    NLL of that answer: 2.0794415 / 3 = log 2."""
    logits = torch.zeros(1, 4, 2)
    labels = torch.tensor([[-100, 1, 0, 1]])
    lp = sequence_logprobs(logits, labels)
    assert close(lp[0], 3 * math.log(0.5)) and close(chosen_nll(lp, torch.tensor([3]))[0], math.log(2))


# ---- against the papers' formulas on random inputs ------------------------------------------------

def np_sigmoid(x):
    return 1 / (1 + np.exp(-x))


def random_pairs(seed, n=64):
    rng = np.random.default_rng(seed)
    pc, pr, rc, rr = (rng.normal(-30, 8, n) for _ in range(4))
    lc, lr = rng.integers(1, 40, n).astype(float), rng.integers(1, 40, n).astype(float)
    return pc, pr, rc, rr, lc, lr


@pytest.mark.parametrize("seed", [0, 1])
def test_losses_match_the_papers_formulas(seed):
    pc, pr, rc, rr, lc, lr = random_pairs(seed)
    beta, eps, gamma = 0.3, 0.2, 0.7
    h = (pc - rc) - (pr - rr)
    expected = {
        # Rafailov et al. eq. 7
        "dpo": -np.log(np_sigmoid(beta * h)),
        # Mitchell 2023: DPO's loss against soft labels 1 - eps / eps
        "cdpo": -(1 - eps) * np.log(np_sigmoid(beta * h)) - eps * np.log(np_sigmoid(-beta * h)),
        # Chowdhury et al. 2024 eq. 7
        "robust_dpo": ((1 - eps) * -np.log(np_sigmoid(beta * h)) + eps * np.log(np_sigmoid(-beta * h))) / (1 - 2 * eps),
        # Azar et al. eq. 17 with tau = beta
        "ipo": (h - 1 / (2 * beta)) ** 2,
        # Meng et al. eq. 6
        "simpo": -np.log(np_sigmoid(beta * pc / lc - beta * pr / lr - gamma)),
    }
    args = {k: torch.from_numpy(v) for k, v in dict(policy_chosen=pc, policy_rejected=pr, ref_chosen=rc,
                                                    ref_rejected=rr, chosen_len=lc, rejected_len=lr).items()}
    for name, want in expected.items():
        got, _ = paired_loss(name, **args, beta=beta, label_smoothing=eps, gamma=gamma)
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-9, atol=1e-9, err_msg=name)


def test_orpo_matches_its_formula_near_probability_one():
    """ORPO's odds written out as the paper does, P / (1 - P) with P = exp(mean log-prob),
    including mean log-probs close to 0 where 1 - P is tiny."""
    rng = np.random.default_rng(3)
    lc, lr = rng.integers(1, 30, 64).astype(float), rng.integers(1, 30, 64).astype(float)
    mean_c = -rng.uniform(1e-4, 3, 64)
    mean_r = -rng.uniform(1e-4, 3, 64)
    mean_c[:4] = [-1e-4, -1e-3, -0.01, -5.0]
    Pc, Pr = np.exp(mean_c), np.exp(mean_r)
    ratio = np.log(Pc / (1 - Pc)) - np.log(Pr / (1 - Pr))
    want = -mean_c - 0.5 * np.log(np_sigmoid(ratio))
    got, _ = orpo(torch.from_numpy(mean_c * lc), torch.from_numpy(mean_r * lr), torch.from_numpy(lc),
                  torch.from_numpy(lr), beta=0.5)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-7)


def test_kto_matches_its_formula():
    rng = np.random.default_rng(4)
    pol, ref = rng.normal(-20, 5, 32), rng.normal(-20, 5, 32)
    labels = rng.random(32) < 0.6
    z0, beta, wd, wu = 0.8, 0.2, 1.0, 1.33
    r = pol - ref
    want = np.where(labels, wd - wd * np_sigmoid(beta * (r - z0)), wu - wu * np_sigmoid(beta * (z0 - r)))
    got, m = kto(torch.from_numpy(pol), torch.from_numpy(ref), torch.from_numpy(labels), t(z0),
                 beta=beta, desirable_weight=wd, undesirable_weight=wu)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-9)
    assert close(m["rewards/chosen"], (beta * r[labels]).mean())


def test_label_smoothing_zero_is_dpo():
    pc, pr, rc, rr, *_ = map(torch.from_numpy, random_pairs(5))
    want, _ = dpo(pc, pr, rc, rr, beta=0.2)
    for fn in (cdpo, robust_dpo):
        got, _ = fn(pc, pr, rc, rr, beta=0.2, label_smoothing=0.0)
        assert torch.allclose(got, want, rtol=1e-12, atol=1e-12)


# ---- gradients -----------------------------------------------------------------------------------

def grads(fn, h_value, **hp):
    """d loss / d log pi(y_w) and d loss / d log pi(y_l) at a pair whose log-ratio gap is h."""
    pc, pr = torch.tensor([-10.0 + h_value], dtype=torch.float64, requires_grad=True), \
        torch.tensor([-10.0], dtype=torch.float64, requires_grad=True)
    loss, _ = fn(pc, pr, t(-10.0), t(-10.0), **hp)
    loss.sum().backward()
    return pc.grad.item(), pr.grad.item()


@pytest.mark.parametrize("beta", [0.05, 0.1, 0.5])
def test_dpo_gradient_at_equal_log_ratios_is_beta_over_two(beta):
    """dL/dh = -beta sigma(-beta h), which at h = 0 is -beta/2: the chosen log-prob is pushed up
    and the rejected one down with weight beta/2 each, whatever the log-probs themselves are."""
    g_chosen, g_rejected = grads(dpo, 0.0, beta=beta)
    assert close(g_chosen, -beta / 2, 1e-12) and close(g_rejected, beta / 2, 1e-12)
    # further along, the weight falls as the implicit reward ranks the pair right: sigma(-beta h)
    g_chosen, _ = grads(dpo, 3.0, beta=beta)
    assert close(g_chosen, -beta / (1 + math.exp(beta * 3.0)), 1e-12)


def test_cdpo_and_ipo_stop_at_a_finite_gap():
    """cDPO's gradient vanishes at h = log((1 - eps) / eps) / beta (eps 0.1, beta 0.1: log 9 / 0.1
    = 21.972); IPO's at h = 1 / (2 tau) (tau 0.1: 5). DPO's never does (beta sigma(-beta h) > 0).
    At h = 0 cDPO's weight is beta (1 - 2 eps) / 2 = 0.04, robust DPO's beta / (2 (1 - 2 eps)) = 0.0625."""
    assert abs(grads(cdpo, math.log(9) / 0.1, beta=0.1, label_smoothing=0.1)[0]) < 1e-12
    assert abs(grads(ipo, 5.0, beta=0.1)[0]) < 1e-12
    assert grads(dpo, 21.97, beta=0.1)[0] < -1e-3
    assert close(grads(cdpo, 0.0, beta=0.1, label_smoothing=0.1)[0], -0.04, 1e-12)
    assert close(grads(robust_dpo, 0.0, beta=0.1, label_smoothing=0.1)[0], -0.0625, 1e-12)


# ---- the table -----------------------------------------------------------------------------------

def test_table_and_reference_needs():
    assert set(LOSSES) == {"dpo", "cdpo", "robust_dpo", "ipo", "simpo", "orpo", "kto"} == set(DEFAULT_BETA)
    assert [n for n in LOSSES if not needs_reference(n)] == ["simpo", "orpo"]
    with pytest.raises(ValueError, match="unknown paired loss 'kto'"):
        paired_loss("kto", policy_chosen=t(1.0), policy_rejected=t(0.0))
    # reference-free losses never read the reference log-probs
    got, _ = paired_loss("simpo", policy_chosen=t(-6.0), policy_rejected=t(-12.0), chosen_len=t(3.0),
                         rejected_len=t(4.0), ref_chosen=t(float("nan")), ref_rejected=t(float("nan")),
                         beta=2.0, gamma=1.0, label_smoothing=0.3)
    assert close(got[0], 0.3132617)

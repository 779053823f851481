"""lmschool.losses.ppo on hand-worked numbers: GAE (by hand, and = the discounted sum with lam=1),
whitening, KL estimators and the per-token reward placement, GRPO / RLOO baselines, the clipped
policy and value objectives with their clip fractions, and the adaptive KL controller."""

from __future__ import annotations

import math

import pytest
import torch

from lmschool.losses.ppo import (KLController, explained_variance, gae,
                                 grpo_advantages, kl_penalty, masked_mean, masked_whiten,
                                 policy_loss, rloo_advantages, token_rewards, value_loss)


def t(*rows):
    return torch.tensor(rows, dtype=torch.float32)


# ---- GAE --------------------------------------------------------------------------------------

def test_gae_three_steps_by_hand():
    """r = [0, 0, 1], V = [0.5, 0.6, 0.7], gamma 1, lam 0.5 (V after the last token = 0):
    t=2: delta = 1 + 0 - 0.7 = 0.3                       A2 = 0.3
    t=1: delta = 0 + 0.7 - 0.6 = 0.1                     A1 = 0.1 + 0.5 * 0.3 = 0.25
    t=0: delta = 0 + 0.6 - 0.5 = 0.1                     A0 = 0.1 + 0.5 * 0.25 = 0.225
    returns = A + V = [0.725, 0.85, 1.0]"""
    adv, ret = gae(t([0, 0, 1]), t([0.5, 0.6, 0.7]), t([1, 1, 1]), gamma=1.0, lam=0.5)
    assert torch.allclose(adv, t([0.225, 0.25, 0.3]), atol=1e-6)
    assert torch.allclose(ret, t([0.725, 0.85, 1.0]), atol=1e-6)


def test_gae_with_lambda_one_is_discounted_return_minus_value():
    """gamma 0.9, lam 1, r = [0, 0, 1]: reward-to-go G = [0.81, 0.9, 1], A = G - V = [0.31, 0.3, 0.3];
    checked on random rewards too against the plain discounted sum."""
    adv, _ = gae(t([0, 0, 1]), t([0.5, 0.6, 0.7]), t([1, 1, 1]), gamma=0.9, lam=1.0)
    assert torch.allclose(adv, t([0.31, 0.3, 0.3]), atol=1e-6)
    g = torch.Generator().manual_seed(0)
    rewards, values = torch.randn(4, 7, generator=g), torch.randn(4, 7, generator=g)
    adv, ret = gae(rewards, values, torch.ones(4, 7), gamma=0.97, lam=1.0)
    to_go = torch.zeros(4, 7)
    running = torch.zeros(4)
    for i in reversed(range(7)):
        running = rewards[:, i] + 0.97 * running
        to_go[:, i] = running
    assert torch.allclose(adv, to_go - values, atol=1e-5) and torch.allclose(ret, to_go, atol=1e-5)


def test_gae_ignores_padding():
    """A row of 2 real tokens and one padding slot (holding junk) equals the same 2-step row."""
    adv_pad, ret_pad = gae(t([0, 1, 50]), t([0.5, 0.6, 9]), t([1, 1, 0]), gamma=1.0, lam=0.95)
    adv, ret = gae(t([0, 1]), t([0.5, 0.6]), t([1, 1]), gamma=1.0, lam=0.95)
    assert torch.allclose(adv_pad[:, :2], adv) and torch.allclose(ret_pad[:, :2], ret)
    assert adv_pad[0, 2] == 0 and ret_pad[0, 2] == 0


# ---- whitening and statistics --------------------------------------------------------------

def test_masked_whiten_by_hand_and_padding_ignored():
    """x = [1, 2, 3, 4]: mean 2.5, unbiased var (2.25 + 0.25 + 0.25 + 2.25) / 3 = 5/3, so the
    whitened values are (x - 2.5) / sqrt(5/3) = [-1.1619, -0.3873, 0.3873, 1.1619]; a masked
    fifth entry (100) changes nothing and comes back 0."""
    expected = t([-1.161895, -0.387298, 0.387298, 1.161895])
    assert torch.allclose(masked_whiten(t([1, 2, 3, 4]), t([1, 1, 1, 1])), expected, atol=1e-5)
    got = masked_whiten(t([1, 2, 3, 4, 100]), t([1, 1, 1, 1, 0]))
    assert torch.allclose(got[:, :4], expected, atol=1e-5) and got[0, 4] == 0
    # shift_mean=False: scaled, the mean added back
    kept = masked_whiten(t([1, 2, 3, 4]), t([1, 1, 1, 1]), shift_mean=False)
    assert torch.allclose(kept, expected + 2.5, atol=1e-5)


def test_masked_mean_and_explained_variance():
    assert masked_mean(t([1, 2, 9]), t([1, 1, 0])).item() == 1.5
    returns, mask = t([1, 2, 3, 4]), t([1, 1, 1, 1])
    assert explained_variance(returns, returns, mask) == pytest.approx(1.0)
    assert explained_variance(torch.full_like(returns, 2.5), returns, mask) == pytest.approx(0.0)


# ---- KL and rewards ---------------------------------------------------------------------------

def test_kl_estimators_by_hand():
    """log pi = log 0.5, log pi_ref = log 0.25: k1 = log 2 = 0.693147; k2 = 0.5 * log(2)^2 =
    0.240227; k3 = exp(-log 2) + log 2 - 1 = 0.5 + 0.693147 - 1 = 0.193147."""
    lp, ref = torch.tensor([math.log(0.5)]), torch.tensor([math.log(0.25)])
    assert kl_penalty(lp, ref, "k1").item() == pytest.approx(0.693147, abs=1e-6)
    assert kl_penalty(lp, ref, "k2").item() == pytest.approx(0.240227, abs=1e-6)
    assert kl_penalty(lp, ref, "k3").item() == pytest.approx(0.193147, abs=1e-6)
    assert kl_penalty(ref, ref, "k3").item() == 0.0
    with pytest.raises(ValueError, match="k1"):
        kl_penalty(lp, ref, "k4")


def test_token_rewards_place_score_at_last_real_token():
    """Row 0: 3 real tokens + 1 pad; k1 = [0.5, 0, -1, (pad)], beta 0.1, score 2:
    rewards = [-0.05, 0, 0.1 + 2, 0]. Row 1: 1 real token, k1 = [0.2], score -1:
    rewards = [-0.02 - 1, 0, 0, 0]. Padding gets nothing, whatever its KL."""
    lp = t([-1, -2, -3, -7], [-1, -1, -1, -1])
    ref = t([-1.5, -2, -2, 0], [-1.2, 0, 0, 0])
    mask = t([1, 1, 1, 0], [1, 0, 0, 0])
    kl = kl_penalty(lp, ref, "k1")
    rewards, non_score = token_rewards(torch.tensor([2.0, -1.0]), kl, mask, kl_coef=0.1)
    assert torch.allclose(rewards, t([-0.05, 0, 2.1, 0], [-1.02, 0, 0, 0]), atol=1e-6)
    assert torch.allclose(non_score, t([-0.05, 0, 0.1, 0], [-0.02, 0, 0, 0]), atol=1e-6)


# ---- group baselines --------------------------------------------------------------------------

def test_grpo_advantages_on_a_hand_built_group():
    """Group [1, 0, 0, 1]: mean 0.5, sample std sqrt(4 * 0.25 / 3) = 0.57735, A = +-0.866;
    group [0.2, 0.2, 0.2, 0.2]: all equal, A = 0. Without std: A = s - mean = +-0.5."""
    scores = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.2, 0.2, 0.2, 0.2])
    adv = grpo_advantages(scores, 4)
    assert torch.allclose(adv, torch.tensor([0.866, -0.866, -0.866, 0.866, 0, 0, 0, 0]), atol=2e-3)
    assert torch.allclose(grpo_advantages(scores, 4, scale_std=False),
                          torch.tensor([0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0]), atol=1e-6)
    with pytest.raises(ValueError):
        grpo_advantages(scores, 3)


def test_rloo_advantages_leave_one_out():
    """Group [1, 2, 3]: baselines (mean of the others) [2.5, 2, 1.5], A = [-1.5, 0, 1.5]
    = G/(G-1) * (s - mean) = 1.5 * [-1, 0, 1]."""
    adv = rloo_advantages(torch.tensor([1.0, 2.0, 3.0, 5.0, 5.0, 5.0]), 3)
    assert torch.allclose(adv, torch.tensor([-1.5, 0.0, 1.5, 0, 0, 0]))


# ---- losses -----------------------------------------------------------------------------------

def test_policy_loss_clipping_by_hand():
    """ratios [0.5, 1, 1.5], eps 0.2.
    A = +1: -A*r = [-0.5, -1, -1.5], clipped [-0.8, -1, -1.2], max [-0.5, -1, -1.2] -> mean -0.9;
            the clipped term is used at r = 1.5 only: clipfrac 1/3, and no gradient flows there.
    A = -1: [0.5, 1, 1.5] vs clipped [0.8, 1, 1.2], max [0.8, 1, 1.5] -> mean 1.1; clipfrac 1/3
            (r = 0.5, clipped: no gradient there).
    approx_kl = 0.5 * mean(log r ^ 2) = 0.5 * (log(0.5)^2 + 0 + log(1.5)^2) / 3 = 0.107476."""
    old = torch.zeros(1, 3)
    mask = torch.ones(1, 3)
    for sign, expected_loss, no_grad_at in ((1.0, -0.9, 2), (-1.0, 1.1, 0)):
        new = torch.log(t([0.5, 1.0, 1.5])).requires_grad_()
        loss, m = policy_loss(new, old, torch.full((1, 3), sign), mask, clip_eps=0.2)
        assert loss.item() == pytest.approx(expected_loss, abs=1e-6)
        assert m["clipfrac"] == pytest.approx(1 / 3)
        assert m["approx_kl"] == pytest.approx(0.107476, abs=1e-5)
        loss.backward()
        assert new.grad[0, no_grad_at] == 0 and (new.grad[0] != 0).sum() == 2
    # padding is ignored: an extra masked token with a huge ratio changes nothing
    loss, m = policy_loss(torch.log(t([0.5, 1.0, 1.5, 9.0])), torch.zeros(1, 4), torch.ones(1, 4),
                          t([1, 1, 1, 0]))
    assert loss.item() == pytest.approx(-0.9, abs=1e-6) and m["clipfrac"] == pytest.approx(1 / 3)


def test_value_loss_clipping_by_hand():
    """V = 1.0, V_old = 0.5, R = 2, c = 0.2: unclipped (1 - 2)^2 = 1; V_clip = 0.7,
    (0.7 - 2)^2 = 1.69 is larger, so L = 0.5 * 1.69 = 0.845, vf_clipfrac 1. Without clipping 0.5."""
    v, old, ret, mask = t([1.0]), t([0.5]), t([2.0]), t([1.0])
    loss, m = value_loss(v, old, ret, mask, clip_range=0.2)
    assert loss.item() == pytest.approx(0.845) and m["vf_clipfrac"] == 1.0
    loss, m = value_loss(v, old, ret, mask, clip_range=0.0)
    assert loss.item() == pytest.approx(0.5) and m["vf_clipfrac"] == 0.0


def test_adaptive_kl_controller_and_resume():
    """beta 0.1, target 6, horizon 100, 10 rollouts per batch:
    KL 9   -> e = clip(9/6 - 1) = clip(0.5) = 0.2  -> beta = 0.1 * (1 + 0.2 * 10/100) = 0.102
    KL 6.6 -> e = 0.1                              -> beta = 0.102 * 1.01 = 0.10302
    KL 0   -> e = -0.2                             -> beta = 0.10302 * 0.98 = 0.1009596
    A fixed controller (no target) never moves; a restored one continues where it left off."""
    kl = KLController(0.1, target=6.0, horizon=100)
    assert kl.update(9.0, 10) == pytest.approx(0.102)
    assert kl.update(6.6, 10) == pytest.approx(0.10302)
    state = kl.state_dict()
    assert kl.update(0.0, 10) == pytest.approx(0.1009596)
    restored = KLController(0.1, target=6.0, horizon=100)
    restored.load_state_dict(state)
    assert restored.update(0.0, 10) == pytest.approx(0.1009596)
    fixed = KLController(0.05)
    assert fixed.update(100.0, 10) == 0.05

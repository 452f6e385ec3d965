"""losses.py against values derived by hand with the `math` module (float64, 1e-6), plus identities,
gradients, numerical stability and every bad-input error.

Shared non-trivial batch (two pairs), used unless a test says otherwise:

    policy_chosen    = [-10, -20]    reference_chosen   = [-11, -18]    ->  c = [ 1, -2]
    policy_rejected  = [-14, -15]    reference_rejected = [-12, -19]    ->  r = [-2,  4]
                                                                          h = c - r = [3, -6]
    chosen_lengths = [4, 6], rejected_lengths = [8, 5], beta = 0.5   ->  beta*h = [1.5, -3]
"""

import math

import pytest
import torch

from losses import (F_DIVERGENCE_LOSSES, LENGTH_LOSSES, LOSS_TYPES, check_loss_config, dpo_loss)

PC, PR, RC, RR = [-10.0, -20.0], [-14.0, -15.0], [-11.0, -18.0], [-12.0, -19.0]
LW, LL = [4, 6], [8, 5]
C, R = [1.0, -2.0], [-2.0, 4.0]
BETA = 0.5
LN2 = math.log(2)


def log_sigmoid(x):
    """log σ(x) = −log(1 + e^(−x)), written so that neither branch overflows."""
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def sigma(x):
    return 1 / (1 + math.exp(-x))


def t64(values):
    return torch.tensor(values, dtype=torch.float64)


def run(loss_type, pc=PC, pr=PR, rc=RC, rr=RR, lw=LW, ll=LL, **kwargs):
    """Per-pair losses of dpo_loss as a list of floats, on float64 inputs."""
    kwargs.setdefault("beta", BETA)
    losses, _, _ = dpo_loss(t64(pc), t64(pr), t64(rc), t64(rr), loss_type=loss_type,
                            chosen_lengths=torch.tensor(lw), rejected_lengths=torch.tensor(ll), **kwargs)
    return losses.tolist()


def assert_close(got, expected):
    assert got == pytest.approx(expected, abs=1e-6)


# --------------------------------------------------------------------------------------------------------
# Policy == reference: c = r = 0, so each loss takes its closed form (beta = 0.1, lengths equal per pair).
# --------------------------------------------------------------------------------------------------------

AT_INIT = [  # (loss_type, options, closed form)
    ("sigmoid", {}, LN2),  # -log σ(0)
    ("sigmoid", {"label_smoothing": 0.2}, LN2),  # -(0.8 + 0.2)·log σ(0)
    ("hinge", {}, 1.0),  # max(0, 1 - 0)
    ("ipo", {}, 25.0),  # (0 - 1/(2·0.1))² = 1/(4β²)
    ("exo_pair", {"label_smoothing": 1e-3}, -LN2 - 0.5 * math.log(1e-3 * (1 - 1e-3))),  # ½(ln½-ln(1-ε)) + ½(ln½-ln ε)
    ("nca_pair", {}, 2 * LN2),  # ln2 + ½ln2 + ½ln2
    ("robust", {"label_smoothing": 0.2}, LN2),  # (0.8·ln2 - 0.2·ln2) / 0.6
    ("bco_pair", {}, 2 * LN2),
    ("sppo_hard", {}, 50.0),  # 2·(1/(2β))² = 1/(2β²)
    ("aot", {}, LN2),
    ("aot", {"label_smoothing": 0.2}, LN2),
    ("aot_unpaired", {}, LN2),
    ("apo_zero", {}, 1.0),  # (1 - ½) + ½
    ("apo_down", {}, 1.0),  # ½ + (1 - ½)
    ("discopop", {}, 0.5 * LN2 + 0.5),  # m = σ(0) = ½: ½·ln2 + ½·e^0
    ("sigmoid_norm", {}, LN2),
    ("dpop", {}, LN2),  # c = 0, so the penalty max(0, -c) is 0
    ("rdpo", {}, LN2),  # |y_w| = |y_l|, so the length term is 0
]


@pytest.mark.parametrize("loss_type, options, expected", AT_INIT, ids=lambda v: str(v))
def test_closed_form_when_policy_equals_reference(loss_type, options, expected):
    """pc = rc = [-7, -3], pr = rr = [-9, -2]: c = r = 0 and sort(pc - pr) = sort(rc - rr)."""
    got = run(loss_type, pc=[-7.0, -3.0], pr=[-9.0, -2.0], rc=[-7.0, -3.0], rr=[-9.0, -2.0],
              lw=[4, 6], ll=[4, 6], beta=0.1, **options)
    assert_close(got, [expected, expected])


@pytest.mark.parametrize("f_divergence_type", ["forward_kl", "js_divergence", "alpha_divergence"])
@pytest.mark.parametrize("loss_type, expected", [("sigmoid", LN2), ("ipo", 25.0), ("sigmoid_norm", LN2)])
def test_closed_form_holds_for_every_f_divergence(loss_type, expected, f_divergence_type):
    """Every score vanishes at x = 0: 1 - e^0 = 0, ln2 + ln σ(0) = 0, (e^0 - 1)/(α-1) = 0; so h = 0 as for DPO."""
    got = run(loss_type, pc=[-7.0], pr=[-9.0], rc=[-7.0], rr=[-9.0], lw=[3], ll=[5], beta=0.1,
              f_divergence_type=f_divergence_type)
    assert_close(got, [expected])


def test_reference_free_closed_forms():
    """Equal mean log-probs of chosen and rejected (-6/3 = -10/5 = -2), beta = 0.1, gamma = 0.5:
    simpo: -log σ(0.1·(-2) - 0.1·(-2) - 0.5) = -log σ(-0.5) = ln(1 + e^0.5)
    sft:   NLL = -(-6) / 3 = 2
    orpo:  log odds ratio = 0, so 2 - 0.1·log σ(0) = 2 + 0.1·ln2
    """
    kwargs = dict(pc=[-6.0], pr=[-10.0], rc=[-1.0], rr=[-1.0], lw=[3], ll=[5], beta=0.1, simpo_gamma=0.5)
    assert_close(run("simpo", **kwargs), [math.log1p(math.exp(0.5))])
    assert_close(run("sft", **kwargs), [2.0])
    assert_close(run("orpo", **kwargs), [2.0 + 0.1 * LN2])


# --------------------------------------------------------------------------------------------------------
# Non-trivial inputs, computed by hand from each paper's formula (shared batch in the module docstring).
# --------------------------------------------------------------------------------------------------------


def test_sigmoid():
    """-log σ(β·h): β·h = 0.5·3 = 1.5 and 0.5·(-6) = -3."""
    assert_close(run("sigmoid"), [-log_sigmoid(1.5), -log_sigmoid(-3.0)])


def test_cdpo():
    """ε = 0.1: -(0.9)·log σ(β·h) - 0.1·log σ(-β·h)."""
    expected = [-0.9 * log_sigmoid(z) - 0.1 * log_sigmoid(-z) for z in (1.5, -3.0)]
    assert_close(run("sigmoid", label_smoothing=0.1), expected)


def test_hinge():
    """max(0, 1 - β·h): max(0, 1 - 1.5) = 0, max(0, 1 + 3) = 4."""
    assert_close(run("hinge"), [0.0, 4.0])


def test_ipo():
    """(c/|y_w| - r/|y_l| - 1/(2β))², 1/(2β) = 1:
    pair 1: (1/4 + 2/8 - 1)² = (-0.5)² = 0.25;  pair 2: (-2/6 - 4/5 - 1)² = (-32/15)²."""
    assert_close(run("ipo"), [0.25, (-2 / 6 - 4 / 5 - 1) ** 2])


def test_exo_pair():
    """ε = 1e-3, z = β·h: σ(z)·(log σ(z) - log(1-ε)) + σ(-z)·(log σ(-z) - log ε)."""
    eps = 1e-3
    expected = [sigma(z) * (log_sigmoid(z) - math.log(1 - eps)) + sigma(-z) * (log_sigmoid(-z) - math.log(eps))
                for z in (1.5, -3.0)]
    assert_close(run("exo_pair", label_smoothing=eps), expected)


def test_nca_pair():
    """-log σ(β·c) - ½·log σ(-β·c) - ½·log σ(-β·r), with β·c = [0.5, -1], β·r = [-1, 2]."""
    expected = [-log_sigmoid(bc) - 0.5 * log_sigmoid(-bc) - 0.5 * log_sigmoid(-br)
                for bc, br in ((0.5, -1.0), (-1.0, 2.0))]
    assert_close(run("nca_pair"), expected)


def test_robust():
    """ε = 0.1: [-(0.9)·log σ(β·h) + 0.1·log σ(-β·h)] / 0.8."""
    expected = [(-0.9 * log_sigmoid(z) + 0.1 * log_sigmoid(-z)) / 0.8 for z in (1.5, -3.0)]
    assert_close(run("robust", label_smoothing=0.1), expected)


def test_bco_pair():
    """-log σ(β·c) - log σ(-β·r): pair 1 -log σ(0.5) - log σ(1); pair 2 -log σ(-1) - log σ(-2)."""
    assert_close(run("bco_pair"), [-log_sigmoid(0.5) - log_sigmoid(1.0), -log_sigmoid(-1.0) - log_sigmoid(-2.0)])


def test_sppo_hard():
    """(c - 1/(2β))² + (r + 1/(2β))², 1/(2β) = 1: (1-1)² + (-2+1)² = 1;  (-2-1)² + (4+1)² = 34."""
    assert_close(run("sppo_hard"), [1.0, 34.0])


def test_aot():
    """Policy pc - pr = [4, -5], sorted [-5, 4]; reference rc - rr = [1, 1]; L = [-6, 3], β·L = [-3, 1.5].
    ε = 0 gives -log σ(β·L); ε = 0.1 gives -(0.9)·log σ(β·L) - 0.1·log σ(-β·L)."""
    assert_close(run("aot"), [-log_sigmoid(-3.0), -log_sigmoid(1.5)])
    assert_close(run("aot", label_smoothing=0.1), [-0.9 * log_sigmoid(z) - 0.1 * log_sigmoid(-z) for z in (-3.0, 1.5)])


def test_aot_unpaired():
    """sort(c) = [-2, 1], sort(r) = [-2, 4]; L = [0, -3], β·L = [0, -1.5]."""
    assert_close(run("aot_unpaired"), [LN2, -log_sigmoid(-1.5)])


def test_apo_zero():
    """(1 - σ(β·c)) + σ(β·r), β·c = [0.5, -1], β·r = [-1, 2]."""
    assert_close(run("apo_zero"), [1 - sigma(0.5) + sigma(-1.0), 1 - sigma(-1.0) + sigma(2.0)])


def test_apo_down():
    """σ(β·c) + 1 - σ(β·(c - r)), β·(c - r) = [1.5, -3]."""
    assert_close(run("apo_down"), [sigma(0.5) + 1 - sigma(1.5), sigma(-1.0) + 1 - sigma(-3.0)])


@pytest.mark.parametrize("tau", [0.05, 2.0])
def test_discopop(tau):
    """z = β·h, m = σ(z/τ): (1 - m)·(-log σ(z)) + m·e^(-z)."""
    expected = [(1 - sigma(z / tau)) * -log_sigmoid(z) + sigma(z / tau) * math.exp(-z) for z in (1.5, -3.0)]
    assert_close(run("discopop", discopop_tau=tau), expected)


def test_sft():
    """NLL = -(Σ policy_chosen) / (Σ |y_w|) = 30 / 10 = 3 for every pair; a given nll_loss is used as is."""
    assert_close(run("sft"), [3.0, 3.0])
    assert_close(run("sft", nll_loss=torch.tensor(1.25, dtype=torch.float64)), [1.25, 1.25])


def test_sigmoid_norm():
    """-log σ(β·(c/|y_w| - r/|y_l|)): β·(1/4 + 2/8) = 0.25;  β·(-2/6 - 4/5) = -17/30."""
    assert_close(run("sigmoid_norm"), [-log_sigmoid(0.25), -log_sigmoid(0.5 * (-2 / 6 - 4 / 5))])


def test_simpo():
    """β = 2, γ = 1: -log σ(β·pc/|y_w| - β·pr/|y_l| - γ); the reference is not read.
    pair 1: 2·(-10/4) - 2·(-14/8) - 1 = -5 + 3.5 - 1 = -2.5;  pair 2: 2·(-20/6) - 2·(-15/5) - 1 = -20/3 + 6 - 1."""
    expected = [-log_sigmoid(-2.5), -log_sigmoid(-20 / 3 + 6 - 1)]
    assert_close(run("simpo", beta=2.0, simpo_gamma=1.0), expected)
    assert_close(run("simpo", beta=2.0, simpo_gamma=1.0, rc=[0.0, 0.0], rr=[-50.0, 3.0]), expected)


def test_dpop():
    """λ = 0.5: -log σ(β·(c - r - λ·max(0, -c))).
    pair 1: c = 1 ≥ 0, no penalty: -log σ(1.5);  pair 2: c = -2, penalty 2: -log σ(0.5·(-6 - 1)) = -log σ(-3.5)."""
    assert_close(run("dpop", dpop_lambda=0.5), [-log_sigmoid(1.5), -log_sigmoid(-3.5)])


def test_rdpo():
    """α = 0.1: -log σ(β·h + α·(|y_w| - |y_l|)): 1.5 + 0.1·(4 - 8) = 1.1;  -3 + 0.1·(6 - 5) = -2.9."""
    assert_close(run("rdpo", rdpo_alpha=0.1), [-log_sigmoid(1.1), -log_sigmoid(-2.9)])


def test_orpo():
    """m = summed log-prob / |y|: m_w = [-10/4, -20/6], m_l = [-14/8, -15/5];
    log odds(y) = m - log(1 - e^m);  ℓ = NLL - β·log σ(log odds(y_w) - log odds(y_l)), NLL = 30/10 = 3, β = 0.5."""
    def log_odds(m):
        return m - math.log(1 - math.exp(m))

    expected = [3.0 - 0.5 * log_sigmoid(log_odds(mw) - log_odds(ml)) for mw, ml in ((-2.5, -1.75), (-20 / 6, -3.0))]
    assert_close(run("orpo"), expected)


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_f_divergences(loss_type):
    """Scores s(c), s(r) with c = [1, -2], r = [-2, 4]:
    forward_kl: s(x) = 1 - e^(-x);  js_divergence: ln2 + log σ(x);  alpha_divergence α=0.5: (e^(-x/2) - 1)/(-0.5).
    sigmoid: -log σ(β·(s(c) - s(r)));  ipo: (s(c)/|y_w| - s(r)/|y_l| - 1)², |y_w| = [4, 6], |y_l| = [8, 5]."""
    scores = {
        "forward_kl": lambda x: 1 - math.exp(-x),
        "js_divergence": lambda x: LN2 + log_sigmoid(x),
        "alpha_divergence": lambda x: (math.exp(-0.5 * x) - 1) / -0.5,
    }
    for name, s in scores.items():
        if loss_type == "sigmoid":
            expected = [-log_sigmoid(BETA * (s(c) - s(r))) for c, r in zip(C, R)]
        else:
            expected = [(s(c) / lw - s(r) / ll - 1) ** 2 for c, r, lw, ll in zip(C, R, LW, LL)]
        assert_close(run(loss_type, f_divergence_type=name, f_alpha_divergence_coef=0.5), expected)


def test_rewards_are_beta_times_logratios_detached():
    """chosen_rewards = β·c = [0.5, -1], rejected_rewards = β·r = [-1, 2], whatever the loss (no length division for
    ipo, no f-score for forward_kl); with reference_free they are β·policy."""
    pc = t64(PC).requires_grad_()
    for options in ({"loss_type": "ipo"}, {"loss_type": "sigmoid", "f_divergence_type": "forward_kl"}):
        _, chosen, rejected = dpo_loss(pc, t64(PR), t64(RC), t64(RR), beta=BETA, chosen_lengths=torch.tensor(LW),
                                       rejected_lengths=torch.tensor(LL), **options)
        assert_close(chosen.tolist(), [0.5, -1.0])
        assert_close(rejected.tolist(), [-1.0, 2.0])
        assert not chosen.requires_grad and not rejected.requires_grad
    _, chosen, rejected = dpo_loss(pc, t64(PR), None, None, beta=BETA, reference_free=True)
    assert_close(chosen.tolist(), [-5.0, -10.0])
    assert_close(rejected.tolist(), [-7.0, -7.5])


# --------------------------------------------------------------------------------------------------------
# Gradient (DPO paper §4, the gradient of Eq. 7) and identities.
# --------------------------------------------------------------------------------------------------------


def test_dpo_gradient_matches_paper():
    """∂ℓ/∂log π(y_w) = -β·σ(-β·h) and ∂ℓ/∂log π(y_l) = +β·σ(-β·h); the reference gets no gradient."""
    pc, pr = t64([-3.0, -8.0, -1.0]).requires_grad_(), t64([-5.0, -2.0, -1.0]).requires_grad_()
    rc, rr = t64([-4.0, -6.0, -2.0]), t64([-4.5, -3.0, -0.5])
    losses, _, _ = dpo_loss(pc, pr, rc, rr, beta=0.3)
    losses.sum().backward()
    h = [(a - b) - (c - d) for a, b, c, d in zip([-3, -8, -1], [-5, -2, -1], [-4, -6, -2], [-4.5, -3, -0.5])]
    assert_close(pc.grad.tolist(), [-0.3 * sigma(-0.3 * x) for x in h])
    assert_close(pr.grad.tolist(), [0.3 * sigma(-0.3 * x) for x in h])


def random_batch(batch_size=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    logps = [-torch.rand(batch_size, generator=g, dtype=torch.float64) * 30 for _ in range(4)]
    lengths = [torch.randint(1, 20, (batch_size,), generator=g) for _ in range(2)]
    return logps, lengths


def test_robust_is_sigmoid_minus_linear_term():
    """ℓ_robust = ℓ_sigmoid - ε/(1-2ε)·β·h, per pair (ε = 0.2, β = 0.3)."""
    (pc, pr, rc, rr), _ = random_batch()
    h = (pc - rc) - (pr - rr)
    robust, _, _ = dpo_loss(pc, pr, rc, rr, loss_type="robust", beta=0.3, label_smoothing=0.2)
    plain, _, _ = dpo_loss(pc, pr, rc, rr, loss_type="sigmoid", beta=0.3)
    torch.testing.assert_close(robust, plain - 0.2 / 0.6 * 0.3 * h)


@pytest.mark.parametrize("eps", [0.0, 0.3])
def test_aot_with_one_pair_is_cdpo(eps):
    (pc, pr, rc, rr), _ = random_batch(batch_size=1)
    aot, _, _ = dpo_loss(pc, pr, rc, rr, loss_type="aot", beta=0.3, label_smoothing=eps)
    cdpo, _, _ = dpo_loss(pc, pr, rc, rr, loss_type="sigmoid", beta=0.3, label_smoothing=eps)
    torch.testing.assert_close(aot, cdpo)


def test_cdpo_half_smoothing_is_symmetric_under_swap():
    """ε = 0.5: ½·(-log σ(βh) - log σ(-βh)) is even in h, so swapping chosen and rejected changes nothing."""
    (pc, pr, rc, rr), _ = random_batch()
    forward, _, _ = dpo_loss(pc, pr, rc, rr, beta=0.3, label_smoothing=0.5)
    swapped, _, _ = dpo_loss(pr, pc, rr, rc, beta=0.3, label_smoothing=0.5)
    torch.testing.assert_close(forward, swapped)
    plain_forward, _, _ = dpo_loss(pc, pr, rc, rr, beta=0.3)
    plain_swapped, _, _ = dpo_loss(pr, pc, rr, rc, beta=0.3)
    assert not torch.allclose(plain_forward, plain_swapped)  # plain DPO is not symmetric


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "hinge"])
def test_alpha_divergence_at_one_is_reverse_kl(loss_type):
    (pc, pr, rc, rr), (lw, ll) = random_batch()
    kwargs = dict(loss_type=loss_type, beta=0.3, chosen_lengths=lw, rejected_lengths=ll)
    alpha, _, _ = dpo_loss(pc, pr, rc, rr, f_divergence_type="alpha_divergence", f_alpha_divergence_coef=1.0, **kwargs)
    reverse, _, _ = dpo_loss(pc, pr, rc, rr, **kwargs)
    torch.testing.assert_close(alpha, reverse)


def test_sigmoid_norm_with_unit_lengths_is_sigmoid():
    (pc, pr, rc, rr), _ = random_batch()
    ones = torch.ones(5, dtype=torch.long)
    norm, _, _ = dpo_loss(pc, pr, rc, rr, loss_type="sigmoid_norm", beta=0.3, chosen_lengths=ones,
                          rejected_lengths=ones)
    plain, _, _ = dpo_loss(pc, pr, rc, rr, beta=0.3)
    torch.testing.assert_close(norm, plain)


def test_multi_loss_is_weighted_sum_of_single_losses():
    """MPO: ["sigmoid", "bco_pair", "sft"] with [0.8, 0.2, 1.0] = 0.8·sigmoid + 0.2·bco_pair + 1.0·sft, per pair."""
    (pc, pr, rc, rr), (lw, ll) = random_batch()
    kwargs = dict(beta=0.3, chosen_lengths=lw, rejected_lengths=ll)
    mixed, _, _ = dpo_loss(pc, pr, rc, rr, loss_type=["sigmoid", "bco_pair", "sft"], loss_weights=[0.8, 0.2, 1.0],
                           **kwargs)
    single = {t: dpo_loss(pc, pr, rc, rr, loss_type=t, **kwargs)[0] for t in ("sigmoid", "bco_pair", "sft")}
    torch.testing.assert_close(mixed, 0.8 * single["sigmoid"] + 0.2 * single["bco_pair"] + single["sft"])
    unweighted, _, _ = dpo_loss(pc, pr, rc, rr, loss_type=["sigmoid", "bco_pair"], **kwargs)
    torch.testing.assert_close(unweighted, single["sigmoid"] + single["bco_pair"])


def test_rpo_alpha_is_an_sft_term():
    """rpo_alpha = α adds α·NLL per pair, the same as loss_type + ["sft"] with weight α (with pair weights too)."""
    (pc, pr, rc, rr), (lw, ll) = random_batch()
    p = torch.linspace(0.5, 1.5, 5, dtype=torch.float64)
    kwargs = dict(beta=0.3, chosen_lengths=lw, rejected_lengths=ll, pair_weights=p)
    rpo, _, _ = dpo_loss(pc, pr, rc, rr, rpo_alpha=0.7, **kwargs)
    listed, _, _ = dpo_loss(pc, pr, rc, rr, loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.7], **kwargs)
    torch.testing.assert_close(rpo, listed)
    nll = -pc.sum() / lw.sum()
    torch.testing.assert_close(rpo, p * dpo_loss(pc, pr, rc, rr, beta=0.3)[0] + 0.7 * p * nll)


def test_pair_weights_multiply_every_term():
    (pc, pr, rc, rr), (lw, ll) = random_batch()
    p = torch.linspace(0.1, 2.0, 5, dtype=torch.float64)
    kwargs = dict(loss_type=["ipo", "sft"], loss_weights=[0.5, 2.0], beta=0.3, chosen_lengths=lw, rejected_lengths=ll)
    weighted, _, _ = dpo_loss(pc, pr, rc, rr, pair_weights=p, **kwargs)
    unweighted, _, _ = dpo_loss(pc, pr, rc, rr, **kwargs)
    torch.testing.assert_close(weighted, p * unweighted)


def test_reference_free_takes_reference_as_zero():
    (pc, pr, rc, rr), _ = random_batch()
    free, _, _ = dpo_loss(pc, pr, rc, rr, beta=0.3, reference_free=True)
    zero, _, _ = dpo_loss(pc, pr, torch.zeros_like(rc), torch.zeros_like(rr), beta=0.3)
    torch.testing.assert_close(free, zero)


# --------------------------------------------------------------------------------------------------------
# Stability: fp32, |h| up to 1e4.
# --------------------------------------------------------------------------------------------------------



def extreme_inputs():
    """β = 1, pairs with h = c - r = +1e4, -1e4 and 0 (log-probs all ≤ 0, lengths 1)."""
    pc = torch.tensor([-1.0, -10001.0, -5000.0], requires_grad=True)
    pr = torch.tensor([-10001.0, -1.0, -5000.0], requires_grad=True)
    rc, rr = torch.tensor([-1.0, -1.0, -5000.0]), torch.tensor([-1.0, -1.0, -5000.0])
    return pc, pr, rc, rr


def options_for(loss_type):
    return {"exo_pair": {"label_smoothing": 1e-3}, "robust": {"label_smoothing": 0.1}}.get(loss_type, {})


def assert_finite_grads(*tensors):
    """A tensor the loss does not read (e.g. rejected for sft) has no gradient, which is fine."""
    for t in tensors:
        assert t.grad is None or torch.isfinite(t.grad).all(), t.grad


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_finite_loss_and_gradient_at_extreme_margins(loss_type):
    """Every formula, discopop included with its default τ = 0.05 (its growth is then linear, see its docstring)."""
    pc, pr, rc, rr = extreme_inputs()
    ones = torch.ones(3, dtype=torch.long)
    losses, _, _ = dpo_loss(pc, pr, rc, rr, loss_type=loss_type, beta=1.0, chosen_lengths=ones, rejected_lengths=ones,
                            **options_for(loss_type))
    losses.sum().backward()
    assert torch.isfinite(losses).all(), losses
    assert_finite_grads(pc, pr)


@pytest.mark.parametrize("f_divergence_type", ["js_divergence", "alpha_divergence"])
def test_finite_with_bounded_f_divergences_at_extreme_margins(f_divergence_type):
    """alpha_divergence is clamped at (α-1)·x ≤ 80, so e^80 stays finite in fp32."""
    pc, pr, rc, rr = extreme_inputs()
    losses, _, _ = dpo_loss(pc, pr, rc, rr, beta=1.0, f_divergence_type=f_divergence_type)
    losses.sum().backward()
    assert torch.isfinite(losses).all() and torch.isfinite(pc.grad).all() and torch.isfinite(pr.grad).all()


def test_unbounded_formulas_overflow_as_documented():
    """discopop with τ = 2 grows like e^((1 - 1/τ)·|z|) = e^5000 at z = -1e4, and forward_kl's e^(-x) is e^1e4:
    both overflow fp32, as their docstrings say."""
    pc, pr, rc, rr = extreme_inputs()
    discopop, _, _ = dpo_loss(pc, pr, rc, rr, loss_type="discopop", beta=1.0, discopop_tau=2.0)
    assert torch.isfinite(discopop[[0, 2]]).all() and torch.isposinf(discopop[1])
    forward, _, _ = dpo_loss(pc, pr, rc, rr, beta=1.0, f_divergence_type="forward_kl")
    assert not torch.isfinite(forward).all()


def test_orpo_finite_when_policy_is_certain():
    """A completion with log-prob 0 (probability 1) has infinite odds; the loss and gradient stay finite."""
    pc, pr = torch.tensor([0.0, -2.0], requires_grad=True), torch.tensor([-3.0, 0.0], requires_grad=True)
    lengths = torch.tensor([2, 2])
    losses, _, _ = dpo_loss(pc, pr, None, None, loss_type="orpo", reference_free=True, chosen_lengths=lengths,
                            rejected_lengths=lengths)
    losses.sum().backward()
    assert torch.isfinite(losses).all() and torch.isfinite(pc.grad).all() and torch.isfinite(pr.grad).all()


# --------------------------------------------------------------------------------------------------------
# Configuration constants and bad input: each a ValueError that says what to change.
# --------------------------------------------------------------------------------------------------------


def test_constants():
    trl_types = ["sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
                 "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm"]
    assert LOSS_TYPES == trl_types + ["simpo", "dpop", "rdpo", "orpo"]
    assert F_DIVERGENCE_LOSSES == {"sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust", "discopop", "sft"}
    assert LENGTH_LOSSES == {"ipo", "sigmoid_norm", "simpo", "rdpo", "orpo"}
    assert check_loss_config("sigmoid") == ["sigmoid"]
    assert check_loss_config(("sigmoid", "sft"), loss_weights=[1.0, 0.5]) == ["sigmoid", "sft"]


@pytest.mark.parametrize("kwargs, message", [
    (dict(loss_type="dpo"), r"Unknown loss_type \['dpo'\]\. Valid names: sigmoid, hinge, ipo, .*, orpo"),
    (dict(loss_type=[]), r"loss_type is empty"),
    (dict(loss_type=["sigmoid", "sft"], loss_weights=[1.0]), r"loss_weights has 1 entries but loss_type has 2"),
    (dict(loss_type="exo_pair"), r"'exo_pair' needs 0 < label_smoothing < 1 .* got 0\.0.*1e-3"),
    (dict(loss_type="robust", label_smoothing=0.5), r"'robust' needs label_smoothing in \[0, 0\.5\).*got 0\.5"),
    (dict(loss_type="robust", label_smoothing=-0.1), r"'robust' needs label_smoothing in \[0, 0\.5\).*got -0\.1"),
    (dict(loss_type="sigmoid", label_smoothing=0.7), r"\['sigmoid'\] reads label_smoothing .* \[0, 0\.5\]; got 0\.7"),
    (dict(loss_type=["sigmoid", "nca_pair"], f_divergence_type="js_divergence"),
     r"f_divergence_type='js_divergence' cannot be used with loss_type \['nca_pair'\]: only \['discopop', "
     r"'exo_pair', 'hinge', 'ipo', 'robust', 'sft', 'sigmoid', 'sigmoid_norm'\] accept it.*"
     r"Use f_divergence_type='reverse_kl'"),
    (dict(loss_type="simpo", f_divergence_type="forward_kl"), r"cannot be used with loss_type \['simpo'\]"),
    (dict(loss_type="sigmoid", f_divergence_type="kl"), r"Unknown f_divergence_type 'kl'\. Valid names: reverse_kl"),
    (dict(loss_type="aot", use_weighting=True), r"use_weighting .* cannot be combined with loss_type \['aot'\]"),
])
def test_bad_config(kwargs, message):
    with pytest.raises(ValueError, match=message):
        check_loss_config(**kwargs)


def test_config_is_checked_once_by_check_loss_config():
    """dpo_loss trusts its options (checked once, before training); check_loss_config refuses the bad ones, beta
    included, and pair_weights' use_weighting."""
    with pytest.raises(ValueError, match=r"Unknown loss_type \['kto'\]"):
        check_loss_config("kto")
    with pytest.raises(ValueError, match=r"use_weighting .* \['aot_unpaired'\]"):
        check_loss_config("aot_unpaired", use_weighting=True)
    with pytest.raises(ValueError, match=r"beta must be > 0 .*got 0"):
        check_loss_config("sigmoid", beta=0)


def test_mismatched_shapes():
    x = t64([-1.0, -2.0])
    with pytest.raises(ValueError, match=r"policy_rejected_logps must be a 1-D tensor .* shape \(2,\) .* got \(3,\)"):
        dpo_loss(x, t64([-1.0, -2.0, -3.0]), x, x)
    with pytest.raises(ValueError, match=r"policy_chosen_logps must be a 1-D tensor \[B\] .* got \(2, 4\)"):
        dpo_loss(torch.zeros(2, 4), x, x, x)
    with pytest.raises(ValueError, match=r"reference_chosen_logps must be a 1-D tensor .* got \(2, 1\)"):
        dpo_loss(x, x, x[:, None], x)
    with pytest.raises(ValueError, match=r"pair_weights must be a 1-D tensor .* got \(1,\)"):
        dpo_loss(x, x, x, x, pair_weights=t64([1.0]))
    with pytest.raises(ValueError, match=r"chosen_lengths must be a 1-D tensor .* got \(3,\)"):
        dpo_loss(x, x, x, x, loss_type="ipo", chosen_lengths=torch.tensor([1, 2, 3]),
                 rejected_lengths=torch.tensor([1, 2]))


@pytest.mark.parametrize("loss_type", sorted(LENGTH_LOSSES))
def test_missing_lengths(loss_type):
    x = t64([-1.0, -2.0])
    with pytest.raises(ValueError, match=rf"loss_type \['{loss_type}'\] needs chosen_lengths and rejected_lengths"):
        dpo_loss(x, x, x, x, loss_type=loss_type, chosen_lengths=torch.tensor([1, 2]))


def test_missing_nll_inputs_and_bad_lengths():
    x = t64([-1.0, -2.0])
    with pytest.raises(ValueError, match=r"NLL term .* needs nll_loss .* or chosen_lengths"):
        dpo_loss(x, x, x, x, loss_type="sft")
    with pytest.raises(ValueError, match=r"NLL term .* needs nll_loss"):
        dpo_loss(x, x, x, x, rpo_alpha=0.5)
    with pytest.raises(ValueError, match=r"rejected_lengths must be positive token counts; rows \[1\] are <= 0"):
        dpo_loss(x, x, x, x, loss_type="ipo", chosen_lengths=torch.tensor([1, 2]),
                 rejected_lengths=torch.tensor([3, 0]))

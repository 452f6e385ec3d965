"""Every preference loss of this project, each written out as its paper's formula.

Inputs are per-pair *summed* completion log-probs, so everything here is a function of four [B] tensors
(policy and reference, chosen y_w and rejected y_l) plus, for a few variants, the completion lengths |y|.
Notation used in every docstring (TRL 1.16 `DPOTrainer._compute_loss` names; docs/notation.md maps them to the
notebook and the paper):

    ρ_w = log π(y_w|x) − log π_ref(y_w|x)       chosen_logratios    (TRL logs β·ρ_w as rewards/chosen)
    ρ_l = log π(y_l|x) − log π_ref(y_l|x)       rejected_logratios  (β·ρ_l: rewards/rejected)
    s(·)                                       f-divergence score, the identity by default (see `reverse_kl`)
    Δ = s(ρ_w) − s(ρ_l)                        delta_score, the margin (= ρ_w − ρ_l by default)
                                               (β·Δ is TRL's rewards/margins)
    β = beta,  ε = label_smoothing,  σ = sigmoid, log σ computed with F.logsigmoid (stable for any input)

`dpo_loss` returns one loss per pair; the caller takes the mean, which equals TRL's `Σ_k loss_weights[k] ·
mean_i ℓ_k(i)` for a list of loss types.
"""

import math

import torch
import torch.nn.functional as F


# ------------------------------------------------------------------------------------------------------------
# DPO (`sigmoid`) and its variants. Each takes the named quantities it needs (see `dpo_loss`), returns ℓ per
# pair [B]. The first fifteen are TRL 1.16's loss types with TRL's exact formulas; the rest go beyond TRL.
# ------------------------------------------------------------------------------------------------------------


def sigmoid(delta_score, beta, label_smoothing, **_):
    """DPO, and conservative DPO (cDPO) when ε > 0:   ℓ = −(1−ε)·log σ(β·Δ) − ε·log σ(−β·Δ)

    DPO: "Direct Preference Optimization: Your Language Model is Secretly a Reward Model", Rafailov et al.,
    2023, arXiv:2305.18290, Eq. 7 (ε = 0). cDPO: "A note on DPO with noisy preferences & relationship to IPO",
    Mitchell, 2023 (ericmitchell.ai/cdpo.pdf, no arXiv id), Eq. 3. β: strength of the implicit KL pull toward
    the reference (smaller β lets the policy move further). ε: the probability that a preference label is
    flipped. Beyond TRL 1.16: its `sigmoid` ignores label_smoothing; here ε = 0 gives exactly TRL's value.
    """
    return -(1 - label_smoothing) * F.logsigmoid(beta * delta_score) - label_smoothing * F.logsigmoid(
        -beta * delta_score
    )


def hinge(delta_score, beta, **_):
    """SLiC / RSO hinge:   ℓ = max(0, 1 − β·Δ)

    "SLiC-HF: Sequence Likelihood Calibration with Human Feedback", Zhao et al., 2023, arXiv:2305.10425 (its
    rank calibration loss, margin δ = 1/β); "Statistical Rejection Sampling Improves Preference Optimization"
    (RSO), Liu et al., 2023, arXiv:2309.06657 ("hinge-norm" with γ = β). β: 1/margin.
    """
    return torch.relu(1 - beta * delta_score)


def ipo(chosen_scores, rejected_scores, chosen_lengths, rejected_lengths, beta, **_):
    """IPO with length-averaged log-ratios (as TRL):   ℓ = ( s(ρ_w)/|y_w| − s(ρ_l)/|y_l| − 1/(2β) )²

    "A General Theoretical Paradigm to Understand Learning from Human Preferences", Gheshlaghi Azar et al.,
    2023, arXiv:2310.12036, Eq. 17 (the paper's τ is β). The division by the completion lengths is TRL's,
    which says it was confirmed with the authors. Unbounded: a square.
    """
    ipo_delta = chosen_scores / chosen_lengths - rejected_scores / rejected_lengths
    return (ipo_delta - 1 / (2 * beta)) ** 2


def exo_pair(delta_score, beta, label_smoothing, **_):
    """EXO, pairwise:   ℓ = σ(z)·(log σ(z) − log(1−ε)) + σ(−z)·(log σ(−z) − log ε),   z = β·Δ

    = KL( Bernoulli(σ(z)) ‖ Bernoulli(1−ε) ). "Towards Efficient Exact Optimization of Language Model
    Alignment", Ji et al., 2024, arXiv:2402.00856, Eq. 16 with K = 2. ε > 0 is the target probability of the
    rejected completion (the paper recommends 1e-3).
    """
    z = beta * delta_score
    return torch.sigmoid(z) * (F.logsigmoid(z) - math.log1p(-label_smoothing)) + torch.sigmoid(-z) * (
        F.logsigmoid(-z) - math.log(label_smoothing)
    )


def nca_pair(chosen_logratios, rejected_logratios, beta, **_):
    """NCA, pairwise:   ℓ = −log σ(β·ρ_w) − ½·log σ(−β·ρ_w) − ½·log σ(−β·ρ_l)

    "Noise Contrastive Alignment of Language Models with Explicit Rewards", Chen et al., 2024,
    arXiv:2402.05369. Scores each completion on its own (raw log-ratios ρ_w and ρ_l), so the chosen likelihood
    is pushed up absolutely.
    """
    return (
        -F.logsigmoid(beta * chosen_logratios)
        - 0.5 * F.logsigmoid(-beta * chosen_logratios)
        - 0.5 * F.logsigmoid(-beta * rejected_logratios)
    )


def robust(delta_score, beta, label_smoothing, **_):
    """Robust DPO:   ℓ = [ −(1−ε)·log σ(β·Δ) + ε·log σ(−β·Δ) ] / (1 − 2ε)   = −log σ(β·Δ) − ε/(1−2ε)·β·Δ

    "Provably Robust DPO: Aligning Language Models with Noisy Feedback", Ray Chowdhury et al., 2024,
    arXiv:2403.00409. ε ∈ [0, 0.5): the label flip rate; the loss is an unbiased estimate of the clean DPO
    loss. Unbounded below in Δ (the linear term), finite for finite Δ.
    """
    clean = -(1 - label_smoothing) * F.logsigmoid(beta * delta_score)
    flipped = -label_smoothing * F.logsigmoid(-beta * delta_score)
    return (clean - flipped) / (1 - 2 * label_smoothing)


def bco_pair(chosen_logratios, rejected_logratios, beta, **_):
    """BCO, pairwise (TRL 1.16 form, without the reward shift δ):   ℓ = −log σ(β·ρ_w) − log σ(−β·ρ_l)

    "Binary Classifier Optimization for Large Language Model Alignment", Jung et al., 2024, arXiv:2404.04656.
    """
    return -F.logsigmoid(beta * chosen_logratios) - F.logsigmoid(-beta * rejected_logratios)


def sppo_hard(chosen_logratios, rejected_logratios, beta, **_):
    """SPPO, hard labels:   ℓ = (ρ_w − 1/(2β))² + (ρ_l + 1/(2β))²

    "Self-Play Preference Optimization for Language Model Alignment", Wu et al., 2024, arXiv:2405.00675, the
    squared loss of Algorithm 1 (Eq. 4.7 per TRL's source) with P = 1 for the winner and 0 for the loser. β =
    1/η. Unbounded: squares of *summed* log-ratios, so values are large.
    """
    return (chosen_logratios - 0.5 / beta) ** 2 + (rejected_logratios + 0.5 / beta) ** 2


def aot(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps, beta,
        label_smoothing, **_):
    """AOT, paired:   L = sort(π_w − π_l) − sort(π_ref,w − π_ref,l),   ℓ = −(1−ε)·log σ(β·L) − ε·log σ(−β·L)

    "Distributional Preference Alignment of LLMs via Optimal Transport", Melnyk et al., 2024,
    arXiv:2406.05882. The two ascending sorts over the micro-batch are independent, so ℓ_i is not tied to pair
    i and the result depends on the batch size; with one pair it is cDPO. ε as in cDPO.
    """
    logratios_sorted, _ = torch.sort(policy_chosen_logps - policy_rejected_logps, dim=0)
    ref_logratios_sorted, _ = torch.sort(reference_chosen_logps - reference_rejected_logps, dim=0)
    delta = logratios_sorted - ref_logratios_sorted
    return -(1 - label_smoothing) * F.logsigmoid(beta * delta) - label_smoothing * F.logsigmoid(-beta * delta)


def aot_unpaired(chosen_logratios, rejected_logratios, beta, label_smoothing, **_):
    """AOT, unpaired:   L = sort(ρ_w) − sort(ρ_l),   ℓ = −(1−ε)·log σ(β·L) − ε·log σ(−β·L)

    Same paper as `aot`: aligns the distribution of chosen log-ratios with that of rejected ones.
    """
    delta = torch.sort(chosen_logratios, dim=0)[0] - torch.sort(rejected_logratios, dim=0)[0]
    return -(1 - label_smoothing) * F.logsigmoid(beta * delta) - label_smoothing * F.logsigmoid(-beta * delta)


def apo_zero(chosen_logratios, rejected_logratios, beta, **_):
    """APO-zero:   ℓ = (1 − σ(β·ρ_w)) + σ(β·ρ_l)

    "Anchored Preference Optimization and Contrastive Revisions: Addressing Underspecification in Alignment",
    D'Oosterlinck et al., 2024, arXiv:2408.06266, Eq. 7. For chosen completions better than the model's own.
    """
    return (1 - torch.sigmoid(beta * chosen_logratios)) + torch.sigmoid(beta * rejected_logratios)


def apo_down(chosen_logratios, rejected_logratios, beta, **_):
    """APO-down:   ℓ = σ(β·ρ_w) + (1 − σ(β·(ρ_w − ρ_l)))

    Same paper as `apo_zero`, Eq. 8. For chosen completions worse than the model's own: push both down, the
    rejected one further.
    """
    margin = chosen_logratios - rejected_logratios
    return torch.sigmoid(beta * chosen_logratios) + (1 - torch.sigmoid(beta * margin))


def discopop(delta_score, beta, discopop_tau, **_):
    """DiscoPOP (log-ratio modulated loss):   ℓ = (1 − g)·(−log σ(z)) + g·e^(−z),   z = β·Δ,  g = σ(z/τ)

    "Discovering Preference Optimization Algorithms with and for Large Language Models", Lu et al., 2024,
    arXiv:2406.08414, Eq. 5. τ = discopop_tau (0.05) sets how sharply the mix moves from the logistic to the
    exponential term. Unbounded: for z ≪ 0 the loss grows like |z| when τ < 1, but like e^((1 − 1/τ)·|z|) when
    τ > 1, which overflows fp32 once that exponent passes 88.
    """
    z = beta * delta_score
    gate = torch.sigmoid(z / discopop_tau)
    # g·e^(−z) computed as one exponential: for z ≪ 0, g underflows to 0 and e^(−z) to inf, and 0·inf = nan
    return (1 - gate) * -F.logsigmoid(z) + torch.exp(F.logsigmoid(z / discopop_tau) - z)


def sft(policy_chosen_logps, nll, **_):
    """SFT / NLL term:   ℓ = −Σ_i Σ_t log π(y_w,t | x, y_w,<t) / Σ_i |y_w|   (one scalar, the same per pair)

    The token-mean negative log-likelihood of the chosen completions over the micro-batch, exactly TRL 1.16's
    `sft`. Plain NLL; in a list it gives RPO, "Iterative Reasoning Preference Optimization", Pang et al.,
    2024, arXiv:2404.19733 (["sigmoid", "sft"], weights [1, α]), and MPO, Wang et al., 2024, arXiv:2411.10442.
    """
    return nll.expand(policy_chosen_logps.shape[0])


def sigmoid_norm(chosen_scores, rejected_scores, chosen_lengths, rejected_lengths, beta, **_):
    """Length-normalised DPO:   ℓ = −log σ( β·( s(ρ_w)/|y_w| − s(ρ_l)/|y_l| ) )

    The "DPO w/ LN" ablation of SimPO ("SimPO: Simple Preference Optimization with a Reference-Free Reward",
    Meng et al., 2024, arXiv:2405.14734) and the DPO-norm of Tülu 3 (Lambert et al., 2024, arXiv:2411.15124).
    """
    return -F.logsigmoid(beta * (chosen_scores / chosen_lengths - rejected_scores / rejected_lengths))


def simpo(policy_chosen_logps, policy_rejected_logps, chosen_lengths, rejected_lengths, beta, simpo_gamma,
          **_):
    """SimPO:   ℓ = −log σ( β/|y_w|·log π(y_w|x) − β/|y_l|·log π(y_l|x) − γ )

    "SimPO: Simple Preference Optimization with a Reference-Free Reward", Meng et al., 2024, arXiv:2405.14734,
    Eq. 6. Reference-free: the reward is the policy's average log-prob scaled by β (the paper uses β ≈ 2-10).
    γ = simpo_gamma, the target reward margin (in reward units, not divided by β). Beyond TRL 1.16's
    DPOTrainer.
    """
    margin = beta * policy_chosen_logps / chosen_lengths - beta * policy_rejected_logps / rejected_lengths
    return -F.logsigmoid(margin - simpo_gamma)


def dpop(chosen_logratios, rejected_logratios, beta, dpop_lambda, **_):
    """DPO-Positive:   ℓ = −log σ( β·( ρ_w − ρ_l − λ·max(0, −ρ_w) ) )

    max(0, −ρ_w) = max(0, log π_ref(y_w|x) − log π(y_w|x)) penalises the policy for making the chosen
    completion less likely than the reference did, a failure mode of DPO on pairs with a small edit distance.
    "Smaug: Fixing Failure Modes of Preference Optimisation with DPO-Positive", Pal et al., 2024,
    arXiv:2402.13228, Eq. 3. λ = dpop_lambda (the paper uses 50). Beyond TRL 1.16.
    """
    penalty = torch.relu(-chosen_logratios)
    return -F.logsigmoid(beta * (chosen_logratios - rejected_logratios - dpop_lambda * penalty))


def rdpo(chosen_logratios, rejected_logratios, chosen_lengths, rejected_lengths, beta, rdpo_alpha, **_):
    """Length-regularised DPO (R-DPO):   ℓ = −log σ( β·(ρ_w − ρ_l) + α·(|y_w| − |y_l|) )

    "Disentangling Length from Quality in Direct Preference Optimization", Park et al., 2024,
    arXiv:2403.19159: DPO derived for the reward r(x, y) − α·|y|. When the chosen completion is longer the
    margin grows by α per extra token, so less of the preference is learned as "longer is better". α =
    rdpo_alpha. Beyond TRL 1.16.
    """
    length_margin = rdpo_alpha * (chosen_lengths - rejected_lengths)
    return -F.logsigmoid(beta * (chosen_logratios - rejected_logratios) + length_margin)


def orpo(policy_chosen_logps, policy_rejected_logps, chosen_lengths, rejected_lengths, beta, nll, **_):
    """ORPO, with its SFT term:   ℓ = L_SFT − λ·log σ( log odds(y_w) − log odds(y_l) )

    odds(y) = P(y)/(1 − P(y)) with log P(y) = m = (summed log-prob)/|y|, the mean per-token log-prob, so log
    odds(y) = m − log(1 − e^m). "ORPO: Monolithic Preference Optimization without Reference Model", Hong et
    al., 2024, arXiv:2403.07691, Eq. 6 (L_ORPO = L_SFT + λ·L_OR) and Eq. 7 (L_OR = −log σ(log odds ratio)). λ
    = beta, as in TRL's experimental ORPOTrainer (`losses = beta * logsigmoid(log_odds)`, loss = nll − mean).
    L_SFT is the same token-mean NLL as `sft` over the *completion* (TRL's ORPOTrainer also counts prompt
    tokens). Reference-free. Beyond TRL 1.16's DPOTrainer.
    """
    # A completion the policy is certain of (m = 0) has infinite odds; capping m keeps loss and gradient
    # finite.
    chosen_m = (policy_chosen_logps / chosen_lengths).clamp(max=-1e-6)
    rejected_m = (policy_rejected_logps / rejected_lengths).clamp(max=-1e-6)
    # log(1 − e^m) as log(−expm1(m)): no cancellation as m → 0, and an absolute error of ~1 ulp for every m <
    # 0
    log_1m_chosen, log_1m_rejected = torch.log(-torch.expm1(chosen_m)), torch.log(-torch.expm1(rejected_m))
    log_odds = (chosen_m - rejected_m) - (log_1m_chosen - log_1m_rejected)
    return nll - beta * F.logsigmoid(log_odds)


# ------------------------------------------------------------------------------------------------------------
# f-divergence scores s(x), applied to ρ_w and ρ_l before Δ = s(ρ_w) − s(ρ_l).
# "Beyond Reverse KL: Generalizing Direct Preference Optimization with Diverse Divergence Constraints",
# Wang et al., 2023, arXiv:2309.16240. s is f'(u) at u = π/π_ref = e^x; TRL 1.16 keeps the additive constants,
# which cancel in Δ but not after the length division of `ipo` and `sigmoid_norm`.
# ------------------------------------------------------------------------------------------------------------


def reverse_kl(x, **_):
    """s(x) = x   (f'(u) = log u): standard DPO."""
    return x


def forward_kl(x, **_):
    """s(x) = 1 − e^(−x)   (f'(u) = 1 − 1/u). Unbounded: e^(−x) overflows for very negative log-ratios."""
    return 1 - torch.exp(-x)


def js_divergence(x, **_):
    """s(x) = log 2 + log σ(x)   (f'(u) = log(2u / (1 + u)), Jensen-Shannon)."""
    return math.log(2) + F.logsigmoid(x)


def alpha_divergence(x, alpha, **_):
    """s(x) = (e^((α−1)·x) − 1) / (α − 1)   (f'(u) = (u^(α−1) − 1)/(α − 1)); the limit α → 1 is reverse KL.

    α = f_alpha_divergence_coef. As in TRL, (α−1)·x is clamped to ≤ 80 (≤ 11 in fp16) in at least fp32 so the
    exponential stays representable after casting back.
    """
    if abs(alpha - 1.0) < 1e-6:  # TRL's threshold: the formula is 0/0 at α = 1, its limit is x
        return x
    t = (alpha - 1.0) * x
    t_wide = t.float() if t.dtype in (torch.float16, torch.bfloat16) else t
    t_wide = t_wide.clamp(max=11.0 if t.dtype == torch.float16 else 80.0)
    return (torch.exp(t_wide) - 1.0).to(t.dtype) / (alpha - 1.0)


F_DIVERGENCES = {
    "reverse_kl": reverse_kl,
    "forward_kl": forward_kl,
    "js_divergence": js_divergence,
    "alpha_divergence": alpha_divergence,
}


LOSSES = {
    "sigmoid": sigmoid,
    "hinge": hinge,
    "ipo": ipo,
    "exo_pair": exo_pair,
    "nca_pair": nca_pair,
    "robust": robust,
    "bco_pair": bco_pair,
    "sppo_hard": sppo_hard,
    "aot": aot,
    "aot_unpaired": aot_unpaired,
    "apo_zero": apo_zero,
    "apo_down": apo_down,
    "discopop": discopop,
    "sft": sft,
    "sigmoid_norm": sigmoid_norm,
    "simpo": simpo,
    "dpop": dpop,
    "rdpo": rdpo,
    "orpo": orpo,
}
LOSS_TYPES = list(LOSSES)
# The β·log Z(x) term of an f-divergence reparameterisation cancels only in the chosen − rejected difference,
# so TRL 1.16 allows a non-default f_divergence_type only with these losses.
F_DIVERGENCE_LOSSES = frozenset({"sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust", "discopop",
                                 "sft"})
LENGTH_LOSSES = frozenset({"ipo", "sigmoid_norm", "simpo", "rdpo", "orpo"})
# the losses that read the chosen NLL: from nll_loss, else from the sums and chosen_lengths
_NLL_LOSSES = frozenset({"sft", "orpo"})


def check_loss_config(loss_type, loss_weights=None, label_smoothing=0.0, f_divergence_type="reverse_kl",
                      f_alpha_divergence_coef=0.5, use_weighting=False, beta=0.1, **_):
    """Validate the loss options once, before any model is loaded (dpo_loss does not check them again on every
    micro-batch); return loss_type as a list.

    Raises ValueError, naming the option and what to change, for: beta <= 0, an unknown or empty loss_type,
    len(loss_weights) ≠ len(loss_type), an unknown f_divergence_type or one a loss cannot take, exo_pair
    without 0 < ε < 1, robust without 0 ≤ ε < 0.5, sigmoid/aot/aot_unpaired without 0 ≤ ε ≤ 0.5, use_weighting
    with aot/aot_unpaired. Other keyword arguments are accepted and ignored, so a whole config can be passed.
    """
    if not beta > 0:
        raise ValueError(f"beta must be > 0 (ipo and sppo_hard divide by it); got {beta}.")
    loss_types = [loss_type] if isinstance(loss_type, str) else list(loss_type)
    if not loss_types:
        raise ValueError(f"loss_type is empty: give a name or a list of names from {LOSS_TYPES}.")
    unknown = [name for name in loss_types if name not in LOSSES]
    if unknown:
        raise ValueError(f"Unknown loss_type {unknown}. Valid names: {', '.join(LOSS_TYPES)}.")
    if loss_weights is not None and len(loss_weights) != len(loss_types):
        raise ValueError(
            f"loss_weights has {len(loss_weights)} entries but loss_type has {len(loss_types)} "
            f"({loss_types}): give one weight per loss type, or leave loss_weights unset for all 1.0."
        )
    if f_divergence_type not in F_DIVERGENCES:
        raise ValueError(
            f"Unknown f_divergence_type {f_divergence_type!r}. Valid names: {', '.join(F_DIVERGENCES)}.")
    cannot_take_f = [name for name in loss_types if name not in F_DIVERGENCE_LOSSES]
    if f_divergence_type != "reverse_kl" and cannot_take_f:
        raise ValueError(
            f"f_divergence_type={f_divergence_type!r} cannot be used with loss_type {cannot_take_f}: only "
            f"{sorted(F_DIVERGENCE_LOSSES)} accept it (the β·log Z(x) term cancels only in the chosen − "
            f"rejected difference). Use f_divergence_type='reverse_kl', or one of those loss types."
        )
    if "exo_pair" in loss_types and not 0 < label_smoothing < 1:
        raise ValueError(
            f"loss_type 'exo_pair' needs 0 < label_smoothing < 1 (its log ε is -inf at 0); got "
            f"{label_smoothing}. The EXO paper recommends label_smoothing=1e-3."
        )
    if "robust" in loss_types and not 0 <= label_smoothing < 0.5:
        raise ValueError(
            f"loss_type 'robust' needs label_smoothing in [0, 0.5) (a label flip rate; it divides by "
            f"1 − 2ε); got {label_smoothing}."
        )
    smoothed = [name for name in loss_types if name in ("sigmoid", "aot", "aot_unpaired")]
    if smoothed and not 0 <= label_smoothing <= 0.5:
        raise ValueError(
            f"loss_type {smoothed} reads label_smoothing as a label flip probability, which must be in [0, "
            f"0.5]; got {label_smoothing}."
        )
    unweightable = [name for name in loss_types if name in ("aot", "aot_unpaired")]
    if use_weighting and unweightable:
        raise ValueError(
            f"use_weighting (WPO pair weights) cannot be combined with loss_type {unweightable}: these sort "
            f"the pairs, so a pair's weight would multiply another pair's loss. Turn use_weighting off or "
            f"pick another loss."
        )
    return loss_types


def _check_pair_tensor(name, tensor, batch_size):
    """A per-pair input must be a 1-D tensor with one value per pair."""
    if not torch.is_tensor(tensor) or tensor.dim() != 1 or tensor.shape[0] != batch_size:
        shape = tuple(tensor.shape) if torch.is_tensor(tensor) else type(tensor).__name__
        raise ValueError(
            f"{name} must be a 1-D tensor with one value per pair, shape ({batch_size},) like "
            f"policy_chosen_logps; got {shape}. Pass summed completion log-probs (sum per-token log-probs "
            f"over the completion first)."
        )


def _check_lengths(name, lengths):
    if (lengths <= 0).any():
        rows = torch.nonzero(lengths <= 0).flatten().tolist()
        raise ValueError(
            f"{name} must be positive token counts; rows {rows} are <= 0. Use "
            f"completion_mask.sum(1).clamp(min=1)."
        )


def _check_inputs(loss_types, rpo_alpha, reference_free, nll_loss, policy_chosen_logps, policy_rejected_logps,
                  reference_chosen_logps, reference_rejected_logps, pair_weights, chosen_lengths,
                  rejected_lengths):
    """The tensors dpo_loss is given: one value per pair, and the lengths and NLL the chosen losses need.
    Returns the lengths in the log-probs' dtype."""
    if not torch.is_tensor(policy_chosen_logps) or policy_chosen_logps.dim() != 1:
        shape = tuple(policy_chosen_logps.shape) if torch.is_tensor(policy_chosen_logps) else "not a tensor"
        raise ValueError(
            f"policy_chosen_logps must be a 1-D tensor [B] of summed completion log-probs; got {shape}.")
    batch_size = policy_chosen_logps.shape[0]
    for name, tensor in [("policy_rejected_logps", policy_rejected_logps),
                         ("reference_chosen_logps", reference_chosen_logps),
                         ("reference_rejected_logps", reference_rejected_logps),
                         ("pair_weights", pair_weights), ("chosen_lengths", chosen_lengths),
                         ("rejected_lengths", rejected_lengths)]:
        if tensor is not None and not (reference_free and name.startswith("reference")):
            _check_pair_tensor(name, tensor, batch_size)
    length_users = [name for name in loss_types if name in LENGTH_LOSSES]
    if length_users and (chosen_lengths is None or rejected_lengths is None):
        raise ValueError(
            f"loss_type {length_users} needs chosen_lengths and rejected_lengths: [B] completion token "
            f"counts, e.g. completion_mask.sum(1).clamp(min=1) for each half of the batch."
        )
    if (_NLL_LOSSES & set(loss_types) or rpo_alpha) and nll_loss is None and chosen_lengths is None:
        raise ValueError(
            "The NLL term (loss_type 'sft' or 'orpo', or rpo_alpha) needs nll_loss (the token-mean NLL of "
            "the chosen completions) or chosen_lengths to derive it from the summed log-probs; got neither."
        )
    lengths = []
    for name, value in (("chosen_lengths", chosen_lengths), ("rejected_lengths", rejected_lengths)):
        if value is not None:
            _check_lengths(name, value)
            value = value.to(policy_chosen_logps.dtype)
        lengths.append(value)
    return lengths


def dpo_loss(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps, *,
             loss_type="sigmoid", beta=0.1, loss_weights=None, chosen_lengths=None, rejected_lengths=None,
             label_smoothing=0.0, f_divergence_type="reverse_kl", f_alpha_divergence_coef=0.5,
             discopop_tau=0.05, rpo_alpha=None, reference_free=False, simpo_gamma=0.5, dpop_lambda=50.0,
             rdpo_alpha=0.01, pair_weights=None, nll_loss=None):
    """Preference loss per pair:  losses_i = Σ_k w_k·p_i·ℓ_k(i)  (+ rpo_alpha·p_i·NLL).

    Args:
        policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps:
            [B] summed completion log-probs log π(y|x) (reference ones under torch.no_grad()).
        loss_type: a name from LOSS_TYPES or a list of them, combined with loss_weights w_k (default all 1),
            e.g. MPO: ["sigmoid", "bco_pair", "sft"] with [0.8, 0.2, 1.0]. Checked by check_loss_config.
        beta, label_smoothing: β of every formula; ε of sigmoid (cDPO), robust, exo_pair, aot, aot_unpaired.
        chosen_lengths, rejected_lengths: [B] completion token counts, needed by LENGTH_LOSSES (and by
            sft / orpo / rpo_alpha when nll_loss is not given).
        f_divergence_type, f_alpha_divergence_coef: the score s applied to ρ_w and ρ_l.
        discopop_tau, simpo_gamma, dpop_lambda, rdpo_alpha: hyperparameters of those variants.
        rpo_alpha: if set, adds rpo_alpha·NLL per pair: exactly loss_type + ["sft"], weights + [rpo_alpha].
        reference_free: take the reference log-probs as 0 (whatever is passed), in the loss and the rewards.
        pair_weights: [B] WPO weights p_i = w_chosen·w_rejected (TRL's use_weighting), or None for p_i = 1.
        nll_loss: the token-mean NLL of the chosen completions over the micro-batch (TRL's, from per-token
            log-probs); if None, −Σ_i policy_chosen_logps_i / Σ_i chosen_lengths_i, the same number.

    Returns:
        (losses [B], chosen_rewards [B], rejected_rewards [B]); rewards are β·(policy − reference), detached,
        never length-normalised or f-transformed (TRL's metric semantics). The caller takes losses.mean().
    """
    loss_types = [loss_type] if isinstance(loss_type, str) else list(loss_type)
    loss_weights = [1.0] * len(loss_types) if loss_weights is None else list(loss_weights)
    chosen_lengths, rejected_lengths = _check_inputs(
        loss_types, rpo_alpha, reference_free, nll_loss, policy_chosen_logps, policy_rejected_logps,
        reference_chosen_logps, reference_rejected_logps, pair_weights, chosen_lengths, rejected_lengths)
    if rpo_alpha:  # RPO: the chosen NLL as one more loss term
        loss_types, loss_weights = loss_types + ["sft"], loss_weights + [rpo_alpha]
    if reference_free:  # an implicit uniform reference: log π_ref ≡ 0
        reference_chosen_logps = torch.zeros_like(policy_chosen_logps)
        reference_rejected_logps = torch.zeros_like(policy_rejected_logps)
    chosen_logratios = policy_chosen_logps - reference_chosen_logps  # ρ_w
    rejected_logratios = policy_rejected_logps - reference_rejected_logps  # ρ_l
    score = F_DIVERGENCES[f_divergence_type]  # s
    chosen_scores = score(chosen_logratios, alpha=f_alpha_divergence_coef)
    rejected_scores = score(rejected_logratios, alpha=f_alpha_divergence_coef)
    nll = None
    if _NLL_LOSSES & set(loss_types):
        nll = nll_loss if nll_loss is not None else -policy_chosen_logps.sum() / chosen_lengths.sum()
    terms = dict(  # everything a formula may read, by name
        policy_chosen_logps=policy_chosen_logps, policy_rejected_logps=policy_rejected_logps,
        reference_chosen_logps=reference_chosen_logps, reference_rejected_logps=reference_rejected_logps,
        chosen_logratios=chosen_logratios, rejected_logratios=rejected_logratios,
        chosen_scores=chosen_scores, rejected_scores=rejected_scores,
        delta_score=chosen_scores - rejected_scores,  # Δ
        chosen_lengths=chosen_lengths, rejected_lengths=rejected_lengths, nll=nll, beta=beta,
        label_smoothing=label_smoothing, discopop_tau=discopop_tau, simpo_gamma=simpo_gamma,
        dpop_lambda=dpop_lambda, rdpo_alpha=rdpo_alpha)
    losses = 0.0
    for name, weight in zip(loss_types, loss_weights):
        term = LOSSES[name](**terms)
        if pair_weights is not None:  # WPO: weight every term of pair i by p_i, as TRL's use_weighting
            term = term * pair_weights
        losses = losses + weight * term
    chosen_rewards = beta * chosen_logratios.detach()
    rejected_rewards = beta * rejected_logratios.detach()
    return losses, chosen_rewards, rejected_rewards

# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # DPO, step by step
#
# From the RLHF objective to a trained model, printing what each step computes. You derive the
# loss, watch it fail on toys, write DPO in under 50 lines of torch and transformers, check them
# against this repository's `dpo.main`, then look at what the trained model writes.
#
# **After this notebook you can**
#
# 1. derive the DPO loss from the KL-regularised RLHF objective, and say why $Z(x)$ cancels and
#    which reference model the derivation assumes;
# 2. predict how fast the margin grows on a pair whose label never changes, and explain why both
#    log-probabilities of a pair can fall while its margin grows;
# 3. write the DPO loss, its gradient weight and a variant (IPO) from four summed log-probabilities;
# 4. turn text into a DPO batch: the EOS, the prompt/completion boundary, truncation per pair, and
#    the completion mask shifted by one position;
# 5. write a complete DPO training loop (frozen reference, dropout off) and check it against an
#    independent implementation;
# 6. read TRL's metrics, and judge a trained policy by sampling: reward, win rate, KL, fluency,
#    with intervals that say what one run can and cannot show.
#
# **Prerequisites.** PyTorch (tensors, autograd, an optimizer loop); what a causal language model's
# logits are and `AutoModelForCausalLM` / `AutoTokenizer`; softmax, the logistic function σ and the
# KL divergence. No reinforcement learning.
#
# **Map.** Minutes are for a class working through the cells; *core* sections make the 90-minute
# path, *optional* ones are for a second session or for reading.
#
# | § | what | minutes | |
# |---|---|---|---|
# | 0 | objectives, notation, setup | 5 | core |
# | 1 | from the RLHF objective to the DPO loss; exercise 1 | 15 | core |
# | 2 | two failure modes on a toy; exercise 2 | 15 | core |
# | 3 | the loss zoo; exercise 3 (write IPO) | 15 | optional |
# | 4 | data: a row, its tokens, the EOS, subword merges, truncation; exercise 4 | 15 | core |
# | 5 | DPO in 50 lines, checked against `dpo.main`; exercises 5 and 6; the full run | 30 | core |
# | 5 | one prompt per pair (prefix sharing) | 5 | optional |
# | 6 | what DPO did: samples, and reward against KL | 10 | core (the frontier: optional) |
# | A, B | the other losses; LoRA, QLoRA and memory | 20 | optional |
#
# **The 90-minute path**: §0, §1, §2, §4, §5 without prefix sharing, §6 up to the frontier
# (5 + 15 + 15 + 15 + 30 + 10). Exercises 1, 2, 4, 5 and 6 are on it.
#
# **Exercises** are marked *predict, then run*: a question, a code cell with lines marked `# ✎`
# to edit (and a `prediction` to fill in before running), and a collapsed answer under it. The
# notebook is committed with its outputs, so before a class clear them (*Edit → Clear outputs of
# all cells*) and run the cells in order.
#
# **Notation** ([docs/notation.md](docs/notation.md) maps it to `losses.py` and TRL's metrics). For
# a prompt $x$ with chosen $y_w$ and rejected $y_l$, the chosen **log-ratio** is
# $\rho_w = \log\pi_\theta(y_w\mid x) - \log\pi_{\rm ref}(y_w\mid x)$, summed over its tokens:

# %%
import contextlib
import copy
import dataclasses
import inspect
import io
import json
import logging
import math
import os
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path

os.environ["TQDM_DISABLE"] = "1"  # dpo.main's progress bar: its log lines are printed below instead
for name in ("bitsandbytes", "kernels"):  # offline notices: an optional CPU kernel that is not downloaded
    logging.getLogger(name).setLevel(logging.ERROR)
warnings.filterwarnings("ignore", category=FutureWarning, message=".*is_gradient_checkpointing.*")  # peft
warnings.filterwarnings("ignore", message="IProgress not found")  # tqdm.auto without ipywidgets

import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F

assert Path("dpo.py").exists(), "start the notebook from the repository root (the folder with dpo.py)"
sys.path.insert(0, os.getcwd())

import data
from harness import datafiles
import dpo
import losses
from demo.sample_eval import sample_eval
from demo.sentiment import sentiment_score
from harness import options
from speedups import prefix_sharing


def SCORE(model, batch):  # sample_eval scores samples with the trainer's own log-probs
    return dpo.completion_logps(model, batch)[0]


start_time = time.time()
device = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # the rule dpo.main uses
if device.type == "cpu":
    torch.set_num_threads(1)  # the shipped model is tiny (d = 128): a second thread mostly waits
WORK = Path(tempfile.mkdtemp(prefix="dpo-walkthrough-"))  # every run writes here, deleted at the end
torch.set_printoptions(precision=4, linewidth=110, sci_mode=False)
plt.rcParams.update({"figure.dpi": 100, "savefig.dpi": 100, "font.size": 10, "legend.fontsize": 10})


def fmt(values, digits=4):
    """A tensor's values in one fixed format (a tensor's own repr changes format with its values)."""
    return "[" + ", ".join(f"{v:.{digits}f}" for v in values.tolist()) + "]"


def check(prediction, measured, unit=""):
    """An exercise's verdict: your prediction next to the measurement (no assert: a miss is a lesson)."""
    if prediction is None:
        print(f"measured {measured:.4g}{unit}; write your prediction in `prediction` first, then run again")
    else:
        print(f"you predicted {prediction:.4g}{unit}, measured {measured:.4g}{unit} "
              f"(off by {abs(prediction - measured):.3g}{unit})")


print(f"torch {torch.__version__}, device {device}")

# %% [markdown]
# ## 1. From the RLHF objective to the DPO loss
#
# RLHF assumes preferences follow the Bradley–Terry model with a latent reward $r^*$ (Eq. 1),
# $p^*(y_1 \succ y_2 \mid x) = \sigma\big(r^*(x, y_1) - r^*(x, y_2)\big)$, fits a reward model $r$
# to the pairs (Eq. 2), then maximises the reward while staying close to a reference policy
# $\pi_{\rm ref}$ (Eq. 3):
#
# $$\max_{\pi}\; \mathbb{E}_{x\sim\mathcal D,\; y\sim\pi(\cdot\mid x)}\big[r(x, y)\big]
# \;-\; \beta\, \mathbb{D}_{\rm KL}\big[\pi(y\mid x)\,\|\,\pi_{\rm ref}(y\mid x)\big].$$
#
# **The optimum in closed form (Eq. 4).** For one prompt, moving the reward inside the logarithm
# gives $\mathbb{E}_{\pi}[r] - \beta\,\mathbb{D}_{\rm KL}(\pi\|\pi_{\rm ref})
# = \beta\log Z(x) - \beta\,\mathbb{D}_{\rm KL}(\pi\|\pi^*)$ with
#
# $$\pi^*(y\mid x) = \frac{1}{Z(x)}\,\pi_{\rm ref}(y\mid x)\,e^{r(x, y)/\beta},
# \qquad Z(x) = \sum_y \pi_{\rm ref}(y\mid x)\,e^{r(x, y)/\beta}.$$
#
# $\beta\log Z(x)$ does not depend on $\pi$ and a KL is zero only between equal distributions, so
# $\pi^*$ is the maximiser. $Z(x)$ sums over every possible completion: it cannot be computed.
#
# **The implicit reward (Eq. 5).** Solving Eq. 4 for the reward,
# $r(x, y) = \beta\log\frac{\pi^*(y\mid x)}{\pi_{\rm ref}(y\mid x)} + \beta\log Z(x)$: every policy
# $\pi_\theta$ defines a reward $\beta\rho$ with
# $\rho = \log\frac{\pi_\theta(y\mid x)}{\pi_{\rm ref}(y\mid x)}$, up to a term that depends on the
# prompt only. Two rewards that differ by a function of $x$ give the same preferences and the same
# optimal policy; Theorem 1 says each such class holds exactly one reward of the form $\beta\rho$, so
# searching over policies loses nothing.
#
# **Why $Z(x)$ cancels (Eq. 6).** Bradley–Terry sees only the difference of two completions' rewards
# under the *same* prompt, so $\beta\log Z(x)$ drops out, and the preference likelihood becomes the
# **DPO loss (Eq. 7)**:
#
# $$\mathcal L_{\rm DPO} = -\mathbb{E}_{(x, y_w, y_l)\sim\mathcal D}
# \big[\log\sigma(\beta\rho_w - \beta\rho_l)\big] = -\mathbb{E}\big[\log\sigma(\beta\Delta)\big].$$
#
# **Which $\pi_{\rm ref}$.** The derivation takes the pairs to be samples of $\pi_{\rm ref}$ (the
# paper's Sections 5.1 and 6.1: $\pi_{\rm ref} = \pi_{\rm SFT}$). Here the shipped pairs were sampled
# from the shipped SFT model, and `dpo.main`'s reference is that model. Exercise 1 changes it.
#
# The cell checks each step on one prompt with five completions, small enough to enumerate.

# %%
beta = 0.5
pi_ref = torch.tensor([0.40, 0.25, 0.15, 0.12, 0.08], dtype=torch.float64)  # π_ref over 5 completions
reward = torch.tensor([0.0, 1.0, -0.5, 2.0, 0.5], dtype=torch.float64)       # the true reward r*(x, y)


def objective(pi, pi_ref=pi_ref):
    # Eq. 3 for one prompt: E_π[r] − β KL(π ‖ π_ref)
    return (pi * reward).sum() - beta * (pi * (pi / pi_ref).log()).sum()


Z = (pi_ref * torch.exp(reward / beta)).sum()
pi_star = pi_ref * torch.exp(reward / beta) / Z  # Eq. 4

torch.manual_seed(0)  # the same 1000 random policies on every run
random_policies = torch.distributions.Dirichlet(torch.ones(5, dtype=torch.float64)).sample((1000,))
for pi in random_policies:  # objective(π) = β log Z − β KL(π ‖ π*), for any π
    assert torch.isclose(objective(pi), beta * Z.log() - beta * (pi * (pi / pi_star).log()).sum())
print(f"objective at π*: {objective(pi_star):.6f} = β log Z = {beta * Z.log():.6f};  "
      f"best of 1000 random policies: {max(objective(pi) for pi in random_policies):.6f}")

implicit = beta * (pi_star / pi_ref).log()  # Eq. 5: the implicit reward of π*
assert torch.allclose(implicit + beta * Z.log(), reward)
shifted = pi_ref * torch.exp((reward + 3.0) / beta)  # an equivalent reward r* + f(x) ...
assert torch.allclose(shifted / shifted.sum(), pi_star)  # ... has the same optimal policy
bt_true = torch.sigmoid(reward[:, None] - reward[None, :])  # Eq. 6: P(y_i ≻ y_j), Z(x) cancels
assert torch.allclose(bt_true, torch.sigmoid(implicit[:, None] - implicit[None, :]))
print(f"implicit − true reward: {[round(v, 4) for v in (implicit - reward).tolist()]}  "
      f"(each −β log Z = {-beta * Z.log():.4f})")
print("P(y_i ≻ y_j), from either reward:\n", bt_true)

# %% [markdown]
# Now the other direction: minimise Eq. 7 over a free policy $\pi_\theta = \mathrm{softmax}(\theta)$,
# every ordered pair $(y_i, y_j)$ weighted by how often Bradley–Terry prefers $y_i$ (infinite data;
# `losses.dpo_loss`'s `pair_weights`). No reward model and no sampling, yet the minimiser is the
# RLHF optimum $\pi^*$: $\sigma(\beta(\rho_i - \rho_j)) = p^*(y_i \succ y_j)$ for all pairs forces
# $\beta\rho_i = r^*(y_i) + \text{const}$.

# %%
i, j = torch.triu_indices(5, 5, offset=1)
i, j = torch.cat([i, j]), torch.cat([j, i])  # all 20 ordered pairs (y_i chosen, y_j rejected)


def minimise_dpo(reference, steps=300):
    """The minimiser of Eq. 7 on every pair, weighted by Bradley-Terry, for a given reference."""
    theta = reference.log().clone().requires_grad_()  # start at the reference
    optimizer = torch.optim.Adam([theta], lr=0.1)
    for _ in range(steps):
        logp = torch.log_softmax(theta, dim=0)
        pair_losses, _, _ = losses.dpo_loss(logp[i], logp[j], reference.log()[i], reference.log()[j],
                                            beta=beta, pair_weights=bt_true[i, j])
        optimizer.zero_grad()
        pair_losses.sum().backward()
        optimizer.step()
    return torch.softmax(theta.detach(), dim=0)


pi_dpo = minimise_dpo(pi_ref)
print(" y   π_ref   r*(y)   π* (Eq. 4)   π_θ (min of Eq. 7)")
for y in range(5):
    print(f"{y:2d}   {pi_ref[y]:.3f}   {reward[y]:+.2f}      {pi_star[y]:.4f}       {pi_dpo[y]:.4f}")
assert torch.allclose(pi_dpo, pi_star, atol=1e-3)

# %% [markdown]
# **Exercise 1 — predict, then run: a reference that is not the SFT model.** Keep the same
# preferences (the same $r^*$, the same pairs) but give DPO a *uniform* reference instead of
# $\pi_{\rm ref}$, the policy the data came from. Predict: what is $\pi_\theta(y_3)$ at the minimum
# (under $\pi_{\rm ref}$ it was 0.7222)? Write it in `prediction`, then run.

# %%
other_reference = torch.full((5,), 0.2, dtype=torch.float64)  # ✎ try also: pi_ref.flip(0)
prediction = None  # ✎ π_θ(y_3) at the minimum, e.g. 0.7

pi_other = minimise_dpo(other_reference)
print(" y   reference   π_θ (min of Eq. 7)   reference·exp(r*/β), normalised   π* (SFT reference)")
closed_form = other_reference * torch.exp(reward / beta) / (other_reference * torch.exp(reward / beta)).sum()
for y in range(5):
    print(f"{y:2d}   {other_reference[y]:.3f}       {pi_other[y]:.4f}               {closed_form[y]:.4f}"
          f"                           {pi_star[y]:.4f}")
print(f"KL(π_θ ‖ π_ref of the data): {(pi_other * (pi_other / pi_ref).log()).sum():.3f} nats, against "
      f"{(pi_star * (pi_star / pi_ref).log()).sum():.3f} for π*")
check(prediction, pi_other[3].item())

# %% [markdown]
# <details><summary><b>Answer</b> (open after running)</summary>
#
# 0.8263: the minimiser is $\pi_{\rm ref}'\,e^{r^*/\beta}/Z'$ for whichever reference $\pi_{\rm ref}'$
# the loss is given (the second and third columns agree), because $\rho$ is measured from it. $y_0$,
# which the data's policy liked (0.40), falls from 0.0441 to 0.0151, and the KL to the data's policy
# grows from 1.109 to 1.409 nats. The ranking of the completions is $r^*$'s either way. With real
# data there is a second cost: completions the reference rarely writes get little constraint from
# pairs sampled elsewhere, which is why the paper first fine-tunes on the chosen completions when the
# pairs do not come from its reference.
# </details>

# %% [markdown]
# ## 2. Two failure modes on the toy
#
# **Deterministic preferences.** Above, each pair was labelled with Bradley–Terry's probability,
# never 0 or 1. Suppose instead $y_3$ always beats $y_1$. The fit then wants
# $\sigma(\beta\Delta) = 1$, i.e. $\Delta = \infty$, *whatever* $\beta$ is: the KL term that $\beta$
# was meant to weigh is gone from the loss (Gheshlaghi Azar et al. 2023, arXiv:2310.12036,
# Section 4.2). **IPO** regresses the margin onto a finite target instead,
# $(\Delta - \frac{1}{2\beta})^2$ for one-token completions (§3 gives its general form).
#
# **The σ weight slows the growth; it does not stop it.** DPO's gradient weighs a pair by
# $\beta\sigma(-\beta\Delta)$ (Eq. 7, §5). Here $\theta$ is trained by plain gradient descent with
# step $\eta = 0.1$ (Adam would rescale the shrinking gradient and hide the weight), and the
# softmax's normaliser cancels in $\Delta$, so each step adds exactly
#
# $$\Delta_{t+1} = \Delta_t + 2\eta\beta\,\sigma(-\beta\Delta_t).$$
#
# While $\beta\Delta \ll 1$ the weight is about $\beta/2$ and $\Delta \approx \eta\beta t$ grows
# linearly. Once $\beta\Delta$ is a few units, $\sigma(-\beta\Delta) \approx e^{-\beta\Delta}$, and
# $d\Delta/dt = 2\eta\beta e^{-\beta\Delta}$ integrates to
# $\Delta \approx \log(2\eta\beta^2 t)/\beta$: logarithmic, without bound. Without the weight
# (the loss $-\beta\Delta$, which the paper's Section 4 says makes language models degenerate)
# $\Delta = 2\eta\beta t$ exactly.

# %%
hard_w, hard_l, LR, STEPS = 3, 1, 0.1, 3000  # y_3 always preferred over y_1; plain gradient descent
shown_steps = [10, 100, 1000, 3000]


def train_hard_pair(loss_type, beta, steps=STEPS):
    """Δ after each step, and (π(y_1), KL(π_θ ‖ π_ref)) at the end, on the single pair y_3 ≻ y_1."""
    theta = pi_ref.log().clone().requires_grad_()
    one = torch.ones(1, dtype=torch.float64)  # one-token completions: |y| = 1
    margins = []
    for _ in range(steps):
        logp = torch.log_softmax(theta, dim=0)
        rho_w, rho_l = logp[[hard_w]] - pi_ref.log()[[hard_w]], logp[[hard_l]] - pi_ref.log()[[hard_l]]
        if loss_type == "no σ weight":  # −βΔ: every step pulls with the same force
            loss = -beta * (rho_w - rho_l)
        else:
            loss, _, _ = losses.dpo_loss(logp[[hard_w]], logp[[hard_l]], pi_ref.log()[[hard_w]],
                                         pi_ref.log()[[hard_l]], loss_type=loss_type, beta=beta,
                                         chosen_lengths=one, rejected_lengths=one)
        theta.grad = None
        loss.sum().backward()
        with torch.no_grad():
            theta -= LR * theta.grad
            logp = torch.log_softmax(theta, dim=0)
            margin = (logp[hard_w] - logp[hard_l]) - (pi_ref.log()[hard_w] - pi_ref.log()[hard_l])
            margins.append(float(margin))
    pi = logp.exp()
    return margins, float(pi[hard_l]), float((pi * (logp - pi_ref.log())).sum())


runs_hard = {(loss_type, b): train_hard_pair(loss_type, b)
             for b in (0.1, 1.0) for loss_type in ("sigmoid", "ipo", "no σ weight")}
print(f"{'loss':<12} {'β':>4}  " + "  ".join(f"{'Δ at ' + str(s):>10}" for s in shown_steps)
      + f"  {'π(y_1) at end':>13} {'KL at end':>9}")
for (loss_type, b), (margins, pi_l, kl) in runs_hard.items():
    print(f"{loss_type:<12} {b:>4}  " + "  ".join(f"{margins[s - 1]:>10.3f}" for s in shown_steps)
          + f"  {pi_l:>13.2e} {kl:>9.3f}")
    if loss_type == "ipo":
        assert abs(margins[-1] - 1 / (2 * b)) < 1e-6  # IPO stops at its target 1/(2β)


def recurrence(beta, steps, margin=0.0):
    """Δ after each step of Δ ← Δ + 2ηβσ(−βΔ)."""
    out = []
    for _ in range(steps):
        margin += 2 * LR * beta * (1 / (1 + math.exp(beta * margin)))
        out.append(margin)
    return out


print("\nDPO: the trained Δ, the recurrence, and the asymptote log(2ηβ²t)/β")
print(f"{'β':>4} {'step t':>7} {'trained Δ':>10} {'recurrence':>11} {'asymptote':>10}")
for b in (0.1, 1.0):
    margins, expected = runs_hard["sigmoid", b][0], recurrence(b, STEPS)
    assert max(abs(x - y) for x, y in zip(margins, expected)) < 1e-9
    for s in shown_steps:
        asymptote = math.log(2 * LR * b**2 * s) / b
        print(f"{b:>4} {s:>7} {margins[s - 1]:>10.3f} {expected[s - 1]:>11.3f} "
              + (f"{asymptote:>10.3f}" if b * asymptote >= 1 else f"{'(βΔ < 1)':>10}"))
small_ahead = [s for s in range(1, STEPS + 1)
               if runs_hard["sigmoid", 0.1][0][s - 1] > runs_hard["sigmoid", 1.0][0][s - 1]]
print(f"β = 0.1 has the larger margin from step {small_ahead[0]} on "
      f"(and at every later step: {small_ahead == list(range(small_ahead[0], STEPS + 1))})")

fig, ax = plt.subplots(figsize=(7.5, 4.5))
styles = {"sigmoid": "-", "ipo": "--", "no σ weight": ":"}
colors = {0.1: "tab:blue", 1.0: "tab:orange"}
steps_axis = range(1, STEPS + 1)
for (loss_type, b), (margins, _, _) in runs_hard.items():
    name = {"sigmoid": "DPO", "ipo": "IPO"}.get(loss_type, loss_type)
    ax.plot(steps_axis, margins, styles[loss_type], color=colors[b], label=f"{name}, β = {b}")
for b in (0.1, 1.0):
    t = [s for s in steps_axis if 2 * LR * b**2 * s >= math.e]  # where the asymptote's own βΔ ≥ 1
    ax.plot(t, [math.log(2 * LR * b**2 * s) / b for s in t], color=colors[b], lw=5, alpha=0.25,
            label=f"log(2ηβ²t)/β, β = {b}")
ax.set_xscale("log")
ax.set_yscale("log")
ax.set_xlabel("gradient step t")
ax.set_ylabel("margin Δ = ρ_w − ρ_l (nats)")
ax.set_title("one pair, always y_3 ≻ y_1")
ax.legend(ncol=2)
plt.show()

# %% [markdown]
# What the tables show. IPO stops at $\Delta = 1/(2\beta)$: 5 for β = 0.1, 0.5 for β = 1. DPO
# passes that point and keeps growing, exactly as the recurrence says. For β = 1 the margin at step
# 3000 (6.389) is within 0.01 of the asymptote (6.397); for β = 0.1 the asymptote (17.918) still
# overshoots (16.730), because $\beta\Delta$ has only reached 1.7. *Eventually* a smaller β goes
# further, here from step 525 on: the opposite of what β promises in Eq. 3. At steps 10 and 100
# β = 1 is ahead. Without the σ weight the margin is $2\eta\beta t$: 60 and 600 at step 3000.
#
# **The shipped data is this regime.** Each shipped pair's chosen completion scores at least 2 more
# than its rejected one under the true reward, and no pair appears in both orders (next cell). No
# label contradicts another, so Eq. 7's optimum is $\Delta = \infty$ on every pair; only the number
# of steps and the parameters the pairs share hold the margins back.

# %%
shipped = [json.loads(line) for line in (options.DEMO_DATASET / "train.jsonl").read_text().splitlines()]
gaps = [sentiment_score(r["prompt"] + r["chosen"]) - sentiment_score(r["prompt"] + r["rejected"])
        for r in shipped]
ordered = {(r["prompt"], r["chosen"], r["rejected"]) for r in shipped}
reversed_pairs = sum((p, rej, ch) in ordered for p, ch, rej in ordered)
print(f"{len(shipped)} pairs over {len({r['prompt'] for r in shipped})} prompts; "
      f"reward gap chosen − rejected: "
      f"min {min(gaps)}, mean {sum(gaps) / len(gaps):.2f}; pairs whose reverse is also in the data: "
      f"{reversed_pairs}")

# %% [markdown]
# **Exercise 2 — predict, then run: how far does the margin go?** Train the same pair with DPO at
# β = 0.3 for 3000 steps. Predict $\Delta$ at the end from the formulas above, then run. Then
# predict what doubling `steps` adds.

# %%
beta_mine = 0.3  # ✎
steps_mine = 3000  # ✎ then 6000
prediction = None  # ✎ Δ after steps_mine steps

margins_mine = train_hard_pair("sigmoid", beta_mine, steps_mine)[0]
print(f"β = {beta_mine}, {steps_mine} steps: Δ = {margins_mine[-1]:.3f}; the asymptote log(2ηβ²t)/β = "
      f"{math.log(2 * LR * beta_mine**2 * steps_mine) / beta_mine:.3f}; "
      f"βΔ = {beta_mine * margins_mine[-1]:.2f}")
print(f"Δ at half the steps: {margins_mine[steps_mine // 2 - 1]:.3f}; doubling added "
      f"{margins_mine[-1] - margins_mine[steps_mine // 2 - 1]:.3f}, "
      f"log(2)/β = {math.log(2) / beta_mine:.3f}")
check(prediction, margins_mine[-1])

# %% [markdown]
# <details><summary><b>Answer</b> (open after running)</summary>
#
# $\log(2 \cdot 0.1 \cdot 0.3^2 \cdot 3000)/0.3 = \log(54)/0.3 = 13.30$; the run gives 13.112, a
# little less, since $\sigma(-\beta\Delta) = 1/(1 + e^{\beta\Delta})$ is smaller than the
# $e^{-\beta\Delta}$ the asymptote assumes. Doubling the steps adds $\log(2)/\beta = 2.31$ once the
# asymptote holds (here 2.408, at $\beta\Delta$ between 3 and 4). The margin never stops, and a
# smaller β makes each doubling worth more nats.
# </details>

# %% [markdown]
# **Both log-probabilities fall.** Eq. 7 constrains only the margin. A real model shares parameters
# between completions, so pushing one pair apart moves every other completion too. Give the five
# completions words — $y_0$ "fine", $y_1$ "good", $y_2$ "bad", $y_3$ "good good", $y_4$ "good
# bad" — and a policy log-linear in its word counts,
# $\log\pi_\theta(y) = \log\pi_{\rm ref}(y) + w_{\rm good}\,n_{\rm good}(y)
# + w_{\rm bad}\,n_{\rm bad}(y) - \log Z_\theta$,
# and train DPO on the single pair "good bad" ≻ "bad". The margin depends only on $w_{\rm good}$,
# and raising $w_{\rm good}$ raises "good good" twice as fast as the chosen "good bad".

# %%
counts = torch.tensor([[0, 0], [1, 0], [0, 1], [2, 0], [1, 1]], dtype=torch.float64)  # (good, bad) counts
texts = ["fine", "good", "bad", "good good", "good bad"]
w = torch.zeros(2, dtype=torch.float64, requires_grad=True)
chosen, rejected = 4, 2
history = []
for step in range(401):
    logp = torch.log_softmax(pi_ref.log() + counts @ w, dim=0)
    history.append(logp.detach().exp())
    loss, _, _ = losses.dpo_loss(logp[[chosen]], logp[[rejected]], pi_ref.log()[[chosen]],
                                 pi_ref.log()[[rejected]], beta=0.5)
    w.grad = None
    loss.sum().backward()
    with torch.no_grad():
        w -= 0.2 * w.grad
history = torch.stack(history)
logratio = (history / pi_ref).log()
rho_w_toy, rho_l_toy = logratio[:, chosen], logratio[:, rejected]
peak = int(rho_w_toy.argmax())
negative_from = peak + int((rho_w_toy[peak:] < 0).nonzero()[0])
print(f"{'step':>5} {'Δ':>7} {'ρ_w':>7} {'ρ_l':>7}   π over " + ", ".join(texts))
for step in (0, 10, 25, 50, 100, 200, 400):
    print(f"{step:>5} {rho_w_toy[step] - rho_l_toy[step]:>7.3f} {rho_w_toy[step]:>7.3f} "
          f"{rho_l_toy[step]:>7.3f}   "
          + "  ".join(f"{p:.3f}" for p in history[step]))
print(f"ρ_w peaks at step {peak} ({rho_w_toy[peak]:.3f}) and is negative from step {negative_from} on")
assert rho_w_toy[-1] < 0 and rho_l_toy[-1] < 0 and history[-1, 3] > 0.5

fig, axes = plt.subplots(1, 2, figsize=(11, 4))
axes[0].plot(rho_w_toy, label="ρ_w  (chosen: good bad)")
axes[0].plot(rho_l_toy, label="ρ_l  (rejected: bad)")
axes[0].plot(rho_w_toy - rho_l_toy, "k", label="Δ = ρ_w − ρ_l")
axes[0].axhline(0, color="grey", lw=0.5)
axes[0].set_ylabel("log-ratio to the reference (nats)")
axes[0].set_title("the margin grows, both log-ratios end below 0")
for n, text in enumerate(texts):
    axes[1].plot(history[:, n], label=f"y_{n}: {text}")
axes[1].set_ylabel("π_θ(y)")
axes[1].set_title("where the probability goes")
for ax in axes:
    ax.set_xlabel("gradient step")
    ax.legend()
fig.tight_layout()
plt.show()

# %% [markdown]
# The chosen "good bad" first gains probability ($\rho_w$ peaks at step 17, at 0.170), then loses
# it, and is below the reference from step 38 on, while the margin keeps growing: once "good" is
# likely, each step moves mass to "good good" faster than to "good bad". By step 400, 0.992 of the
# probability is on "good good", a completion in no pair. This is *likelihood displacement* (Razin
# et al. 2024, arXiv:2410.08847); DPO-Positive (`dpop`, §3) penalises $\rho_w < 0$ for this reason
# (Pal et al. 2024, arXiv:2402.13228). §5's run shows it on the real model.

# %% [markdown]
# ## 3. The loss zoo (optional)
#
# Every variant in `losses.LOSSES` is a function of the same four summed log-probabilities. DPO is
# $\ell(\Delta) = -\log\sigma(\beta\Delta)$, and its **gradient weight**
# $-\frac{d\ell}{d\Delta} = \beta\,\sigma(-\beta\Delta)$ is how hard a pair pulls. To draw six
# variants on one pair of axes: $\beta = 1$ (so $\Delta$ is also the reward margin $\beta\Delta$),
# one-token completions ($|y| = 1$), $\rho_w = \Delta/2$ and $\rho_l = -\Delta/2$, reference
# log-probs of $-4$, other hyperparameters at their defaults.
#
# - **DPO** (`sigmoid`): $-\log\sigma(\beta\Delta)$, Eq. 7.
# - **cDPO** (`sigmoid` with `label_smoothing` ε = 0.1):
#   $-(1-\varepsilon)\log\sigma(\beta\Delta) - \varepsilon\log\sigma(-\beta\Delta)$; a label is
#   wrong with probability ε, and the optimum is finite:
#   $\beta\Delta = \log\frac{1-\varepsilon}{\varepsilon}$.
# - **IPO** (`ipo`): $\big(\frac{\rho_w}{|y_w|} - \frac{\rho_l}{|y_l|} - \frac{1}{2\beta}\big)^2$, a
#   target margin (§2; exercise 3).
# - **hinge** (SLiC, `hinge`): $\max(0, 1 - \beta\Delta)$, stops at $\beta\Delta = 1$.
# - **SimPO** (`simpo`): $-\log\sigma\big(\frac{\beta}{|y_w|}\log\pi_\theta(y_w\mid x)
#   - \frac{\beta}{|y_l|}\log\pi_\theta(y_l\mid x) - \gamma\big)$: no reference, mean log-probs,
#   a margin γ = 0.5.
# - **DPO-Positive** (`dpop`): $-\log\sigma\big(\beta(\Delta - \lambda\max(0, -\rho_w))\big)$,
#   penalises $\rho_w < 0$ (§2), λ = 50.

# %%
ZOO_BETA, ZOO_LENGTH, ZOO_REF = 1.0, 1, -4.0
EXTRA = {"exo_pair": dict(label_smoothing=1e-3), "robust": dict(label_smoothing=0.1)}


def loss_and_weight(name, margin, **options):
    """(ℓ, −dℓ/dΔ) of one pair at margin Δ, with ρ_w = Δ/2, ρ_l = −Δ/2 (the gradient by autograd)."""
    margin = torch.tensor([float(margin)], dtype=torch.float64, requires_grad=True)
    ref = torch.full((1,), ZOO_REF, dtype=torch.float64)
    lengths = torch.full((1,), float(ZOO_LENGTH), dtype=torch.float64)
    loss, _, _ = losses.dpo_loss(ref + margin / 2, ref - margin / 2, ref, ref, loss_type=name, beta=ZOO_BETA,
                                 chosen_lengths=lengths, rejected_lengths=lengths,
                                 **{**EXTRA.get(name, {}), **options})
    (grad,) = torch.autograd.grad(loss.sum(), margin)
    return loss.item(), -grad.item()


grid = torch.linspace(-6, 6, 241).tolist()
MAIN = {"DPO": ("sigmoid", {}), "cDPO (ε = 0.1)": ("sigmoid", dict(label_smoothing=0.1)), "IPO": ("ipo", {}),
        "hinge": ("hinge", {}), "SimPO (γ = 0.5)": ("simpo", {}), "DPO-Positive (λ = 50)": ("dpop", {})}
main_curves = {label: [loss_and_weight(name, m, **opts) for m in grid]
               for label, (name, opts) in MAIN.items()}

fig, axes = plt.subplots(1, 2, figsize=(11, 4.5), sharex=True)
for label, values in main_curves.items():
    style = dict(color="k", lw=2.5) if label == "DPO" else dict(lw=1.5)
    axes[0].plot(grid, [v[0] for v in values], label=label, **style)
    axes[1].plot(grid, [v[1] for v in values], label=label, **style)
axes[0].set_ylim(-0.1, 4)
axes[1].set_ylim(-1.5, 3)
axes[0].set_ylabel("loss ℓ(Δ)")
axes[1].set_ylabel("gradient weight −dℓ/dΔ")
for ax in axes:
    ax.axvline(0, color="grey", lw=0.5), ax.axhline(0, color="grey", lw=0.5)
    ax.set_xlabel("margin Δ (β = 1)")
axes[0].legend()
axes[0].set_title("loss (IPO and DPO-Positive leave the frame)")
axes[1].set_title("how hard a pair at margin Δ pulls")
fig.tight_layout()
plt.show()
print(f"{'':<22} {'ℓ(−4)':>8} {'ℓ(0)':>7} {'ℓ(4)':>7}   "
      f"{'weight at −4':>12} {'at 0':>7} {'at 4':>7}")
for label, (name, opts) in MAIN.items():
    at = {m: loss_and_weight(name, m, **opts) for m in (-4, 0, 4)}
    print(f"{label:<22} {at[-4][0]:>8.3f} {at[0][0]:>7.3f} {at[4][0]:>7.3f}   {at[-4][1]:>12.3f} "
          f"{at[0][1]:>7.3f} {at[4][1]:>7.3f}")

# %% [markdown]
# **DPO** pulls with weight near β on a pair ranked the wrong way and near 0, never exactly 0, on one
# ranked right by a wide margin: §2's unbounded margin. **cDPO**'s weight crosses zero at
# $\beta\Delta = \log 9 = 2.2$ and pushes back beyond it. **IPO** pulls linearly towards
# $\Delta = 0.5$ from both sides. **Hinge** stops pulling at $\beta\Delta = 1$. **SimPO** here is DPO
# shifted right by γ. **DPO-Positive** equals DPO for $\Delta \ge 0$, and below 0 its weight jumps
# (26 at $\Delta = -4$).
#
# At $\Delta = 0$ the policy is the reference and every loss has a value you can work out by hand
# ($\sigma(0) = \frac12$). The next cell checks *every* loss in `losses.py` against its closed form (a
# new loss fails it until its closed form is added); Appendix A draws the other fourteen.

# %%
ln2, eps, gamma, nll = math.log(2), 1e-3, 0.5, -ZOO_REF / ZOO_LENGTH
B1 = ZOO_BETA
closed_forms = {
    "sigmoid": ("ln 2", ln2),
    "hinge": ("1", 1.0),
    "ipo": ("1/(4β²)", 1 / (4 * B1**2)),
    "exo_pair": ("−ln 2 − ½ ln(ε(1−ε))", -ln2 - 0.5 * math.log(eps * (1 - eps))),
    "nca_pair": ("2 ln 2", 2 * ln2),
    "robust": ("((1−ε) ln 2 − ε ln 2)/(1−2ε) = ln 2", ln2),
    "bco_pair": ("2 ln 2", 2 * ln2),
    "sppo_hard": ("2·(1/(2β))² = 1/(2β²)", 1 / (2 * B1**2)),
    "aot": ("ln 2", ln2),
    "aot_unpaired": ("ln 2", ln2),
    "apo_zero": ("(1 − ½) + ½ = 1", 1.0),
    "apo_down": ("½ + (1 − ½) = 1", 1.0),
    "discopop": ("½ ln 2 + ½", 0.5 * ln2 + 0.5),
    "sft": ("NLL = −log π_ref(y_w)/|y_w|", nll),
    "sigmoid_norm": ("ln 2", ln2),
    "simpo": ("ln(1 + e^γ)", math.log1p(math.exp(gamma))),
    "dpop": ("ln 2 (no penalty at ρ_w = 0)", ln2),
    "rdpo": ("ln 2 (equal lengths)", ln2),
    "orpo": ("NLL + β ln 2", nll + B1 * ln2),
}
assert set(closed_forms) == set(losses.LOSSES), set(losses.LOSSES) ^ set(closed_forms)
print(f"{'loss_type':<13} {'ℓ(0)':>9} {'closed form':>38} {'value':>9}   −dℓ/dΔ at 0")
for name, (formula, value) in closed_forms.items():
    at_zero, weight = loss_and_weight(name, 0.0)
    assert math.isclose(at_zero, value, rel_tol=1e-9), (name, at_zero, value)
    print(f"{name:<13} {at_zero:>9.6f} {formula:>38} {value:>9.6f}   {weight:.4f}")

# %% [markdown]
# **Exercise 3 — write IPO.** The IPO paper (Eq. 17, its τ is our β) writes
# $\big(\Delta - \frac{1}{2\beta}\big)^2$ with summed log-ratios; the cell starts from that. Predict
# first: on a pair with $|y_w| = 10$ and $|y_l| = 20$ tokens, does it agree with
# `losses.dpo_loss(loss_type="ipo")`? Then edit `my_ipo` until all three cases agree.

# %%
def my_ipo(chosen_logratios, rejected_logratios, chosen_lengths, rejected_lengths, beta):
    return (chosen_logratios - rejected_logratios - 1 / (2 * beta)) ** 2  # ✎


prediction = None  # ✎ True or False: does this form agree on |y_w| = 10, |y_l| = 20?

ref_logps = torch.tensor([-30.0, -30.0, -30.0], dtype=torch.float64)
cases = {"one token each": (1, 1), "10 and 10 tokens": (10, 10), "10 and 20 tokens": (10, 20)}
agree = {}
for case, (n_w, n_l) in cases.items():
    chosen_l, rejected_l = torch.tensor([float(n_w)] * 3), torch.tensor([float(n_l)] * 3)
    rho_w = torch.tensor([0.5, 2.0, -1.0], dtype=torch.float64)
    rho_l = torch.tensor([-0.5, -3.0, 1.0], dtype=torch.float64)
    mine = my_ipo(rho_w, rho_l, chosen_l.double(), rejected_l.double(), beta=0.1)
    library, _, _ = losses.dpo_loss(ref_logps + rho_w, ref_logps + rho_l, ref_logps, ref_logps,
                                    loss_type="ipo", beta=0.1, chosen_lengths=chosen_l,
                                    rejected_lengths=rejected_l)
    agree[case] = torch.allclose(mine, library)
    print(f"{case:<18} my_ipo {fmt(mine, 3)}   losses.py {fmt(library, 3)}   agree: {agree[case]}")
print(f"you predicted {prediction}, measured {agree['10 and 20 tokens']}" if prediction is not None
      else "write your prediction in `prediction` first")

# %% [markdown]
# <details><summary><b>Answer</b> (open after running)</summary>
#
# It agrees only for one-token completions. TRL (and `losses.ipo`) divides each log-ratio by its
# completion's length, a choice TRL says it confirmed with the IPO authors:
# $\big(\frac{\rho_w}{|y_w|} - \frac{\rho_l}{|y_l|} - \frac{1}{2\beta}\big)^2$. Without the division
# the target, $\frac{1}{2\beta}$ = 5 nats, is a margin in *summed* log-probs: easy for a long pair,
# hard for a short one. §2's $(\Delta - \frac{1}{2\beta})^2$ is the one-token case. The fix:
#
# ```python
# return (chosen_logratios / chosen_lengths - rejected_logratios / rejected_lengths
#         - 1 / (2 * beta)) ** 2
# ```
# </details>

# %% [markdown]
# ## 4. Data: from a row to a batch
#
# The shipped preference set (`demo/assets/sentiment-prefs`) is a miniature of the paper's
# controlled-sentiment task (Section 6.1): the prompt is the start of a movie review, both
# completions were sampled from the shipped SFT model (`demo/assets/tiny-sentiment-lm`, a
# 1.1M-parameter Llama with one token per word), and the more positive one under the ground-truth
# reward `sentiment_score` (positive minus negative words) is *chosen*.
#
# A row becomes three lists of token ids. A string completion gets the **EOS token** appended, so
# the model also learns where to stop. The loss needs
# $\log\pi(y\mid x) = \sum_t \log\pi(y_t\mid x, y_{<t})$ over completion tokens only, so each
# sequence carries a **completion mask** $m$: 1 on completion tokens, 0 on prompt and padding.
# `cfg` is the configuration `python dpo.py` uses (the shipped model and data, the demo's defaults).

# %%
from transformers import AutoModelForCausalLM, AutoTokenizer

cfg = options.parse_args(["--output_dir", str(WORK / "unused"), "--bf16", "False"])  # fp32 everywhere
print(f"β {cfg.beta}, loss {cfg.loss_type}, max_length {cfg.max_length}, {cfg.truncation_mode}, "
      f"truncation_scope "
      f"{cfg.truncation_scope}, LoRA {cfg.use_peft} (rank {cfg.lora_r}), learning rate {cfg.learning_rate}, "
      f"{cfg.per_device_train_batch_size} pairs per batch")
tokenizer = AutoTokenizer.from_pretrained(cfg.model)
pad_id = data.pad_token_id(tokenizer)
train_rows, eval_rows = datafiles.load_preference_dataset(cfg.dataset, cfg.dataset_split, cfg.eval_split)
limits = dict(max_length=cfg.max_length, truncation_mode=cfg.truncation_mode,
              truncation_scope=cfg.truncation_scope)
train_set = data.prepare_dataset(train_rows, tokenizer, **limits)  # exactly as dpo.main prepares it
eval_set = data.prepare_dataset(eval_rows, tokenizer, name="eval", **limits)
print("\nrow 0:", json.dumps(train_rows[0]))
print("its ids:", train_set[0])

one = data.collate([train_set[0]], pad_id)  # rows: [prompt + chosen, prompt + rejected], right-padded
print(f"\n{'pos':>3}  {'prompt + chosen':<14}{'m':>2}  |  {'prompt + rejected':<17}{'m':>2}")
for t in range(one["input_ids"].shape[1]):
    cells = [f"{tokenizer.convert_ids_to_tokens(int(one['input_ids'][r, t])):<14}"
             f"{int(one['completion_mask'][r, t]):>2}" for r in (0, 1)]
    print(f"{t:>3}  {cells[0]}  |  {cells[1]:<19}")

# %% [markdown]
# **Subword merges at the prompt/completion boundary.** The shipped tokenizer has one token per
# word, so the prompt's tokens are always a prefix of prompt + completion. A BPE tokenizer can merge
# across the boundary. The next cell trains a small byte-level BPE (GPT-2's scheme, where `Ġ` marks
# a leading space) on the shipped reviews with the `tokenizers` library, and tokenizes one prompt
# alone and with its completion, three ways of cutting the same text.

# %%
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

bpe = Tokenizer(models.BPE())
bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
bpe.decoder = decoders.ByteLevel()
bpe.train_from_iterator([r["prompt"] + y for r in shipped for y in (r["chosen"], r["rejected"])],
                        trainers.BpeTrainer(vocab_size=600, show_progress=False,
                                            initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
for prompt, completion in (("the acting was", " great ."), ("the acting was ", "great ."),
                           ("the acting was gr", "eat .")):
    alone, whole = bpe.encode(prompt).tokens, bpe.encode(prompt + completion).tokens
    n = data.common_prefix_length(alone, whole)
    print(f"{prompt!r} + {completion!r}\n  prompt alone:        {alone}\n  prompt + completion: {whole}\n"
          f"  the completion's tokens: {whole[n:]}"
          + ("" if n == len(alone) else
             f"  (the prompt alone ends {alone[n:]}: not how the whole text splits)"))

# %% [markdown]
# In the first case the boundary falls between tokens. In the other two the prompt's last token (`Ġ`,
# or `r`) is not a token of the whole text, which merges it with what follows (`Ġg`, `reat`): ids of
# prompt and completion tokenized separately would be a split the tokenizer never produces. So
# `data.py` (like TRL 1.16) tokenizes prompt + completion as one text, and the completion starts
# where its ids stop matching the prompt's: the prompt's divergent tail goes to the completion. §5's
# DPO by hand does the same.
#
# **The EOS: its token is scored, its position is not.** Position $t$ predicts token $t+1$, so the
# scored positions are `completion_mask[:, 1:]`, one to the left: the last prompt position predicts
# the first completion token; the EOS *token* is predicted by the position before it, and
# $\log\pi(\text{EOS}\mid\ldots)$ is part of $\log\pi(y\mid x)$; the EOS's own *position* would
# predict what follows it, which is not in the data, so it is not scored (§5 prints both).
#
# **Truncation, per pair or per row.** `keep_end` (this project's default) drops the *start* of the
# prompt; `keep_start` (TRL's) drops the *end* of the completion, EOS included. *Per row* (TRL's
# rule) cuts prompt+chosen and prompt+rejected each on its own: under `keep_end` the two rows can
# keep different amounts of prompt, so the chosen completion is scored under one prompt and the
# rejected under another, and the $\beta\log Z(x)$ of §1 no longer cancels. *Per pair* (the default,
# `data.truncate_pair`) cuts one prompt for both.

# %% [markdown]
# **Exercise 4 — predict, then run: per row instead of per pair.** With `max_length` 32 and
# `keep_end`, how many of the 2,113 training pairs are scored under two different prompts when each
# row is cut on its own? And per pair?

# %%
scope = "row"  # ✎ "row" or "pair"
short_max_length = 32  # ✎
prediction = None  # ✎ the number of pairs with two different prompts


def kept_prompts(batch):
    """The prompt tokens each row keeps: those before its first completion token."""
    return [batch["input_ids"][r, :int(batch["completion_mask"][r].argmax())].tolist() for r in (0, 1)]


short = data.prepare_dataset(train_rows, tokenizer, max_length=short_max_length, truncation_scope=scope)
two_prompts = [k for k, ex in enumerate(short) if len({tuple(p) for p in kept_prompts(
    data.collate([ex], pad_id, max_length=short_max_length, truncation_scope=scope))}) == 2]
print(f"scope {scope}: {len(two_prompts)} of {len(short)} pairs kept are scored under two different prompts")
if two_prompts:
    batch_k = data.collate([short[two_prompts[0]]], pad_id, max_length=short_max_length,
                           truncation_scope=scope)
    for r, (name, prompt_ids) in enumerate(zip(("chosen", "rejected"), kept_prompts(batch_k))):
        print(f"  e.g. pair {two_prompts[0]}, {name:<8}: prompt '{tokenizer.decode(prompt_ids)}' + "
              f"{int(batch_k['completion_mask'][r].sum())} completion tokens")
check(prediction, len(two_prompts))

# %% [markdown]
# <details><summary><b>Answer</b> (open after running)</summary>
#
# Per row, 423: of the 436 pairs with a row to cut, only 13 have both rows cut alike (completions of
# equal length, or no prompt left in either); every other one keeps less prompt for its longer
# completion. Per pair, 0 by construction. The label "$y_w$ better than $y_l$ *for this prompt*"
# assumes one prompt; with two, the margin also measures what the missing prompt words do to the
# log-probabilities. Under `keep_start` both rows keep the whole prompt, and the scopes agree.
# </details>

# %% [markdown]
# **The collated batch.** `data.collate` stacks $B$ pairs into $2B$ rows: rows $0..B-1$ are
# prompt+chosen, rows $B..2B-1$ prompt+rejected in the same order, right-padded to one width $T$.

# %%
B = 4
batch = data.collate(train_set[:B], pad_id, cfg.max_length, cfg.truncation_mode,
                     truncation_scope=cfg.truncation_scope)
for key, value in batch.items():
    print(f"{key:<16} {tuple(value.shape)} {value.dtype}")
scored = torch.zeros_like(batch["completion_mask"])
scored[:, :-1] = batch["completion_mask"][:, 1:]  # position t is scored when token t+1 is a completion token
fig, ax = plt.subplots(figsize=(10, 3))
ax.imshow(batch["attention_mask"] + scored, cmap="viridis", aspect="auto", vmin=0, vmax=2)
ax.set_yticks(range(2 * B), [f"chosen {r}" for r in range(B)] + [f"rejected {r}" for r in range(B)])
ax.set_xlabel("position t")
ax.set_title("dark: padding; teal: position not scored; yellow: scored (it predicts a completion token)")
plt.show()

# %% [markdown]
# ## 5. DPO in 50 lines, then the library
#
# **Per-token log-probabilities.** For each of the $2B$ rows the model gives logits
# $z_t \in \mathbb{R}^V$ at every position $t$, and position $t$ predicts token $t+1$:
#
# $$\log\pi(y\mid x)
# = \sum_{t} m_{t+1}\big(z_{t, y_{t+1}} - \log\textstyle\sum_{v} e^{z_{t,v}}\big).$$
#
# In code the shift is two slices: `logits[:, :-1]` against `input_ids[:, 1:]`, masked by
# `completion_mask[:, 1:]`.
#
# The cell below is a complete DPO trainer with torch and transformers only: tokenization with the
# EOS and the boundary rule of §4, truncation per pair, collation with both masks, the model with
# dropout off, a frozen copy of it as the reference, the loss, and the loop (AdamW, learning rate
# decaying linearly to 0, gradient norm clipped to 1). It trains all weights; §5's full run and
# Appendix B use LoRA instead, where the reference is the same network with its adapters off.

# %%
def common_prefix(a, b):
    return next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def tokenize(tok, prompt, chosen, rejected, max_length):
    """Token ids (prompt, chosen, rejected): EOS-terminated completions, one prompt cut for both."""
    p, c, r = (tok(text)["input_ids"] for text in (prompt, prompt + chosen + tok.eos_token,
                                                   prompt + rejected + tok.eos_token))
    n = min(common_prefix(p, c), common_prefix(p, r))  # a token merged across the boundary...
    p, c, r = p[:n], c[n:], r[n:]  # ... goes to the completions
    longest = max(len(c), len(r))  # truncation per pair (keep_end): the prompt's start first
    if len(p) + longest > max_length:
        p = p[len(p) - max(max_length - longest, min(len(p), max_length // 2)):]
    return p, c[:max_length - len(p)], r[:max_length - len(p)]


def collate(pairs, pad_id):
    """B pairs -> 2B rows [prompt+chosen; prompt+rejected], right-padded, with both masks."""
    rows = ([(p + c, [0] * len(p) + [1] * len(c)) for p, c, _ in pairs]
            + [(p + r, [0] * len(p) + [1] * len(r)) for p, _, r in pairs])
    T = max(len(ids) for ids, _ in rows)
    return {"input_ids": torch.tensor([ids + [pad_id] * (T - len(ids)) for ids, _ in rows]),
            "attention_mask": torch.tensor([[1] * len(ids) + [0] * (T - len(ids)) for ids, _ in rows]),
            "completion_mask": torch.tensor([m + [0] * (T - len(m)) for _, m in rows])}


def per_token_logps(model, batch):
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logps = torch.log_softmax(logits[:, :-1].float(), dim=-1)  # position t predicts token t+1
    return logps.gather(-1, batch["input_ids"][:, 1:, None]).squeeze(-1) * batch["completion_mask"][:, 1:]


def load_policy_and_reference(path, dropout=0.0):
    policy = AutoModelForCausalLM.from_pretrained(path, attention_dropout=dropout)  # Llama's: a config float
    for module in policy.modules():  # other families' dropout layers
        if isinstance(module, torch.nn.Dropout):
            module.p = dropout
    reference = copy.deepcopy(policy).eval().requires_grad_(False)  # frozen: the policy at step 0
    return policy.train(), reference


def dpo_loss(policy, reference, batch, beta):
    logps = per_token_logps(policy, batch).sum(1)
    with torch.no_grad():
        ref_logps = per_token_logps(reference, batch).sum(1)
    B = len(logps) // 2
    rho_w, rho_l = logps[:B] - ref_logps[:B], logps[B:] - ref_logps[B:]
    return -F.logsigmoid(beta * (rho_w - rho_l)).mean(), rho_w.detach(), rho_l.detach()


def train(policy, reference, pairs, pad_id, *, beta, lr, steps, batch_size=8, seed=42, loss_fn=dpo_loss):
    optimizer = torch.optim.AdamW(policy.parameters(), lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1 - s / steps)  # linear to 0
    order = torch.randperm(len(pairs), generator=torch.Generator().manual_seed(seed)).tolist()  # one epoch
    step_losses = []
    for step in range(steps):
        batch = collate([pairs[k] for k in order[step * batch_size:(step + 1) * batch_size]], pad_id)
        loss = loss_fn(policy, reference, batch, beta)[0]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(policy.parameters(), max_norm=1.0)
        optimizer.step(), schedule.step(), optimizer.zero_grad()
        step_losses.append(loss.item())
    return step_losses


# %% [markdown]
# Now run it for 5 steps, and `dpo.main` for 5 steps with `--use_peft False` (full fine-tuning; its
# reference is also `copy.deepcopy(model).eval()`), both at learning rate 5e-4. Both read the same
# rows in the same order (`torch.randperm` seeded with `seed`); the asserts check the tokens, the
# batch and every loss.

# %% tags=["trained"]
hand_tok = AutoTokenizer.from_pretrained(cfg.model)
rows = [json.loads(line) for line in (Path(cfg.dataset) / "train.jsonl").read_text().splitlines()]
pairs = [tokenize(hand_tok, r["prompt"], r["chosen"], r["rejected"], cfg.max_length) for r in rows]
assert pairs == [(e["prompt_ids"], e["chosen_ids"], e["rejected_ids"]) for e in train_set]  # = data.py's
assert all(torch.equal(collate(pairs[:B], pad_id)[k], batch[k]) for k in batch)  # = data.collate's

CHECK_STEPS, FULL_LR = 5, 5e-4  # full fine-tuning moves every weight: a quarter of the LoRA demo's rate
policy, reference = load_policy_and_reference(cfg.model)
hand = train(policy, reference, pairs, pad_id, beta=cfg.beta, lr=FULL_LR, steps=CHECK_STEPS)


def run_main(name, *args):
    """dpo.main on the shipped demo in WORK/name; returns its printed log."""
    run_cfg = options.parse_args(["--output_dir", str(WORK / name), "--bf16", "False", "--show_examples", "0",
                                  "--sample_eval", "0", "--save_steps", "0", *args])
    with contextlib.redirect_stdout(io.StringIO()) as log:
        dpo.main(run_cfg)
    return log.getvalue()


run_main("full", "--use_peft", "False", "--learning_rate", str(FULL_LR), "--max_steps", str(CHECK_STEPS),
         "--logging_steps", "1")
records = [json.loads(line) for line in (WORK / "full" / "metrics.jsonl").read_text().splitlines()]
main_losses = [r["loss"] for r in records if "loss" in r]
print(f"{'step':<10}" + "".join(f"{s:>10d}" for s in range(1, CHECK_STEPS + 1)))
print(f"{'dpo.main':<10}" + "".join(f"{v:>10.6f}" for v in main_losses))
print(f"{'by hand':<10}" + "".join(f"{loss:>10.6f}" for loss in hand))
assert len(main_losses) == CHECK_STEPS
assert all(math.isclose(a, b, rel_tol=1e-4) for a, b in zip(main_losses, hand))

# %% [markdown]
# The hand-written trainer and `dpo.main` agree to 1e-6 at every step (`dpo.main` sends only
# completion positions through the LM head and computes each prompt once, so the sums round
# differently). What `dpo.main` adds is plumbing: evaluation, checkpoints and exact resume,
# gradient accumulation, logging, LoRA and QLoRA, the other losses and reference modes.
#
# **What the lines compute, token by token.** Row 0 of the batch of §4 under the SFT model: the
# first scored position is the last prompt token, and the last scored token is the EOS.

# %%
policy, reference = load_policy_and_reference(cfg.model)
with torch.no_grad():
    mine = per_token_logps(policy, batch)
    library, _ = dpo.completion_logps(policy, batch)  # dpo.py: only completion positions through the LM head
assert torch.allclose(mine, library, atol=1e-5)
row0, n0 = batch["input_ids"][0], int(batch["attention_mask"][0].sum())
print(f"input_ids {tuple(batch['input_ids'].shape)} = [2B, T]; "
      f"per-token log-probs {tuple(mine.shape)} = [2B, T−1]")
for t in range(n0 - 1):
    m = int(batch["completion_mask"][0, t + 1])
    print(f"  position {t:>2} ({tokenizer.convert_ids_to_tokens(int(row0[t])):<11}) predicts "
          f"{tokenizer.convert_ids_to_tokens(int(row0[t + 1])):<11} m = {m}  "
          + (f"log π = {mine[0, t].item():8.4f}" if m else "(prompt: not scored)"))
print(f"  position {n0 - 1:>2} ({tokenizer.convert_ids_to_tokens(int(row0[n0 - 1]))}) predicts what follows "
      f"the EOS: not in the data, not scored")
print(f"log π(y_w | x) = sum over the completion = {mine[0].sum().item():.4f}")

# %% [markdown]
# **The gradient (Eq. 7).** With $L = \frac1B\sum_i -\log\sigma(\beta\Delta_i)$, the gradient with
# respect to the summed log-probabilities is
#
# $$\frac{\partial L}{\partial \log\pi_\theta(y_{w,i}\mid x_i)}
# = -\frac{\beta}{B}\,\sigma(-\beta\Delta_i)
# = -\frac{\partial L}{\partial \log\pi_\theta(y_{l,i}\mid x_i)}:$$
#
# raise the chosen log-prob, lower the rejected one, each with the weight
# $\beta\sigma(-\beta\Delta_i)$ of §2 and §3, i.e. by how wrong the implicit reward currently ranks
# that pair. The cell checks autograd against it at step 0 (policy = reference: $\Delta = 0$, the
# loss is exactly $\ln 2$) and after one AdamW step, and checks the loss against `losses.dpo_loss`
# and `dpo.dpo_step` (the function `dpo.main` calls).

# %% tags=["trained"]
optimizer = torch.optim.AdamW(policy.parameters(), lr=FULL_LR, weight_decay=0.0)
full_cfg = dataclasses.replace(cfg, use_peft=False)
for step in range(2):
    logps = per_token_logps(policy, batch).sum(1)
    logps.retain_grad()  # keep the gradient of this intermediate tensor
    with torch.no_grad():
        ref_logps = per_token_logps(reference, batch).sum(1)
    margin = (logps[:B] - ref_logps[:B]) - (logps[B:] - ref_logps[B:])
    loss = -F.logsigmoid(cfg.beta * margin).mean()
    library, _, _ = losses.dpo_loss(logps[:B], logps[B:], ref_logps[:B], ref_logps[B:], beta=cfg.beta)
    loss.backward()
    eq7 = -cfg.beta / B * torch.sigmoid(-cfg.beta * margin.detach())
    assert torch.allclose(logps.grad[:B], eq7) and torch.allclose(logps.grad[B:], -eq7)
    with torch.no_grad():
        step_loss, _ = dpo.dpo_step(full_cfg, policy, reference, batch)
    assert torch.allclose(loss, library.mean()) and torch.isclose(step_loss, loss.detach(), atol=1e-5)
    if step == 0:
        assert math.isclose(loss.item(), math.log(2), abs_tol=1e-6)  # policy = reference: Δ = 0
    print(f"step {step}: loss {loss.item():.6f} (losses.dpo_loss {library.mean().item():.6f}, dpo.dpo_step "
          f"{step_loss.item():.6f}); margins Δ {fmt(margin.detach())}")
    print(f"  ∂L/∂log π(y_w): autograd {fmt(logps.grad[:B])}, −β/B·σ(−βΔ) {fmt(eq7)}")
    optimizer.step()
    optimizer.zero_grad()

# %% [markdown]
# **Exercise 5 — predict, then run: dropout on.** The loader sets dropout to 0, as TRL's and
# `dpo.py`'s `disable_dropout` do. Load the policy with attention dropout 0.1 instead (the reference,
# a copy in `eval()` mode, never drops). Predict the step-0 loss on the batch of §4.

# %%
dropout = 0.1  # ✎ try 0.0
prediction = None  # ✎ the step-0 loss

policy_d, reference_d = load_policy_and_reference(cfg.model, dropout=dropout)
for seed in range(3):
    torch.manual_seed(seed)  # dropout's random mask
    loss_d, rho_w_d, rho_l_d = dpo_loss(policy_d, reference_d, batch, cfg.beta)
    print(f"dropout {dropout}, seed {seed}: step-0 loss {loss_d.item():.4f} (ln 2 = {math.log(2):.4f}); "
          f"margins Δ {fmt(rho_w_d - rho_l_d)}")
check(prediction, loss_d.item())
del policy_d, reference_d

# %% [markdown]
# <details><summary><b>Answer</b> (open after running)</summary>
#
# Not $\ln 2$: 0.7506, 0.5223 and 0.7293 for three seeds. In `train()` mode the policy drops a random
# tenth of its attention weights and the reference does not, so at step 0 their log-probabilities
# differ: the margins are noise (from −3.7 to 27.1 nats here), and the first gradients push on it.
# Two models in train mode would still draw different masks. So DPO turns dropout off (TRL's
# `disable_dropout=True`, `dpo.py`'s `--disable_dropout`), both by setting every `torch.nn.Dropout`
# to $p = 0$. A Llama's attention dropout is a float in its config, not a module, which is why the
# loader above also passes `attention_dropout` (0.0 in the shipped config).
# </details>

# %% [markdown]
# **Exercise 6 — predict, then run: the mean instead of the sum.** Some implementations average the
# per-token log-probs of a completion instead of summing them. Change `reduce` to the mean over
# completion tokens and predict: (a) the step-0 loss; (b) after 30 steps, is the loss lower or higher
# than with the sum, and has the policy moved less or further from the reference (in summed
# log-ratios on held-out pairs)? (c) which `loss_type` in `losses.py` is this?

# %% tags=["trained"]
def reduce(per_token, completion_mask):
    return per_token.sum(1) / completion_mask[:, 1:].sum(1)  # ✎ the sum is `per_token.sum(1)`


prediction = None  # ✎ (a) the step-0 loss


def dpo_loss_reduced(policy, reference, batch, beta):
    """dpo_loss with each completion's per-token log-probs combined by `reduce`."""
    logps = reduce(per_token_logps(policy, batch), batch["completion_mask"])
    with torch.no_grad():
        ref_logps = reduce(per_token_logps(reference, batch), batch["completion_mask"])
    B = len(logps) // 2
    rho_w, rho_l = logps[:B] - ref_logps[:B], logps[B:] - ref_logps[B:]
    return -F.logsigmoid(beta * (rho_w - rho_l)).mean(), rho_w.detach(), rho_l.detach()


MEAN_STEPS, H = 30, 32
held_out = collate([(e["prompt_ids"], e["chosen_ids"], e["rejected_ids"]) for e in eval_set[:H]], pad_id)
lengths = held_out["completion_mask"][:, 1:].sum(1)
print(f"completion lengths of {H} held-out pairs: mean {lengths.float().mean():.1f} tokens")
for name, loss_fn in (("sum (DPO)", dpo_loss), ("your reduce", dpo_loss_reduced)):
    policy, reference = load_policy_and_reference(cfg.model)
    history = train(policy, reference, pairs, pad_id, beta=cfg.beta, lr=FULL_LR, steps=MEAN_STEPS,
                    loss_fn=loss_fn)
    with torch.no_grad():
        logps = per_token_logps(policy, held_out).sum(1)
        ref_logps = per_token_logps(reference, held_out).sum(1)
        yours = loss_fn(policy, reference, held_out, cfg.beta)[0]
    rho_w, rho_l = logps[:H] - ref_logps[:H], logps[H:] - ref_logps[H:]
    norm, _, _ = losses.dpo_loss(logps[:H], logps[H:], ref_logps[:H], ref_logps[H:], loss_type="sigmoid_norm",
                                 beta=cfg.beta, chosen_lengths=lengths[:H], rejected_lengths=lengths[H:])
    print(f"{name:<12} loss at step 1 {history[0]:.4f}, at step {MEAN_STEPS} {history[-1]:.4f}; on the "
          f"held-out pairs, summed log-ratios: Δ {(rho_w - rho_l).mean():.2f}, ρ_w {rho_w.mean():.2f}, "
          f"ρ_l {rho_l.mean():.2f}")
print(f"your reduce is loss_type='sigmoid_norm': {torch.allclose(yours, norm.mean())}")
check(prediction, history[0])

# %% [markdown]
# <details><summary><b>Answer</b> (open after running)</summary>
#
# (a) $\ln 2$: at step 0 every log-ratio is 0, however it is reduced. (b) Higher, and further. The
# mean divides each log-ratio by its length (21.6 tokens here), so the loss sees a margin about 20
# times smaller, its σ weight stays near $\frac12$, and the loss falls slowly (0.6541 against 0.5013
# at step 30). But Adam normalises the gradient's scale, so the weights move as fast as before with
# the brake of §2 off: on held-out pairs the summed margin is 14.84 nats against 7.30, and
# $\rho_w$ −6.89 against −2.05. In effect β is divided by the completion length. (c) `sigmoid_norm`
# (the cell printed whether your `reduce` equals it). DPO as derived sums: $\log\pi(y\mid x)$ is the
# sum of the completion's token log-probs.
# </details>

# %% [markdown]
# **One prompt per pair (optional).** Rows $i$ and $B+i$ start with the same prompt, so the
# concatenated batch computes every prompt twice. `prefix_sharing.share_prompts` packs each pair as
# one row $[x; y_w; y_l]$: the positions of $y_l$ restart right after $x$, and a 4D attention mask
# keeps $y_l$'s tokens from seeing $y_w$'s, so every token sees the tokens and positions it sees in
# its own row (Wang et al. 2024, arXiv:2410.20305). It needs one prompt for both completions, which
# per-pair truncation guarantees. `dpo.main` uses it where a check on real batches shows it exact.

# %%
shared = prefix_sharing.share_prompts(batch, pad_id)
with torch.no_grad():
    shared_per_token, _ = dpo.completion_logps(reference, {**batch, **shared})
    concatenated, _ = dpo.completion_logps(reference, batch)
assert torch.allclose(shared_per_token, concatenated, atol=1e-5)
print(f"token slots: concatenated rows {tuple(batch['input_ids'].shape)} = {batch['input_ids'].numel()}, "
      f"shared rows {tuple(shared['shared_input_ids'].shape)} = {shared['shared_input_ids'].numel()}")
n = int((shared["shared_input_ids"][0] != pad_id).sum())  # pair 0 without its padding
prompt_len, chosen_len = int(batch["completion_mask"][0].argmax()), int(batch["completion_mask"][0].sum())
fig, ax = plt.subplots(figsize=(5, 5))
ax.imshow(shared["shared_attention_mask"][0, 0, :n, :n], cmap="Greys")
for edge in (prompt_len, prompt_len + chosen_len):
    ax.axhline(edge - 0.5, color="tab:red", lw=0.8), ax.axvline(edge - 0.5, color="tab:red", lw=0.8)
ax.set_xlabel("key (attended) token")
ax.set_ylabel("query token")
ax.set_title("pair 0: [prompt; chosen; rejected], black = attends")
plt.show()
print("positions of pair 0:", shared["shared_position_ids"][0, :n].tolist())

# %% [markdown]
# **The full run.** `python dpo.py` trains LoRA adapters (rank 16 on every linear layer), which start
# at zero: at step 0 the policy *is* the reference, and the reference is the same network with its
# adapters off (Appendix B). It logs TRL's metrics (batch means of the notation table's `rewards/*`,
# and `rewards/accuracies`, the fraction of pairs with $\Delta > 0$) to `output_dir/metrics.jsonl`,
# and `eval_*`, the same on the 280 held-out pairs. Below, 100 steps (the full demo is 265).
#
# These numbers are from one thread of one CPU. Other vector kernels, a second thread, or rounding
# noise in every matrix product moved the trained numbers by up to about 1%, and §6's sampled ones by
# up to about 5% (measured in `tests/test_notebook.py`). A GPU was not measured: its kernels round
# differently again, and §6's samples would be other draws altogether, since generation there uses
# CUDA's random-number generator, another stream than the CPU's for the same seed.

# %% tags=["trained"]
log = run_main("run", "--max_steps", "100", "--logging_steps", "5", "--eval_steps", "25")
records = [json.loads(line) for line in (WORK / "run" / "metrics.jsonl").read_text().splitlines()]
train_log, eval_log = [r for r in records if "loss" in r], [r for r in records if "eval_loss" in r]
print(f"{'step':>4} {'eval_loss':>9} {'accuracy':>8} {'βρ_w':>8} {'βρ_l':>8} {'βΔ':>7}")
for r in eval_log:
    print(f"{r['step']:>4} {r['eval_loss']:>9.4f} {r['eval_rewards/accuracies']:>8.3f} "
          f"{r['eval_rewards/chosen']:>8.3f} "
          f"{r['eval_rewards/rejected']:>8.3f} {r['eval_rewards/margins']:>7.3f}")

fig, axes = plt.subplots(2, 2, figsize=(11, 7), sharex=True)
panels = [("loss", ["loss"]), ("implicit rewards βρ (nats)", ["rewards/chosen", "rewards/rejected"]),
          ("reward margin βΔ (nats)", ["rewards/margins"]),
          ("fraction of pairs with Δ > 0", ["rewards/accuracies"])]
for ax, (ylabel, keys) in zip(axes.flat, panels):
    for key in keys:
        line, = ax.plot([r["step"] for r in train_log], [r[key] for r in train_log], label=key)
        ax.plot([r["step"] for r in eval_log], [r["eval_" + key] for r in eval_log], "o--",
                color=line.get_color(), label="eval_" + key)
    ax.axhline(0, color="grey", lw=0.5)
    ax.set_ylabel(ylabel)
    ax.legend()
for ax in axes[1]:
    ax.set_xlabel("step")
fig.tight_layout()
plt.show()

# %% [markdown]
# The held-out accuracy climbs to 0.957 while **both** implicit rewards go negative, the rejected
# one faster (at step 100: $\beta\rho_w$ = −2.560, $\beta\rho_l$ = −7.598). That is §2's second
# failure mode on the real model: the margin grows while both completions of each pair lose
# probability, which goes to text in no pair (§6 shows what).

# %% [markdown]
# ## 6. What DPO did
#
# Preference accuracy says the policy *ranks* two given completions correctly; the paper asks whether
# it *writes* better ones (Section 6.1). `sample_eval` samples held-out prompts from both models with
# the same seed, scores the samples with the true reward, and estimates the KL that Eq. 3 pays for,
# $\mathbb{E}_{y\sim\pi_\theta}[\log\pi_\theta(y\mid x) - \log\pi_{\rm ref}(y\mid x)]$ nats per
# sequence. A third measure the reward does not see: **fluency**, the fraction of complete sentences
# the grammar that wrote the data can write (`scripts/make_assets.py`'s `grammatical`). Intervals
# are 95% bootstrap intervals over the prompts: sampling noise of this one run, not seed noise.

# %% tags=["sampled"]
from peft import PeftModel

sys.path.insert(0, str(Path("scripts").resolve()))
from make_assets import grammatical


def fluency(texts):
    """Per text: (grammatical complete sentences, complete sentences)."""
    out = []
    for text in texts:
        sentences = [s.strip() + " ." for s in text.split(" .")[:-1] if s.strip()]  # (the last: unfinished)
        out.append((sum(map(grammatical, sentences)), len(sentences)))
    return out


def bootstrap(values, statistic, n=2000, seed=0):
    """95% interval of statistic(values resampled with replacement), over the prompts."""
    g = torch.Generator().manual_seed(seed)
    draws = sorted(statistic([values[k] for k in torch.randint(len(values), (len(values),), generator=g)])
                   for _ in range(n))
    return draws[int(0.025 * n)], draws[int(0.975 * n) - 1]


def ratio(pairs):
    return sum(a for a, _ in pairs) / max(1, sum(b for _, b in pairs))


def mean(xs):
    return sum(xs) / len(xs)


prompts = [e["prompt_ids"] for e in eval_set[:64]]  # held-out prompts, as dpo.main tokenizes them
policy = PeftModel.from_pretrained(dpo.load_model(cfg, cfg.model, device, trainable=False),
                                   WORK / "run" / "model")
result = sample_eval(policy, tokenizer, prompts, score=SCORE, reference=None, reward_fn=sentiment_score,
                     seed=0, show=3)
del policy
samples = result["samples"]
gain = [s["reward_policy"] - s["reward_reference"] for s in samples]
wins = [(s["reward_policy"] > s["reward_reference"]) + 0.5 * (s["reward_policy"] == s["reward_reference"])
        for s in samples]
kls = [s["policy_logp"] - s["reference_logp"] for s in samples]
fluent = {name: fluency([s["prompt"] + " " + s[name] for s in samples]) for name in ("reference", "policy")}
print(f"\n{'':<18} {'estimate':>8}   95% interval over prompts")
for label, values, statistic in (("reward gain", gain, mean), ("win rate", wins, mean),
                                 ("KL, nats", kls, mean), ("fluency, policy", fluent["policy"], ratio),
                                 ("fluency, reference", fluent["reference"], ratio)):
    low, high = bootstrap(values, statistic)
    print(f"{label:<18} {statistic(values):>8.3f}   {low:.3f} to {high:.3f}")

# %% [markdown]
# On these 64 prompts the policy gains 4.6 reward per review (interval 3.9 to 5.4) and wins 0.898 of
# the comparisons: it learned what the reward counts. But it is 44 nats from the reference, and less
# than half of its sentences are grammatical (0.454 against 0.991): the samples repeat phrases and
# break sentences. The reward counts sentiment words and cannot see grammar; the KL term of Eq. 3 is
# what keeps the policy near the fluent reference, and 100 steps at the demo's learning rate have
# spent a lot of it.

# %% [markdown]
# **Reward against KL (optional).** In Eq. 3, β is the price of a nat of KL, so a smaller β should
# buy more reward with more KL (the paper's Figure 2, left). Below: β ∈ {0.03, 0.3, 3}, three seeds
# each (the seed sets the LoRA initialisation and the data order), 30 steps of `dpo.dpo_step` at the
# demo's learning rate, then `sample_eval` on 32 held-out prompts × 2 samples. Each point is a run.

# %% tags=["sampled"]
FRONTIER_BETAS, FRONTIER_SEEDS, FRONTIER_STEPS = (0.03, 0.3, 3.0), (0, 1, 2), 30


def train_lora(beta, steps, seed):
    """dpo.main's loop without its plumbing: LoRA policy, dpo.dpo_step, AdamW, linear decay, clipping."""
    run_cfg = dataclasses.replace(cfg, beta=beta, seed=seed)
    torch.manual_seed(seed)  # the LoRA initialisation
    model = dpo.load_model(run_cfg, run_cfg.model, device, trainable=True)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=run_cfg.learning_rate, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1 - s / steps)
    order = torch.randperm(len(train_set), generator=torch.Generator().manual_seed(seed)).tolist()
    size = run_cfg.per_device_train_batch_size
    for step in range(steps):
        chunk = [train_set[k] for k in order[step * size:(step + 1) * size]]
        loss, _ = dpo.dpo_step(run_cfg, model, None, dpo.to_device(data.collate(chunk, pad_id), device))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step(), schedule.step(), optimizer.zero_grad()
    return model


frontier = {}
for beta_f in FRONTIER_BETAS:
    for seed in FRONTIER_SEEDS:
        policy = train_lora(beta_f, FRONTIER_STEPS, seed)
        with contextlib.redirect_stdout(io.StringIO()):
            out = sample_eval(policy, tokenizer, prompts[:32], score=SCORE, reference=None,
                              reward_fn=sentiment_score,
                              num_samples=2, seed=1, show=0)
        texts_f = [s["prompt"] + " " + s["policy"] for s in out["samples"]]
        frontier[beta_f, seed] = dict(kl=out["kl"], reward=out["reward_policy"], length=out["length_policy"],
                                      fluency=ratio(fluency(texts_f)))
        del policy
reference_point = dict(kl=0.0, reward=out["reward_reference"], length=out["length_reference"],
                       fluency=ratio(fluency([s["prompt"] + " " + s["reference"] for s in out["samples"]])))
print(f"{'β':>5}  {'KL, nats: mean (min–max)':>25}  {'reward':>19}  {'fluency':>19}  {'length':>6}")
print(f"{'ref.':>5}  {0:>25.1f}  {reference_point['reward']:>19.2f}  {reference_point['fluency']:>19.2f}  "
      f"{reference_point['length']:>6.1f}")
for beta_f in FRONTIER_BETAS:
    runs = [frontier[beta_f, s] for s in FRONTIER_SEEDS]
    cells = {k: f"{mean([r[k] for r in runs]):.2f} ({min(r[k] for r in runs):.2f}–"
                f"{max(r[k] for r in runs):.2f})" for k in ("kl", "reward", "fluency")}
    print(f"{beta_f:>5}  {cells['kl']:>25}  {cells['reward']:>19}  {cells['fluency']:>19}  "
          f"{mean([r['length'] for r in runs]):>6.1f}")

fig, axes = plt.subplots(1, 2, figsize=(11, 4.3), sharex=True)
for ax, key, ylabel in ((axes[0], "reward", "mean reward of samples"), (axes[1], "fluency", "fluency")):
    ax.plot([0], [reference_point[key]], "k*", markersize=12, label="reference (SFT model)")
    for beta_f in FRONTIER_BETAS:
        ax.plot([frontier[beta_f, s]["kl"] for s in FRONTIER_SEEDS],
                [frontier[beta_f, s][key] for s in FRONTIER_SEEDS], "o", markersize=7,
                label=f"β = {beta_f}, {len(FRONTIER_SEEDS)} seeds")
    ax.set_xscale("symlog", linthresh=1)
    ax.set_xlabel("KL(π_θ ‖ π_ref), nats per sequence (log scale above 1)")
    ax.set_ylabel(ylabel)
axes[0].legend()
axes[1].set_ylim(0, 1.02)
fig.tight_layout()
plt.show()

# %% [markdown]
# With three seeds per β: the mean KL falls as β rises (6.83, 4.22 and 1.07 nats for β = 0.03, 0.3
# and 3), but single runs overlap (the β = 0.03 and 0.3 ranges share 4.73 to 5.77 nats): a seed moves
# a run about as much as a tenfold β. The mean reward rises from the reference's −0.45 to 1.67 at
# β = 3 and to about 2.5 at both smaller β: the extra KL of β = 0.03 bought no more reward (2.55
# against 2.54), only less fluency (0.87 against 0.91). Differences smaller than these are noise here
# (one run's reward gain from 64 samples had an interval 1.5 wide in the cell above).

# %% [markdown]
# ## Appendix A. The other loss variants
#
# The fourteen variants not drawn in §3, in the same setting (β = 1, $|y| = 1$, $\rho_w = \Delta/2$,
# $\rho_l = -\Delta/2$), in four groups; the dashed line is DPO. §3 checks their values at 0.
#
# - `exo_pair` (ε = 10⁻³) pulls hardest near 0; `robust` (ε = 0.1) subtracts a linear term, so its
#   weight never reaches 0; `discopop`'s gate switches between a logistic and an exponential term
#   within about ±0.2 of 0, where its weight dips below zero (−0.78 at 0).
# - `nca_pair`, `bco_pair`, `sppo_hard`, `apo_zero` and `apo_down` score $\rho_w$ and $\rho_l$
#   separately, so their curves depend on how $\Delta$ is split (here evenly); `nca_pair` and
#   `apo_down` penalise a rising $\rho_w$, so past some margin their loss rises with $\Delta$.
# - `aot` and `aot_unpaired` sort over the batch (one pair: DPO); `sigmoid_norm` and `rdpo` equal DPO
#   for equal one-token lengths; `sft` and `orpo` add an NLL whose gradient does not vanish.

# %%
GROUPS = [["exo_pair", "robust", "discopop"], ["nca_pair", "bco_pair", "sppo_hard"], ["apo_zero", "apo_down"],
          ["aot", "aot_unpaired", "sigmoid_norm", "rdpo", "sft", "orpo"]]
drawn = {name for name, _ in MAIN.values()}
assert sorted(sum(GROUPS, [])) == sorted(n for n in losses.LOSS_TYPES if n not in drawn)
fig, axes = plt.subplots(len(GROUPS), 2, figsize=(11, 3.2 * len(GROUPS)), sharex=True)
for group, row in zip(GROUPS, axes):
    for col, (ylabel, ylim) in enumerate((("loss ℓ(Δ)", (-0.5, 6)),
                                          ("gradient weight −dℓ/dΔ", (-1.5, 2)))):
        row[col].plot(grid, [v[col] for v in main_curves["DPO"]], "k--", lw=1, label="DPO")
        for name in group:
            row[col].plot(grid, [loss_and_weight(name, m)[col] for m in grid], lw=1.8, label=name)
        row[col].axhline(0, color="grey", lw=0.5), row[col].axvline(0, color="grey", lw=0.5)
        row[col].set_ylim(*ylim)
        row[col].set_ylabel(ylabel)
    row[0].legend(ncol=2)
for ax in axes[-1]:
    ax.set_xlabel("margin Δ (β = 1)")
fig.tight_layout()
plt.show()

# %% [markdown]
# ## Appendix B. LoRA, QLoRA and memory
#
# **LoRA** (Hu et al. 2021, arXiv:2106.09685) freezes each weight
# $W \in \mathbb{R}^{d_{\rm out}\times d_{\rm in}}$ and trains a low-rank update
# $W' = W + \frac{\alpha}{k} B_{\rm LoRA} A_{\rm LoRA}$ of rank $k$ (`--lora_r`, 16), with
# $B_{\rm LoRA} = 0$ at the start: $k(d_{\rm in} + d_{\rm out})$ trainable parameters instead of
# $d_{\rm in} d_{\rm out}$. For DPO it also gives the reference for free: adapters off.
#
# **QLoRA** (Dettmers et al. 2023, arXiv:2305.14314) stores the frozen $W$ in 4-bit NormalFloat
# (NF4): blocks of 64 weights share one absmax scale, each weight one of 16 levels at quantiles of a
# normal distribution. Double quantisation stores the scales in 8 bits with one fp32 scale per 256
# of them: $4 + 8/64 + 32/(64\cdot256) \approx 4.127$ bits per weight. Each block is dequantised to
# the compute dtype in the forward pass; the embedding and the LM head are not quantised.
# `--load_in_4bit` does this in `dpo.load_model`; bitsandbytes also runs it on a CPU, so the counts
# below are real models.

# %%
def count(model):
    # parameters as the model sees them: a packed 4-bit weight holds 2 per byte; quant_state has its shape
    total = sum(p.quant_state.shape.numel() if hasattr(p, "quant_state") else p.numel()
                for p in model.parameters())
    return total, sum(p.numel() for p in model.parameters() if p.requires_grad)


print(f"{'mode':<8} {'parameters':>11} {'trainable':>10} {'share':>7} {'weights in memory':>18}")
models = {}
for mode, args in (("full", ["--use_peft", "False"]), ("LoRA", []), ("QLoRA", ["--load_in_4bit"])):
    mode_cfg = options.parse_args(["--output_dir", str(WORK / "unused")] + args)
    models[mode] = dpo.load_model(mode_cfg, mode_cfg.model, device, trainable=True)
    total, trainable = count(models[mode])
    print(f"{mode:<8} {total:>11,} {trainable:>10,} {trainable / total:>7.1%} "
          f"{models[mode].get_memory_footprint() / 2**20:>14.2f} MiB")
weight = models["QLoRA"].base_model.model.model.layers[0].self_attn.q_proj.base_layer.weight
print(f"QLoRA's first attention projection stores {type(weight).__name__} {weight.dtype} "
      f"{tuple(weight.shape)}: {weight.quant_state.shape.numel():,} weights in {weight.numel():,} bytes, "
      f"blocksize {weight.quant_state.blocksize}")

# %% [markdown]
# **Memory arithmetic**, costed as `dpo.main` builds each mode, for one micro-batch of one pair of
# 1024-token rows ($T = 2048$ tokens) with gradient checkpointing. $N$ parameters ($N_{\rm lin}$ in
# the decoder's linear layers, $N_{\rm emb}$ in embedding and LM head), $L$ layers, hidden size
# $d$, MLP size $d_{\rm ff}$, key/value width $d_{\rm kv}$, vocabulary $V$, LoRA rank $k = 16$ on the
# 7 linear layers of each block, so $P = L\,k\sum_{\rm lin}(d_{\rm in}+d_{\rm out})$ trainable
# parameters. Full fine-tuning keeps fp32 weights and a frozen fp32 copy as the
# reference (a bf16 copy would differ from the policy before any step); LoRA and QLoRA make no copy.
#
# | term | full fine-tuning | LoRA (bf16 base) | QLoRA (NF4 base) |
# |---|---|---|---|
# | policy weights | $4N$ | $2N$ | $\frac{4.127}{8}N_{\rm lin} + 2N_{\rm emb}$ |
# | reference | $4N$ | 0 | 0 |
# | gradient + AdamW's two moments | $12N$ (fp32) | $16P$ | $16P$ |
# | activations | $2TdL + 2T(6d + 2d_{\rm kv} + 4d_{\rm ff})$ | same | same |
# | logits | $2 \cdot 4 \cdot C\,V$ | same | same |
#
# *Activations*: one bf16 hidden state per layer boundary, plus one layer's activations while it is
# recomputed. *Logits*: `dpo.completion_logps` projects $C$ tokens at a time (its `chunk_tokens`,
# read from the code below) in fp32, and recomputes them in backward. Plus an allowance of 1 GiB for
# the CUDA context and allocator slack (an assumption). All estimates, good to about a GiB; a run's
# real peak is `peak_memory_gb` (GiB) in its `metrics.jsonl`. Cards sold as 16 GB and 24 GB report
# 15–16 GiB and 22.5–24 GiB (a T4 15.0 GiB; an A10G or L4 22.5 GiB), so the table compares with 15
# and 22.5 GiB. The cell checks the counting formulas on the shipped model first.

# %%
def shapes(c):
    # (d_in, d_out) of the 7 linear layers of one decoder block: q, k, v, o, gate, up, down
    d_kv = c["hidden"] // c["heads"] * c["kv_heads"]
    return [(c["hidden"], c["hidden"]), (c["hidden"], d_kv), (c["hidden"], d_kv), (c["hidden"], c["hidden"]),
            (c["hidden"], c["inter"]), (c["hidden"], c["inter"]), (c["inter"], c["hidden"])]


def parameters(c):
    # (N_lin, N_emb, N): linear weights (+ q/k/v biases), embedding (+ untied LM head) and norms, total
    d_kv = c["hidden"] // c["heads"] * c["kv_heads"]
    linear = c["layers"] * (sum(a * b for a, b in shapes(c)) + c["qkv_bias"] * (c["hidden"] + 2 * d_kv))
    other = c["vocab"] * c["hidden"] * (1 if c["tied"] else 2) + (2 * c["layers"] + 1) * c["hidden"]
    return linear, other, linear + other


def lora_parameters(c, rank=16):
    return c["layers"] * rank * sum(a + b for a, b in shapes(c))


tiny = models["full"].config
tiny_c = dict(hidden=tiny.hidden_size, heads=tiny.num_attention_heads, kv_heads=tiny.num_key_value_heads,
              inter=tiny.intermediate_size, layers=tiny.num_hidden_layers, vocab=tiny.vocab_size,
              tied=tiny.tie_word_embeddings, qkv_bias=False)
assert parameters(tiny_c)[2] == count(models["full"])[0], "the parameter formula misses the shipped model"
assert lora_parameters(tiny_c, cfg.lora_r) == count(models["LoRA"])[1], "the LoRA formula does not match peft"
del models

configs = {  # from each model's config.json on the Hugging Face hub
    "Qwen2.5-0.5B": dict(hidden=896, heads=14, kv_heads=2, inter=4864, layers=24, vocab=151936, tied=True,
                         qkv_bias=True),
    "Mistral-7B": dict(hidden=4096, heads=32, kv_heads=8, inter=14336, layers=32, vocab=32000, tied=False,
                       qkv_bias=False),
    "Llama-3.1-8B": dict(hidden=4096, heads=32, kv_heads=8, inter=14336, layers=32, vocab=128256, tied=False,
                         qkv_bias=False),
}
chunk = inspect.signature(dpo.completion_logps).parameters["chunk_tokens"].default
GiB, n_tokens, overhead, cards = 2**30, 2 * 1024, 1.0, (15.0, 22.5)
print(f"the formulas match the shipped model (N = {parameters(tiny_c)[2]:,}, "
      f"LoRA P = {lora_parameters(tiny_c):,}); "
      f"dpo.completion_logps's chunk_tokens C = {chunk}\n")
print(f"{'model':<13} {'N':>6} {'method':<6} {'policy':>7} {'ref':>6} {'grad+Adam':>9} {'activ.':>7} "
      f"{'logits':>7} "
      f"{'GiB':>6}  {'≤ 15':>5} {'≤ 22.5':>6}")
for name, c in configs.items():
    n_lin, n_emb, n_all = parameters(c)
    p = lora_parameters(c)
    d_kv = c["hidden"] // c["heads"] * c["kv_heads"]
    activations = (2 * n_tokens * c["hidden"] * c["layers"]
                   + 2 * n_tokens * (6 * c["hidden"] + 2 * d_kv + 4 * c["inter"]))
    for method, weights, ref, trainable in (("full", 4 * n_all, 4 * n_all, 12 * n_all),
                                            ("LoRA", 2 * n_all, 0, 16 * p),
                                            ("QLoRA", 4.127 / 8 * n_lin + 2 * n_emb, 0, 16 * p)):
        logits = 2 * 4 * chunk * c["vocab"]
        terms = [weights / GiB, ref / GiB, trainable / GiB, activations / GiB, logits / GiB]
        total = sum(terms) + overhead
        print(f"{name:<13} {n_all / 1e9:>5.2f}B {method:<6} "
              + " ".join(f"{t:>{width}.2f}" for t, width in zip(terms, (7, 6, 9, 7, 7)))
              + f" {total:>6.1f}  "
              + " ".join(f"{'yes' if total <= card else 'no':>{w}}" for card, w in zip(cards, (5, 6))))

# %% [markdown]
# Reading the table. Full fine-tuning as `dpo.py` does it costs 20 bytes per parameter before any
# activation: 10.7 GiB for 0.5B, 137–152 GiB for 7–8B. LoRA drops the reference copy and the base's
# optimizer state and keeps the base in bf16: Mistral-7B needs 16.0 GiB, more than a 16 GB card's
# 15, Llama-3.1-8B 17.6; both fit 22.5. QLoRA stores each linear weight in about half a byte: 6.3
# and 8.0 GiB, of which 1.96 GiB is Llama-3's bf16 embedding and LM head. Longer rows or more pairs
# per micro-batch grow the activations in proportion; `--gradient_accumulation_steps` does not.

# %%
shutil.rmtree(WORK)  # the runs of §5 and §6; comment this out to keep them
print(f"wall time: notebook ran in {time.time() - start_time:.0f} s on {device}")

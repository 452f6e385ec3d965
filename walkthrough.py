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
# This notebook goes from the equation to a trained model and prints every tensor on the way. It writes the core of
# DPO by hand (the loss, the per-token log-probabilities, a training loop), checks each piece against this
# repository's own modules (`losses.py`, `data.py`, `dpo.py`, `sample_eval.py`, `sentiment.py`), and only then calls
# `dpo.main`, so what you read here is what `python dpo.py` runs.
#
# 1. From the RLHF objective to the DPO loss: the closed-form optimum, Theorem 1, why $Z(x)$ cancels, which $\pi_{\rm ref}$
# 2. Two failure modes on the toy: deterministic preferences (DPO against IPO), and both log-probabilities falling
# 3. The loss zoo: six main variants on one pair of axes, every variant checked at $\Delta = 0$
# 4. Data: a row, its tokens, truncation per row against per pair, the scored (shifted) mask
# 5. The core by hand: per-token log-probabilities, the loss, the Eq. 7 gradient, a 20-line training loop checked
#    against `dpo.main`; then `dpo.main` for the full run
# 6. What DPO did: samples before and after, and the reward–KL frontier for three β
#
# Appendix A: the other loss variants. Appendix B: LoRA, QLoRA and the memory arithmetic of 0.5B–8B models.
#
# The paper is "Direct Preference Optimization: Your Language Model is Secretly a Reward Model", Rafailov et al.,
# 2023, [arXiv:2305.18290](https://arxiv.org/abs/2305.18290); "Eq. n" below means its equation n.
#
# **Symbols** (each means one thing): $r(x, y)$ a reward; $\rho_w = \log\frac{\pi_\theta(y_w\mid x)}{\pi_{\rm ref}(y_w\mid x)}$
# and $\rho_l$ the same for $y_l$ (the *log-ratios*, `chosen_logratios` and `rejected_logratios` in `losses.py`, which
# calls them c and r); the margin $\Delta = \rho_w - \rho_l$; $\beta$ the KL strength; $B$ pairs per batch; $T$ tokens
# per row; $V$ the vocabulary; $d$ the hidden size; $k$ the LoRA rank.
#
# Run it from the repository root. It runs top to bottom in about four minutes on one CPU core (it uses the device
# `dpo.main` picks; on a GPU the numbers differ in their last digits). Everything it writes goes to a temporary
# folder, deleted at the end. The file you read is `walkthrough.py`, paired with `walkthrough.ipynb` by jupytext.

# %%
import contextlib
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
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # "Failed to load CPU gemm_4bit_forward" (an optional kernel)
warnings.filterwarnings("ignore", category=FutureWarning, message=".*is_gradient_checkpointing.*")  # raised inside peft
warnings.filterwarnings("ignore", message="IProgress not found")  # tqdm.auto without ipywidgets (its bar is off anyway)

import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F

assert Path("dpo.py").exists(), "start the notebook from the repository root (the folder with dpo.py)"
sys.path.insert(0, os.getcwd())

import data
from harness import datafiles
import dpo
from speedups import prefix_sharing
from harness import options
import losses
from demo.sample_eval import sample_eval
from demo.sentiment import sentiment_score

start_time = time.time()
device = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # the rule dpo.main uses
if device.type == "cpu":
    torch.set_num_threads(1)  # the shipped model is tiny (d = 128): a second thread mostly waits (dpo.main does the same)
WORK = Path(tempfile.mkdtemp(prefix="dpo-walkthrough-"))  # every run of this notebook writes here, not in the repo
torch.set_printoptions(precision=4, linewidth=160, sci_mode=False)
plt.rcParams.update({"figure.dpi": 72, "savefig.dpi": 72})  # small images: the notebook is committed with its outputs
print(f"torch {torch.__version__}, device {device}")

# %% [markdown]
# ## 1. From the RLHF objective to the DPO loss
#
# RLHF assumes preferences follow the Bradley–Terry model with a latent reward $r^*$ (Eq. 1)
#
# $$p^*(y_1 \succ y_2 \mid x) = \frac{\exp r^*(x, y_1)}{\exp r^*(x, y_1) + \exp r^*(x, y_2)}
# = \sigma\big(r^*(x, y_1) - r^*(x, y_2)\big),$$
#
# fits a reward model $r$ to the pairs by maximum likelihood (Eq. 2), and then maximises the reward while staying
# close to a reference policy $\pi_{\rm ref}$, with a KL penalty of strength $\beta$ (Eq. 3):
#
# $$\max_{\pi}\; \mathbb{E}_{x\sim\mathcal D,\; y\sim\pi(\cdot\mid x)}\big[r(x, y)\big]
# \;-\; \beta\, \mathbb{D}_{\rm KL}\big[\pi(y\mid x)\,\|\,\pi_{\rm ref}(y\mid x)\big].$$
#
# **The optimum in closed form (Eq. 4).** For one prompt $x$, put the reward inside the logarithm (Appendix A.1):
#
# $$\mathbb{E}_{\pi}[r] - \beta\,\mathbb{D}_{\rm KL}(\pi\|\pi_{\rm ref})
# = -\beta\,\mathbb{E}_{y\sim\pi}\Big[\log\frac{\pi(y\mid x)}{\pi_{\rm ref}(y\mid x)\,e^{r(x,y)/\beta}}\Big]
# = \beta\log Z(x) \;-\; \beta\,\mathbb{D}_{\rm KL}\big(\pi\,\|\,\pi_r\big),$$
#
# $$\pi_r(y\mid x) = \frac{1}{Z(x)}\,\pi_{\rm ref}(y\mid x)\exp\Big(\frac{1}{\beta}r(x, y)\Big),
# \qquad Z(x) = \sum_y \pi_{\rm ref}(y\mid x)\exp\Big(\frac{1}{\beta}r(x, y)\Big).$$
#
# $\beta \log Z(x)$ does not depend on $\pi$ and a KL divergence is $\ge 0$, zero only when the two distributions are
# equal: $\pi_r$ is the maximiser. It cannot be computed directly: $Z(x)$ sums over every possible completion.
#
# **The implicit reward (Eq. 5).** Take the logarithm of Eq. 4 and solve for the reward:
# $r(x, y) = \beta\log\frac{\pi_r(y\mid x)}{\pi_{\rm ref}(y\mid x)} + \beta\log Z(x)$.
# Read backwards, every policy $\pi_\theta$ defines a reward $\hat r_\theta(x, y) = \beta\log\frac{\pi_\theta(y\mid x)}{\pi_{\rm ref}(y\mid x)}$,
# up to a term $\beta\log Z(x)$ that depends on the prompt only.
#
# **Theorem 1: no generality is lost.** Call two rewards *equivalent* when they differ by a function of the prompt
# only, $r'(x, y) = r(x, y) + f(x)$: they give the same Bradley–Terry probabilities (the $f(x)$ cancels in the
# difference) and the same optimal policy (it cancels in the normalisation of Eq. 4). The paper's Theorem 1 (with
# Lemmas 1 and 2) says that every equivalence class contains exactly one reward of the form
# $\beta\log\frac{\pi(y\mid x)}{\pi_{\rm ref}(y\mid x)}$ for some policy $\pi$: pick $\pi = \pi_r$ and subtract $\beta\log Z(x)$.
# So searching over policies, as DPO does, searches over every reward model RLHF could have fitted, up to what
# preferences cannot tell apart anyway.
#
# **Why $Z(x)$ cancels (Eq. 6).** Bradley–Terry only sees the *difference* of the rewards of two completions of the
# *same* prompt, so $\beta\log Z(x)$ appears twice with opposite signs:
#
# $$p^*(y_1 \succ y_2 \mid x) = \sigma\Big(\beta\log\frac{\pi^*(y_1\mid x)}{\pi_{\rm ref}(y_1\mid x)}
# - \beta\log\frac{\pi^*(y_2\mid x)}{\pi_{\rm ref}(y_2\mid x)}\Big).$$
#
# (Both completions must be scored under the same $x$: §4 shows how truncation can break this.)
#
# **The DPO loss (Eq. 7)** is the negative log-likelihood of the preferences under this model:
#
# $$\mathcal L_{\rm DPO}(\pi_\theta;\pi_{\rm ref}) = -\mathbb{E}_{(x, y_w, y_l)\sim\mathcal D}\big[\log\sigma(\beta\rho_w - \beta\rho_l)\big]
# = -\mathbb{E}\big[\log\sigma(\beta\Delta)\big].$$
#
# **Which $\pi_{\rm ref}$.** The derivation assumes the pairs were sampled from $\pi_{\rm ref}$ (Section 5.1 and 6.1
# of the paper: $y_1, y_2 \sim \pi_{\rm SFT}(\cdot\mid x)$, and $\pi_{\rm ref} = \pi_{\rm SFT}$). The KL of Eq. 3 is
# measured against it, and Eq. 7 only sees completions in the data, so a $\pi_{\rm ref}$ that gives the data little
# probability leaves most of the policy's mass unconstrained by any pair. When the pairs come from elsewhere, the
# paper first fine-tunes on the chosen completions to get a reference close to the data ("Preferred-FT"). Here the
# shipped pairs were sampled from the shipped SFT model, and `dpo.main`'s reference is that model.
#
# The cell below checks each step on a problem small enough to enumerate: one prompt with five completions.

# %%
beta = 0.5
pi_ref = torch.tensor([0.40, 0.25, 0.15, 0.12, 0.08], dtype=torch.float64)  # the reference policy over 5 completions
reward = torch.tensor([0.0, 1.0, -0.5, 2.0, 0.5], dtype=torch.float64)       # the true reward r*(x, y)

def objective(pi):
    # Eq. 3 for one prompt: E_pi[r] - beta KL(pi || pi_ref)
    return (pi * reward).sum() - beta * (pi * (pi / pi_ref).log()).sum()

Z = (pi_ref * torch.exp(reward / beta)).sum()
pi_star = pi_ref * torch.exp(reward / beta) / Z  # Eq. 4

# The identity behind Eq. 4: objective(pi) = beta log Z - beta KL(pi || pi_star), for any pi (here 1000 random ones).
torch.manual_seed(0)  # the same 1000 policies on every run (the committed outputs are checked against a fresh run)
random_policies = torch.distributions.Dirichlet(torch.ones(5, dtype=torch.float64)).sample((1000,))
for pi in random_policies:
    kl = (pi * (pi / pi_star).log()).sum()
    assert torch.isclose(objective(pi), beta * Z.log() - beta * kl)
best_random = max(objective(pi) for pi in random_policies)
print(f"objective at pi*: {objective(pi_star):.6f} = beta log Z = {beta * Z.log():.6f};  "
      f"best of 1000 random policies: {best_random:.6f}")

# Eq. 5: the implicit reward of pi* is the true reward shifted by beta log Z(x), the same for every completion.
implicit = beta * (pi_star / pi_ref).log()
assert torch.allclose(implicit + beta * Z.log(), reward)
# Theorem 1: an equivalent reward (r* + f(x)) has the same optimal policy.
shifted = pi_ref * torch.exp((reward + 3.0) / beta)
assert torch.allclose(shifted / shifted.sum(), pi_star)
# Eq. 6: Bradley-Terry probabilities from the implicit reward equal those from the true reward: Z(x) cancels.
bt_true = torch.sigmoid(reward[:, None] - reward[None, :])
bt_implicit = torch.sigmoid(implicit[:, None] - implicit[None, :])
assert torch.allclose(bt_true, bt_implicit)
print(f"implicit reward - true reward = {(implicit - reward).tolist()}  (each = -beta log Z = {-beta * Z.log():.4f})")
print("P(y_i > y_j) from the implicit reward, identical to the true reward's:\n", bt_implicit)

# %% [markdown]
# Now the other direction: minimise Eq. 7 over a free policy $\pi_\theta = \mathrm{softmax}(\theta)$, with every
# ordered pair $(y_i, y_j)$ weighted by how often Bradley–Terry prefers $y_i$ (infinite data). The loss comes from
# `losses.dpo_loss` (its `pair_weights` multiply each pair's loss). No reward model and no sampling are involved,
# yet the minimiser is the RLHF optimum $\pi^*$ of Eq. 4: $\sigma(\beta(\rho_i - \rho_j)) = p^*(y_i \succ y_j)$ for
# all pairs forces $\beta\rho_i = r^*(y_i) + \text{const}$.

# %%
i, j = torch.triu_indices(5, 5, offset=1)
i, j = torch.cat([i, j]), torch.cat([j, i])  # all 20 ordered pairs (y_i preferred, y_j rejected)
theta = pi_ref.log().clone().requires_grad_()  # start at the reference
optimizer = torch.optim.Adam([theta], lr=0.1)
for step in range(300):
    logp = torch.log_softmax(theta, dim=0)
    pair_losses, _, _ = losses.dpo_loss(logp[i], logp[j], pi_ref.log()[i], pi_ref.log()[j], beta=beta,
                                        pair_weights=bt_true[i, j])
    optimizer.zero_grad()
    pair_losses.sum().backward()
    optimizer.step()
pi_dpo = torch.softmax(theta.detach(), dim=0)
print(" y    pi_ref   r*(y)    pi* (Eq. 4)   pi_theta (min of Eq. 7)")
for y in range(5):
    print(f"{y:2d}   {pi_ref[y]:.3f}   {reward[y]:+.2f}     {pi_star[y]:.4f}        {pi_dpo[y]:.4f}")
assert torch.allclose(pi_dpo, pi_star, atol=1e-3)

# %% [markdown]
# ## 2. Two failure modes on the toy
#
# **Deterministic preferences.** Above, every pair was labelled with Bradley–Terry's probability, never 0 or 1. Real
# data has one label per pair; suppose $y_3$ (reward 2) always beats $y_1$ (reward 1): $p(y_3 \succ y_1) = 1$. The
# Bradley–Terry fit then wants $\sigma(\beta\Delta) = 1$, i.e. $\Delta = \infty$, *whatever* $\beta$ is: the KL
# term that $\beta$ was meant to weigh has vanished from the loss, and $\pi_\theta(y_1) \to 0$. This is the argument
# of Gheshlaghi Azar et al. 2023 ("A General Theoretical Paradigm to Understand Learning from Human Preferences",
# arXiv:2310.12036, Section 4.2) for **IPO**, whose loss $(\Delta - \frac{1}{2\beta})^2$ regresses the margin onto a
# finite target, so $\beta$ keeps its meaning.
#
# **How the σ weight stops degeneration.** DPO's gradient (Eq. 7, §5) weighs each pair by
# $\beta\sigma(-\beta\Delta)$: a pair already ranked right by a wide margin pulls little. The paper (Section 4)
# notes that without this weight (the *unlikelihood*-like loss $-\beta\Delta$, which pulls every pair equally
# forever) language models degenerate. The weight does not *stop* $\Delta$ from growing on one hard pair; it slows it
# from linear to logarithmic.
#
# The cell trains the toy on that single pair with plain gradient descent (learning rate 0.1; Adam would rescale the
# shrinking gradient and hide the σ weight's effect) for two values of β.

# %%
hard_w, hard_l = 3, 1  # y_3 always preferred over y_1
STEPS = 3000
checkpoints_at = [10, 100, 1000, 3000]

def train_hard_pair(loss_type, beta, steps=STEPS):
    theta = pi_ref.log().clone().requires_grad_()
    margins, record = [], {}
    for step in range(1, steps + 1):
        logp = torch.log_softmax(theta, dim=0)
        if loss_type == "no σ weight":  # -beta * margin: every step pulls with the same force
            loss = -beta * ((logp[hard_w] - pi_ref.log()[hard_w]) - (logp[hard_l] - pi_ref.log()[hard_l]))
        else:  # IPO's length division is moot here: each "completion" is one token
            loss, _, _ = losses.dpo_loss(logp[[hard_w]], logp[[hard_l]], pi_ref.log()[[hard_w]], pi_ref.log()[[hard_l]],
                                         loss_type=loss_type, beta=beta, chosen_lengths=torch.ones(1, dtype=torch.float64),
                                         rejected_lengths=torch.ones(1, dtype=torch.float64))
        theta.grad = None
        loss.sum().backward()
        with torch.no_grad():
            theta -= 0.1 * theta.grad
            logp = torch.log_softmax(theta, dim=0)
            margins.append(float((logp[hard_w] - pi_ref.log()[hard_w]) - (logp[hard_l] - pi_ref.log()[hard_l])))
            if step in checkpoints_at:
                pi = logp.exp()
                record[step] = (margins[-1], float(pi[hard_l]), float((pi * (logp - pi_ref.log())).sum()))
    return margins, record

runs_hard = {}
for beta_hard in (0.1, 1.0):
    for loss_type in ("sigmoid", "ipo", "no σ weight"):
        runs_hard[loss_type, beta_hard] = train_hard_pair(loss_type, beta_hard)

print(f"{'loss':<12} {'β':>4}  " + "  ".join(f"{'Δ at ' + str(s):>10}" for s in checkpoints_at)
      + f"  {'π(y_1) at end':>13} {'KL at end':>9}")
for (loss_type, beta_hard), (margins, record) in runs_hard.items():
    print(f"{loss_type:<12} {beta_hard:>4}  " + "  ".join(f"{record[s][0]:>10.3f}" for s in checkpoints_at)
          + f"  {record[STEPS][1]:>13.2e} {record[STEPS][2]:>9.3f}")
    if loss_type == "ipo":
        assert abs(margins[-1] - 1 / (2 * beta_hard)) < 1e-6  # IPO stops at its target 1/(2β)
    if loss_type == "sigmoid":
        assert margins[-1] > margins[999] > margins[99] and margins[-1] > 1 / (2 * beta_hard)  # past IPO's target

fig, ax = plt.subplots(figsize=(7.5, 4))
styles = {"sigmoid": "-", "ipo": "--", "no σ weight": ":"}
colors = {0.1: "tab:blue", 1.0: "tab:orange"}
for (loss_type, beta_hard), (margins, _) in runs_hard.items():
    name = "DPO" if loss_type == "sigmoid" else loss_type.upper() if loss_type == "ipo" else loss_type
    ax.plot(range(1, STEPS + 1), margins, styles[loss_type], color=colors[beta_hard], label=f"{name}, β = {beta_hard}")
ax.set_xscale("log")
ax.set_yscale("log")
ax.set_xlabel("gradient step")
ax.set_ylabel("margin Δ = ρ_w − ρ_l (nats)")
ax.set_title("one pair, always y_3 ≻ y_1: DPO's margin never stops")
ax.legend(fontsize=8, ncol=2)
plt.show()

# %% [markdown]
# What the table and plot show: IPO stops exactly at $\Delta = 1/(2\beta)$ (5 for β = 0.1, 0.5 for β = 1). DPO passes
# that point and keeps growing for both β: first linearly, like the unweighted loss, then slower as
# $\sigma(-\beta\Delta)$ shrinks (the curve bends down on these log-log axes; for β = 1 it is already near
# $\log(\text{step})/\beta$), driving $\pi_\theta(y_1)$ towards 0. Without the σ weight the
# margin grows linearly in the number of steps: the same loss, minus the brake. A smaller β makes DPO go *further*
# here, the opposite of what β promises in Eq. 3, because the loss reaches the same value at $\beta\Delta$, not at
# $\Delta$. With many pairs per prompt the labels contradict each other and finite data tempers this, but a prompt
# with a single pair in the data is exactly this toy.
#
# **Both log-probabilities fall.** Eq. 7 constrains only the margin $\Delta$. A real model shares parameters between
# completions, so pushing one pair apart moves every other completion too. Give the five completions words —
# $y_0$ = "fine", $y_1$ = "good", $y_2$ = "bad", $y_3$ = "good good", $y_4$ = "good bad" — and a policy that is
# log-linear in its word counts, $\log\pi_\theta(y) = \log\pi_{\rm ref}(y) + w_{\rm good}\,n_{\rm good}(y) + w_{\rm bad}\,n_{\rm bad}(y) - \log Z_\theta$,
# and train DPO on the single pair "good bad" ≻ "bad". The margin depends only on $w_{\rm good}$; raising it raises
# "good good" twice as fast as the chosen "good bad".

# %%
counts = torch.tensor([[0, 0], [1, 0], [0, 1], [2, 0], [1, 1]], dtype=torch.float64)  # (good, bad) per completion
texts = ["fine", "good", "bad", "good good", "good bad"]
w = torch.zeros(2, dtype=torch.float64, requires_grad=True)
chosen, rejected = 4, 2
history = []
for step in range(401):
    logp = torch.log_softmax(pi_ref.log() + counts @ w, dim=0)
    history.append(logp.detach().exp())
    loss, _, _ = losses.dpo_loss(logp[[chosen]], logp[[rejected]], pi_ref.log()[[chosen]], pi_ref.log()[[rejected]],
                                 beta=0.5)
    w.grad = None
    loss.sum().backward()
    with torch.no_grad():
        w -= 0.2 * w.grad
history = torch.stack(history)
logratio = (history / pi_ref).log()
print(f"{'step':>5} {'Δ':>7} {'ρ_w (good bad)':>15} {'ρ_l (bad)':>10}   π over " + ", ".join(texts))
for step in (0, 25, 50, 100, 200, 400):
    print(f"{step:>5} {logratio[step, chosen] - logratio[step, rejected]:>7.3f} {logratio[step, chosen]:>15.3f} "
          f"{logratio[step, rejected]:>10.3f}   " + "  ".join(f"{p:.3f}" for p in history[step]))
assert logratio[-1, chosen] < 0 and logratio[-1, rejected] < 0  # both completions of the pair lost probability
assert history[-1, 3] > 0.5  # ... to "good good", which is in no pair

fig, ax = plt.subplots(figsize=(7.5, 3.5))
ax.stackplot(range(len(history)), history.T.numpy(), labels=[f"y_{n}: {t}" for n, t in enumerate(texts)])
ax.set_xlabel("gradient step")
ax.set_ylabel("π_θ(y)")
ax.set_xlim(0, len(history) - 1)
ax.set_ylim(0, 1)
ax.set_title("DPO on 'good bad' ≻ 'bad': where the probability went")
ax.legend(loc="center left", bbox_to_anchor=(1, 0.5), fontsize=8)
plt.show()

# %% [markdown]
# The chosen "good bad" first gains probability, then loses it: once the policy expects more than one "good" per
# completion, every further step moves mass to "good good" faster than to "good bad". By step 400 both completions of
# the pair are less likely than under the reference ($\rho_w < 0$ and $\rho_l < 0$) while the margin still grows,
# and the probability went to "good good", a completion that appears in no pair. On the shipped task this is the
# DPO run of §5: its chosen completions are samples of the SFT model that merely beat another sample, and the policy
# moves probability to reviews more positive still. DPO-Positive (`dpop`, §3) penalises $\rho_w < 0$ for this
# reason (Pal et al. 2024, arXiv:2402.13228; see also Razin et al. 2024, "Unintentional Unalignment: Likelihood
# Displacement in Direct Preference Optimization", arXiv:2410.08847).

# %% [markdown]
# ## 3. The loss zoo
#
# Every variant in `losses.LOSSES` is a function of the same four summed log-probabilities. DPO is
# $\ell(\Delta) = -\log\sigma(\beta\Delta)$ and its **gradient weight** $-\frac{d\ell}{d\Delta} = \beta\,\sigma(-\beta\Delta)$
# is how hard a pair pulls. To put six main variants on the same axes I take $\beta = 1$ for all of them (so the x
# axis, the margin $\Delta$, is also the reward margin $\beta\Delta$ in nats), completions of $|y| = 1$ token (so the
# length-normalised losses read $\Delta$ itself), $\rho_w = \Delta/2$ and $\rho_l = -\Delta/2$ (the policy moves both
# completions equally, in opposite directions), reference log-probs of $-4$, and the other hyperparameters at
# their defaults:
#
# | variant | `loss_type` | $\ell$ | what it changes |
# |---|---|---|---|
# | DPO | `sigmoid` | $-\log\sigma(\beta\Delta)$ | (Eq. 7) |
# | cDPO | `sigmoid`, ε = 0.1 | $-(1-\varepsilon)\log\sigma(\beta\Delta) - \varepsilon\log\sigma(-\beta\Delta)$ | a label is wrong with probability ε: a finite optimum, $\beta\Delta = \log\frac{1-\varepsilon}{\varepsilon}$ |
# | IPO | `ipo` | $(\Delta/\lvert y\rvert - \frac{1}{2\beta})^2$ | regresses onto a target margin (§2) |
# | hinge (SLiC) | `hinge` | $\max(0, 1 - \beta\Delta)$ | stops at $\beta\Delta = 1$ |
# | SimPO | `simpo` | $-\log\sigma(\frac{\beta}{\lvert y_w\rvert}\log\pi(y_w) - \frac{\beta}{\lvert y_l\rvert}\log\pi(y_l) - \gamma)$ | no reference; mean log-prob; a margin γ = 0.5 |
# | DPO-Positive | `dpop` | $-\log\sigma(\beta(\Delta - \lambda\max(0, -\rho_w)))$ | λ = 50 times the chosen log-ratio's shortfall (§2) |
#
# The gradient is taken by autograd through `losses.dpo_loss`.

# %%
ZOO_BETA, ZOO_LENGTH, ZOO_REF = 1.0, 1, -4.0
EXTRA = {"exo_pair": dict(label_smoothing=1e-3), "robust": dict(label_smoothing=0.1)}

def loss_and_weight(name, margin, **options):
    # (loss, -dloss/dΔ) of one pair at margin Δ, under the parameterisation above
    margin = torch.tensor([float(margin)], dtype=torch.float64, requires_grad=True)
    ref = torch.full((1,), ZOO_REF, dtype=torch.float64)
    lengths = torch.full((1,), float(ZOO_LENGTH), dtype=torch.float64)
    loss, _, _ = losses.dpo_loss(ref + margin / 2, ref - margin / 2, ref, ref, loss_type=name, beta=ZOO_BETA,
                                 chosen_lengths=lengths, rejected_lengths=lengths, **{**EXTRA.get(name, {}), **options})
    (grad,) = torch.autograd.grad(loss.sum(), margin)
    return loss.item(), -grad.item()

grid = torch.linspace(-6, 6, 241).tolist()
MAIN = {"DPO": ("sigmoid", {}), "cDPO (ε = 0.1)": ("sigmoid", dict(label_smoothing=0.1)), "IPO": ("ipo", {}),
        "hinge": ("hinge", {}), "SimPO (γ = 0.5)": ("simpo", {}), "DPO-Positive (λ = 50)": ("dpop", {})}
main_curves = {label: [loss_and_weight(name, m, **opts) for m in grid] for label, (name, opts) in MAIN.items()}

fig, axes = plt.subplots(1, 2, figsize=(13, 4.2), sharex=True)
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
    ax.set_xlabel("margin Δ = ρ_w − ρ_l (β = 1: also the reward margin βΔ)")
axes[0].legend(fontsize=9)
axes[0].set_title("loss (clipped at 4; IPO and DPO-Positive leave the frame)")
axes[1].set_title("how hard a pair at margin Δ pulls")
fig.tight_layout()
plt.show()
print(f"{'':<22} {'ℓ(−4)':>8} {'ℓ(0)':>7} {'ℓ(4)':>7}   {'weight at −4':>12} {'at 0':>7} {'at 4':>7}")
for label, (name, opts) in MAIN.items():
    at = {m: loss_and_weight(name, m, **opts) for m in (-4, 0, 4)}
    print(f"{label:<22} {at[-4][0]:>8.3f} {at[0][0]:>7.3f} {at[4][0]:>7.3f}   {at[-4][1]:>12.3f} {at[0][1]:>7.3f} "
          f"{at[4][1]:>7.3f}")

# %% [markdown]
# What the curves show. **DPO** pulls with weight close to β = 1 on a pair ranked the wrong way and close to 0 on one
# ranked right by a wide margin, but never exactly 0: §2's unbounded margin. **cDPO**'s weight crosses zero at
# $\beta\Delta = \log(0.9/0.1) = 2.2$ and pushes back beyond it: a finite optimum, because a label may be wrong.
# **IPO** (a parabola with its minimum at $\Delta = 1/(2\beta) = 0.5$) pulls linearly towards its target from both
# sides; its loss is 2.25 at $\Delta = -1$ and 20 at $\Delta = -4$. **Hinge** pulls with constant weight until
# $\beta\Delta = 1$, then not at all. **SimPO** is DPO's curve shifted right by γ = 0.5 (here $|y| = 1$ and the
# reference log-probs are equal, so only the shift shows; in general it has no reference at all and divides by the
# lengths). **DPO-Positive** equals DPO for $\Delta \ge 0$ (here $\rho_w = \Delta/2 \ge 0$) and, for $\Delta < 0$,
# adds $\lambda\max(0, -\rho_w)$ inside the sigmoid: its weight jumps to about $1 + \lambda/2 = 26$ (off the frame).
#
# At $\Delta = 0$ the policy equals the reference and each loss has a value that can be worked out by hand (with
# $\sigma(0) = \tfrac12$): DPO $\ln 2$; IPO $(0 - \frac{1}{2\beta})^2 = \frac{1}{4\beta^2}$; DiscoPOP's mixing weight is
# $\sigma(0) = \tfrac12$, so $\tfrac12\ln 2 + \tfrac12 e^0$; SimPO $\ln(1 + e^{\gamma})$; the NLL of `sft` and `orpo` is
# the reference's mean per-token NLL, $4/1 = 4$. The table checks *every* loss in `losses.py` against its closed
# form (a new loss makes this cell fail until its closed form is added); Appendix A plots the fourteen not drawn above.

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
print(f"{'loss_type':<13} {'ℓ(0) computed':>14} {'closed form':>38} {'value':>10}   −dℓ/dΔ at 0")
for name, (formula, value) in closed_forms.items():
    at_zero, weight = loss_and_weight(name, 0.0)
    assert math.isclose(at_zero, value, rel_tol=1e-9), (name, at_zero, value)
    print(f"{name:<13} {at_zero:>14.6f} {formula:>38} {value:>10.6f}   {weight:.4f}")
assert math.isclose(loss_and_weight("sigmoid", 0.0)[1], B1 / 2)  # β σ(0) = β/2

# %% [markdown]
# ## 4. Data: from a row to a batch
#
# The shipped preference set (`demo/assets/sentiment-prefs`) is a miniature of the paper's controlled-sentiment task
# (Section 6.1): the prompt is the start of a movie review, both completions were sampled from the shipped SFT model
# (`demo/assets/tiny-sentiment-lm`, which is therefore the right $\pi_{\rm ref}$, §1), and the more positive one (by
# `sentiment.sentiment_score`) is *chosen*.
#
# `data.prepare_dataset` turns each row into three lists of token ids. A standard (string) completion gets the EOS
# token appended, so the model also learns where to stop. A row with no `prompt` field is split by
# `data.extract_prompt`: the prompt is the longest common prefix of chosen and rejected. The loss needs
# $\log\pi(y\mid x) = \sum_t \log\pi(y_t\mid x, y_{<t})$ over the completion tokens only, so each sequence carries a
# **completion mask**: 1 on completion tokens, 0 on prompt and padding.
#
# `cfg` below is the configuration `python dpo.py` would use (the shipped model and data, and the demo's defaults).

# %%
from transformers import AutoTokenizer

cfg = options.parse_args(["--output_dir", str(WORK / "unused"), "--bf16", "False"])  # fp32 on every device: exact checks
print(f"beta {cfg.beta}, loss {cfg.loss_type}, max_length {cfg.max_length}, {cfg.truncation_mode}, truncation_scope "
      f"{cfg.truncation_scope}, LoRA {cfg.use_peft} (rank k = {cfg.lora_r}), learning rate {cfg.learning_rate}, "
      f"batch {cfg.per_device_train_batch_size} pairs, bf16 {cfg.bf16}")
tokenizer = AutoTokenizer.from_pretrained(cfg.model)
pad_id = data.pad_token_id(tokenizer)
train_rows, eval_rows = datafiles.load_preference_dataset(cfg.dataset, cfg.dataset_split, cfg.eval_split)
print(f"{len(train_rows)} training pairs, {len(eval_rows)} held-out pairs")

row = train_rows[0]
print("\nraw row:", json.dumps(row, indent=1))
implicit_row = data.extract_prompt(row["prompt"] + row["chosen"], row["prompt"] + row["rejected"])
print("\nextract_prompt on prompt+chosen, prompt+rejected:", implicit_row)

# %%
limits = dict(max_length=cfg.max_length, truncation_mode=cfg.truncation_mode, truncation_scope=cfg.truncation_scope)
train_set = data.prepare_dataset(train_rows, tokenizer, **limits)  # exactly as dpo.main prepares it
eval_set = data.prepare_dataset(eval_rows, tokenizer, name="eval", **limits)
example = train_set[0]
print(example)

one = data.collate([example], pad_id)  # rows: [prompt + chosen, prompt + rejected], right-padded to one width
print(f"\n{'pos':>3}  {'prompt + chosen':<16}{'id':>4} {'attn':>4} {'compl':>5}   |  {'prompt + rejected':<18}{'id':>4} "
      f"{'attn':>4} {'compl':>5}")
for t in range(one["input_ids"].shape[1]):
    cells = []
    for r in (0, 1):
        token_id = int(one["input_ids"][r, t])
        cells.append(f"{tokenizer.convert_ids_to_tokens(token_id):<16}{token_id:>4} {int(one['attention_mask'][r, t]):>4} "
                     f"{int(one['completion_mask'][r, t]):>5}")
    print(f"{t:>3}  {cells[0]}   |  {cells[1]}")

# %% [markdown]
# **Truncation, per row or per pair.** A sequence longer than `max_length` must lose tokens. `keep_end` (this
# project's default) drops the *start* of the prompt and keeps the completion with its EOS, which is what the
# preference is about; `keep_start` (TRL's default) keeps the prompt and drops the *end* of the completion.
#
# *Per row* (`--truncation_scope row`, TRL's rule) cuts prompt+chosen and prompt+rejected each on its own. With
# `keep_end` and completions of different lengths, the two rows then keep **different amounts of prompt**: the
# chosen completion is scored under one prompt $x$ and the rejected under another $x'$, so the $\beta\log Z(x)$ of
# §1 no longer cancels, and the margin mixes the preference with what the extra prompt tokens do to the
# log-probabilities. *Per pair* (`--truncation_scope pair`, the default; `data.truncate_pair`) cuts one prompt for
# both completions. Below: the longest pair of the training set, with `max_length` set so that something must go.

# %%
untruncated = data.prepare_dataset(train_rows, tokenizer, max_length=None, verbose=False)
long_pair = max(untruncated, key=lambda e: len(e["prompt_ids"]) + max(len(e["chosen_ids"]), len(e["rejected_ids"])))
short_max_length = max(len(long_pair["chosen_ids"]), len(long_pair["rejected_ids"])) + 3
print(f"prompt {len(long_pair['prompt_ids'])}, chosen {len(long_pair['chosen_ids'])}, rejected "
      f"{len(long_pair['rejected_ids'])} tokens; max_length {short_max_length}\n")

def kept_prompts(batch):
    # the prompt each row keeps: the tokens before its first completion token
    return [batch["input_ids"][r, :int(batch["completion_mask"][r].argmax())].tolist() for r in (0, 1)]

for mode in data.TRUNCATION_MODES:
    by_row = data.collate([long_pair], pad_id, max_length=short_max_length, truncation_mode=mode)
    prompt_ids, chosen_ids, rejected_ids = data.truncate_pair(long_pair["prompt_ids"], long_pair["chosen_ids"],
                                                              long_pair["rejected_ids"], short_max_length, mode)
    by_pair = data.collate([dict(prompt_ids=prompt_ids, chosen_ids=chosen_ids, rejected_ids=rejected_ids)], pad_id,
                           max_length=short_max_length, truncation_mode=mode)
    for scope, batch in (("row", by_row), ("pair", by_pair)):
        prompts = kept_prompts(batch)
        for r, name in enumerate(("chosen", "rejected")):
            n_completion = int(batch["completion_mask"][r].sum())
            print(f"{mode:<10} scope {scope:<4} {name:<8}: prompt {len(prompts[r]):>2} tokens "
                  f"'{tokenizer.decode(prompts[r])}' + {n_completion} completion tokens")
        print(f"{'':<10} {'same prompt for both' if prompts[0] == prompts[1] else 'TWO DIFFERENT PROMPTS'}\n")
        if scope == "pair":
            assert prompts[0] == prompts[1]
    if mode == "keep_end":
        assert kept_prompts(by_row)[0] != kept_prompts(by_row)[1]  # the row rule gives this pair two prompts

# %% [markdown]
# With `keep_end`, the row rule keeps a longer prompt for the shorter completion; the pair rule keeps one prompt
# and cuts the longer completion only as far as needed. With `keep_start` both rules keep the whole prompt and cut
# the completions' ends (the EOS included), so they agree.
#
# **The collated batch.** `data.collate` stacks $B$ pairs into $2B$ rows: rows $0..B-1$ are prompt+chosen, rows
# $B..2B-1$ prompt+rejected in the same order, right-padded to a common width. The loss does not score the tokens
# where `completion_mask` is 1 at the *input* positions: position $t$ predicts token $t+1$, so the scored positions
# are `completion_mask[:, 1:]`, one to the left. The last prompt token predicts the first completion token and is
# scored; the last completion token (the EOS) predicts nothing and is not. The heatmap shows the scored positions.

# %%
B = 4
batch = data.collate(train_set[:B], pad_id, cfg.max_length, cfg.truncation_mode)
for key, value in batch.items():
    print(f"{key:<16} {tuple(value.shape)} {value.dtype}")
for r in range(2 * B):
    kind = f"chosen {r}" if r < B else f"rejected {r - B}"
    length = int(batch["attention_mask"][r].sum())
    print(f"row {r} ({kind:<10}): {tokenizer.decode(batch['input_ids'][r, :length])}")

scored = torch.zeros_like(batch["completion_mask"])
scored[:, :-1] = batch["completion_mask"][:, 1:]  # position t is scored when token t+1 is a completion token
fig, ax = plt.subplots(figsize=(11, 2.6))
ax.imshow(batch["attention_mask"] + scored, cmap="viridis", aspect="auto", vmin=0, vmax=2)
ax.set_yticks(range(2 * B), [f"chosen {r}" for r in range(B)] + [f"rejected {r}" for r in range(B)])
ax.set_xlabel("position t")
ax.set_title("dark: padding; teal: not scored (prompt, and the final EOS); yellow: scored, predicts a completion token")
plt.show()

# %% [markdown]
# ## 5. The core by hand, then the library
#
# **Per-token log-probabilities.** For each of the $2B$ rows the model gives logits $z_t \in \mathbb{R}^V$ at every
# position $t$; position $t$ predicts token $t+1$:
#
# $$\log\pi(y_{t+1}\mid x, y_{\le t}) = z_{t, y_{t+1}} - \log\sum_{v} e^{z_{t,v}},\qquad
# \log\pi(y\mid x) = \sum_{t} m_{t+1}\,\log\pi(y_{t+1}\mid x, y_{\le t}),$$
#
# with $m$ the completion mask. In code the shift is two slices: `logits[:, :-1]` (positions $0..T-2$) against
# `input_ids[:, 1:]` (tokens $1..T-1$), masked by `completion_mask[:, 1:]`.
#
# The policy is the shipped model with LoRA adapters (`dpo.load_model`, as `dpo.main` does). LoRA's second matrix
# starts at zero, so at step 0 the policy *is* the reference; the reference is the same network with its adapters
# switched off (`model.disable_adapter()`), so no second copy is kept in memory.

# %%
def per_token_logps(model, batch):
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits  # [2B, T, V]
    logps = torch.log_softmax(logits[:, :-1].float(), dim=-1)  # position t ...
    token_logps = logps.gather(-1, batch["input_ids"][:, 1:, None]).squeeze(-1)  # ... predicts token t+1: [2B, T-1]
    return token_logps * batch["completion_mask"][:, 1:]  # only completion tokens are scored

torch.manual_seed(cfg.seed)
model = dpo.load_model(cfg, cfg.model, device, trainable=True)
batch = dpo.to_device(batch, device)
with torch.no_grad():
    mine = per_token_logps(model, batch)
    naive = dpo.completion_logps_naive(model, batch)  # dpo.py's readable version
    chunked, _ = dpo.completion_logps(model, batch)  # what training uses: only completion positions through the LM head
assert torch.allclose(mine, naive, atol=1e-6)
assert torch.allclose(naive, chunked, atol=1e-5)
logps = mine.sum(1)
assert torch.allclose(logps, dpo.sequence_logps(chunked, batch["completion_mask"]), atol=1e-4)
print(f"input_ids {tuple(batch['input_ids'].shape)} = [2B, T];  per-token log-probs {tuple(mine.shape)} = [2B, T-1];  "
      f"sequence log-probs {tuple(logps.shape)} = [2B]")

row0 = batch["input_ids"][0]
print("\nrow 0 (prompt + chosen 0): position t predicts token t+1")
for t in range(int(batch["attention_mask"][0].sum()) - 1):
    m = int(batch["completion_mask"][0, t + 1])
    value = f"log π = {mine[0, t].item():8.4f}" if m else "(prompt: not scored)"
    print(f"  t={t:>2} -> {tokenizer.convert_ids_to_tokens(int(row0[t + 1])):<14} m {m}  {value}")
print(f"sum over the completion = log π(y_w|x) = {logps[0].item():.4f}")
print("\nsequence log-probs, chosen rows:  ", logps[:B].cpu())
print("sequence log-probs, rejected rows:", logps[B:].cpu())

# %% [markdown]
# **One prompt per pair.** Rows $i$ and $B+i$ start with the same prompt: the concatenated batch computes every
# prompt twice. `prefix_sharing.share_prompts` packs each pair as one row $[x; y_w; y_l]$: the positions of $y_l$ restart
# right after $x$, and a 4D attention mask keeps $y_l$'s tokens from seeing $y_w$'s, so every token sees exactly the
# tokens and positions it sees in its own concatenated row. The log-probabilities are the same; the prompt is
# computed once (Wang et al. 2024, "Accelerating Direct Preference Optimization with Prefix Sharing",
# arXiv:2410.20305). It needs both completions under *one* prompt, which per-pair truncation (§4) guarantees.
# `dpo.main` uses the shared rows by default (`--prefix_sharing`), after checking on a real batch that the model
# gives the same numbers both ways.

# %%
shared = dpo.to_device(prefix_sharing.share_prompts({key: v.cpu() for key, v in batch.items()}, pad_id), device)
with torch.no_grad():
    shared_per_token, _ = dpo.completion_logps(model, {**batch, **shared})
assert torch.allclose(shared_per_token, chunked, atol=1e-5)
print(f"token slots: concatenated rows {tuple(batch['input_ids'].shape)} = {batch['input_ids'].numel()}, "
      f"shared rows {tuple(shared['shared_input_ids'].shape)} = {shared['shared_input_ids'].numel()}")

n = int((shared["shared_input_ids"][0] != pad_id).sum())  # pair 0 without its padding
fig, ax = plt.subplots(figsize=(4.5, 4.5))
ax.imshow(shared["shared_attention_mask"][0, 0, :n, :n].cpu(), cmap="Greys")
prompt_len = int(batch["completion_mask"][0].argmax())
chosen_len = int(batch["completion_mask"][0].sum())
for edge in (prompt_len, prompt_len + chosen_len):
    ax.axhline(edge - 0.5, color="tab:red", lw=0.8), ax.axvline(edge - 0.5, color="tab:red", lw=0.8)
ax.set_xlabel("key (attended) token"), ax.set_ylabel("query token")
ax.set_title("pair 0: [prompt; chosen; rejected], black = attends")
plt.show()
print("positions of pair 0:", shared["shared_position_ids"][0, :n].tolist())

# %% [markdown]
# **The loss by hand**, with the reference as the policy minus its adapters, checked against `losses.dpo_loss`:
#
# ```python
# rho_w, rho_l = logps[:B] - ref_logps[:B], logps[B:] - ref_logps[B:]
# loss = -F.logsigmoid(beta * (rho_w - rho_l)).mean()
# ```
#
# **Its gradient (Eq. 7).** With $L = \frac1B\sum_i -\log\sigma(\beta\Delta_i)$, the gradient with respect to the summed
# log-probabilities is
#
# $$\frac{\partial L}{\partial \log\pi_\theta(y_{w,i}\mid x_i)} = -\frac{\beta}{B}\,\sigma(-\beta\Delta_i),\qquad
# \frac{\partial L}{\partial \log\pi_\theta(y_{l,i}\mid x_i)} = +\frac{\beta}{B}\,\sigma(-\beta\Delta_i):$$
#
# raise the chosen log-prob, lower the rejected one, each with the weight $\beta\sigma(-\beta\Delta_i)$ of §2 and §3,
# i.e. by how wrong the implicit reward model currently is on that pair. The paper writes it for the parameters,
# with $\hat r_\theta(x, y_l) - \hat r_\theta(x, y_w) = -\beta\Delta$:
#
# $$\nabla_\theta\mathcal L_{\rm DPO} = -\beta\,\mathbb{E}\Big[\sigma\big(\hat r_\theta(x, y_l) - \hat r_\theta(x, y_w)\big)
# \big(\nabla_\theta\log\pi_\theta(y_w\mid x) - \nabla_\theta\log\pi_\theta(y_l\mid x)\big)\Big].$$
#
# Autograd's gradient is checked against it at step 0 ($\Delta = 0$, the loss is exactly $\ln 2$) and after one
# update, where $\Delta \ne 0$; `dpo.dpo_step`, the function `dpo.main` calls, must give the same loss.

# %%
optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.learning_rate, weight_decay=0.0)
for step in range(2):
    logps = per_token_logps(model, batch).sum(1)
    logps.retain_grad()  # keep the gradient of this intermediate tensor to inspect it
    with torch.no_grad(), model.disable_adapter():  # the reference: the same network without LoRA
        ref_logps = per_token_logps(model, batch).sum(1)
    rho_w, rho_l = logps[:B] - ref_logps[:B], logps[B:] - ref_logps[B:]
    loss = -F.logsigmoid(cfg.beta * (rho_w - rho_l)).mean()
    library, _, _ = losses.dpo_loss(logps[:B], logps[B:], ref_logps[:B], ref_logps[B:], beta=cfg.beta)
    assert torch.allclose(loss, library.mean())
    loss.backward()

    margin = (rho_w - rho_l).detach()
    eq7 = -cfg.beta / B * torch.sigmoid(-cfg.beta * margin)
    assert torch.allclose(logps.grad[:B], eq7) and torch.allclose(logps.grad[B:], -eq7)
    with torch.no_grad():
        step_loss, metrics = dpo.dpo_step(cfg, model, None, batch)
    assert torch.isclose(step_loss, loss.detach(), atol=1e-5)
    if step == 0:
        assert math.isclose(loss.item(), math.log(2), abs_tol=1e-6)  # policy = reference: Δ = 0
    print(f"step {step}: loss {loss.item():.6f}  (losses.dpo_loss {library.mean().item():.6f}, dpo.dpo_step "
          f"{step_loss.item():.6f})")
    print(f"  margin Δ               {margin.cpu()}")
    print(f"  dL/dlogπ(y_w) autograd {logps.grad[:B].cpu()}\n  −β/B·σ(−βΔ)  (Eq. 7)   {eq7.cpu()}")
    print(f"  dL/dlogπ(y_l) autograd {logps.grad[B:].cpu()}")
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
del model, optimizer

# %% [markdown]
# **The training loop by hand.** Everything `dpo.main` does per step, in 20 lines: the same data order
# (`torch.randperm` seeded with `seed + epoch`), batches of 8 pairs, AdamW, a learning rate decaying linearly to 0,
# the gradient norm clipped to 1. The loop is a function, because §6 trains with it again.

# %%
def train_dpo(beta, steps, seed=cfg.seed, lr=cfg.learning_rate, batch_size=cfg.per_device_train_batch_size):
    torch.manual_seed(seed)  # the LoRA initialisation, as dpo.main
    model = dpo.load_model(cfg, cfg.model, device, trainable=True)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1 - s / steps)  # linear to 0
    order = torch.randperm(len(train_set), generator=torch.Generator().manual_seed(seed + 0)).tolist()  # epoch 0
    step_losses = []
    for step in range(steps):
        ids = order[step * batch_size:(step + 1) * batch_size]
        batch = dpo.to_device(data.collate([train_set[i] for i in ids], pad_id, cfg.max_length), device)
        n = len(ids)
        with torch.no_grad(), model.disable_adapter():
            ref_logps = per_token_logps(model, batch).sum(1)
        logps = per_token_logps(model, batch).sum(1)
        margin = (logps[:n] - ref_logps[:n]) - (logps[n:] - ref_logps[n:])
        loss = -F.logsigmoid(beta * margin).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, max_norm=1.0)
        optimizer.step(), schedule.step(), optimizer.zero_grad()
        step_losses.append(loss.item())
    return model, step_losses

CHECK_STEPS = 5
assert CHECK_STEPS <= len(train_set) // cfg.per_device_train_batch_size  # (within the first epoch)
_, hand_losses = train_dpo(cfg.beta, CHECK_STEPS)

def run_main(name, *args):
    """dpo.main on the shipped demo in WORK/name; its printed config and log go to a string, returned."""
    run_cfg = options.parse_args(["--output_dir", str(WORK / name), "--bf16", "False", "--show_examples", "0",
                               "--sample_eval", "0", *args])
    with contextlib.redirect_stdout(io.StringIO()) as log:
        dpo.main(run_cfg)
    return log.getvalue()

for sharing in ("True", "False"):
    log = run_main(f"check-{sharing}", "--max_steps", str(CHECK_STEPS), "--logging_steps", "1", "--save_steps", "0",
                   "--prefix_sharing", sharing)
    records = [json.loads(line) for line in (WORK / f"check-{sharing}" / "metrics.jsonl").read_text().splitlines()]
    main_losses = [r["loss"] for r in records if "loss" in r]
    print(f"prefix_sharing {sharing:<5}  step:       " + "  ".join(f"{s:>9d}" for s in range(1, CHECK_STEPS + 1)))
    print(f"{'':<20} dpo.main:   " + "  ".join(f"{v:>9.6f}" for v in main_losses))
    print(f"{'':<20} by hand:    " + "  ".join(f"{v:>9.6f}" for v in hand_losses))
    assert len(main_losses) == CHECK_STEPS
    assert all(math.isclose(a, b, rel_tol=1e-4, abs_tol=1e-5) for a, b in zip(main_losses, hand_losses))
print("\nfrom dpo.main's log:", *[line for line in log.splitlines() if line.startswith(("[data] train", "trainable"))],
      sep="\n  ")

# %% [markdown]
# The loop and `dpo.main` agree on every step to 5 or more significant digits (`dpo.main` computes the log-probs
# of the completion positions only, and with `--prefix_sharing` each prompt once, so the sums differ by float
# rounding). What `dpo.main` adds is plumbing: gradient accumulation, evaluation, checkpoints and exact resume,
# logging, the other losses and reference modes.
#
# **The full run.** `dpo.main` writes a line of TRL-named metrics every `logging_steps` into
# `output_dir/metrics.jsonl`: `rewards/chosen` $= \beta\rho_w$ and `rewards/rejected` $= \beta\rho_l$ (the implicit
# rewards, batch means), `rewards/margins` $= \beta\Delta$, `rewards/accuracies` (the fraction of pairs with
# $\Delta > 0$), and `eval_*`, the same on the held-out pairs. The run below is 100 steps (the full demo,
# `python dpo.py`, trains one epoch, 265 steps).

# %%
t0 = time.time()
log = run_main("run", "--max_steps", "100", "--logging_steps", "5", "--eval_steps", "25", "--save_steps", "0")
print(*[line for line in log.splitlines() if line.startswith("step=") and "eval_loss" in line], sep="\n")
print(f"wall time: {time.time() - t0:.0f} s")

records = [json.loads(line) for line in (WORK / "run" / "metrics.jsonl").read_text().splitlines()]
train_log = [r for r in records if "loss" in r]
eval_log = [r for r in records if "eval_loss" in r]
fig, axes = plt.subplots(1, 4, figsize=(16, 3.4))
panels = [("loss", ["loss"]), ("implicit rewards βρ", ["rewards/chosen", "rewards/rejected"]),
          ("reward margin βΔ", ["rewards/margins"]), ("accuracy", ["rewards/accuracies"])]
for ax, (title, keys) in zip(axes, panels):
    for key in keys:
        line, = ax.plot([r["step"] for r in train_log], [r[key] for r in train_log], label=key)
        ax.plot([r["step"] for r in eval_log], [r["eval_" + key] for r in eval_log], "o--", color=line.get_color(),
                label="eval_" + key)
    ax.axhline(0, color="grey", lw=0.5)
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.legend(fontsize=8)
fig.tight_layout()
plt.show()
last = eval_log[-1]
print(f"held-out pairs after training: loss {last['eval_loss']:.4f} (ln 2 = {math.log(2):.4f} at step 0), accuracy "
      f"{last['eval_rewards/accuracies']:.3f}, rewards chosen {last['eval_rewards/chosen']:+.4f}, rejected "
      f"{last['eval_rewards/rejected']:+.4f}")

# %% [markdown]
# Read the printed numbers: the held-out accuracy climbs while **both** implicit rewards go negative, the rejected
# one faster. That is §2's second failure mode on the real model: the margin grows while both completions of each
# pair lose probability, which goes to reviews that appear in no pair (more positive ones, as §6 shows).

# %% [markdown]
# ## 6. What DPO did
#
# Preference accuracy says the policy *ranks* two given completions correctly. The paper's question (Section 6.1) is
# whether it *writes* better ones: sample completions of held-out prompts from the reference and from the trained
# policy, and score them with the ground-truth reward (here `sentiment.sentiment_score`: positive minus negative words
# of the whole review). `sample_eval.sample_eval` does this with common random numbers (the same seed for both
# models) and estimates the KL divergence that Eq. 3 pays for, on the policy's own samples:
#
# $$\mathbb{D}_{\rm KL}\big(\pi_\theta\,\|\,\pi_{\rm ref}\big) = \mathbb{E}_{y\sim\pi_\theta}\Big[\log\pi_\theta(y\mid x)
# - \log\pi_{\rm ref}(y\mid x)\Big]\quad\text{(nats per sequence)}.$$

# %%
from peft import PeftModel

prompts = [e["prompt_ids"] for e in eval_set[:64]]  # the held-out prompts as dpo.main tokenizes them
policy = PeftModel.from_pretrained(dpo.load_model(cfg, cfg.model, device, trainable=False), WORK / "run" / "model")
result = sample_eval(policy, tokenizer, prompts, reference=None, reward_fn=sentiment_score, seed=0, show=3)
del policy

# %% [markdown]
# The policy wins on about 90% of the held-out prompts and its mean reward rises from about 0.1 to about 4.7, but
# look at the samples: phrases repeat and sentences break ("was mixed bag was very elegant"), and the completions are
# about 43% longer than the reference's (29 against 20 tokens). At the demo's learning rate, 100 steps take the
# policy about 44 nats from the reference: the reward (a word count) keeps paying for more positive words, whether
# or not they make a sentence. That is reward over-optimisation, and the next cell measures it against β.

# %% [markdown]
# **The reward–KL frontier.** The paper's Figure 2 (left) plots the mean reward of samples against their KL to the
# reference, for many runs: in Eq. 3, β is the price of one nat of KL, so a smaller β should buy more reward with
# more KL. On this tiny task, with Adam at the demo's learning rate, the ordering between β = 0.02, 0.1 and 0.5 does
# not show within 60 steps (an earlier edition of this notebook found β = 0.1 travelling further than β = 0.02): Adam
# normalises the gradient's size, so β only acts through the σ weight, which differs little while $\beta\Delta$ is
# small. A β spread by 10× per value does show it. Below: the loop of §5 with β ∈ {0.03, 0.3, 3}, two seeds each (the
# seed sets the LoRA initialisation and the data order), 40 steps at the demo's learning rate, then `sample_eval` on
# 32 held-out prompts × 2 samples. Each point is the mean over the seeds, with bars from the lower to the higher
# seed on both axes; the small markers are the seeds.

# %%
FRONTIER_BETAS, FRONTIER_SEEDS, FRONTIER_STEPS = (0.03, 0.3, 3.0), (0, 1), 40
frontier_prompts = prompts[:32]
t0 = time.time()
frontier = {}
for beta_f in FRONTIER_BETAS:
    for seed in FRONTIER_SEEDS:
        policy, _ = train_dpo(beta_f, FRONTIER_STEPS, seed=seed)
        with contextlib.redirect_stdout(io.StringIO()):
            out = sample_eval(policy, tokenizer, frontier_prompts, reference=None, reward_fn=sentiment_score,
                              num_samples=2, seed=1, show=0)
        frontier[beta_f, seed] = out
        print(f"β {beta_f:<5} seed {seed}: KL {out['kl']:6.2f} nats, reward {out['reward_policy']:+.3f} "
              f"(reference {out['reward_reference']:+.3f}), length {out['length_policy']:.1f} tokens "
              f"(reference {out['length_reference']:.1f})")
        del policy
print(f"wall time: {time.time() - t0:.0f} s")

fig, ax = plt.subplots(figsize=(7, 4.3))
reference_reward = frontier[FRONTIER_BETAS[0], FRONTIER_SEEDS[0]]["reward_reference"]
ax.plot([0], [reference_reward], "k*", markersize=12, label="reference (SFT model)")
for beta_f in FRONTIER_BETAS:
    kls = [frontier[beta_f, s]["kl"] for s in FRONTIER_SEEDS]
    rewards = [frontier[beta_f, s]["reward_policy"] for s in FRONTIER_SEEDS]
    kl_mean, reward_mean = sum(kls) / len(kls), sum(rewards) / len(rewards)
    bar = ax.errorbar([kl_mean], [reward_mean], xerr=[[kl_mean - min(kls)], [max(kls) - kl_mean]],
                      yerr=[[reward_mean - min(rewards)], [max(rewards) - reward_mean]], fmt="o", capsize=4,
                      markersize=8, label=f"β = {beta_f}")
    ax.plot(kls, rewards, ".", color=bar[0].get_color(), alpha=0.6)
ax.set_xscale("symlog", linthresh=1)
ax.set_xlabel("KL(π_θ ‖ π_ref), nats per sequence (log scale above 1)")
ax.set_ylabel("mean ground-truth reward of samples")
ax.set_title(f"{FRONTIER_STEPS} steps, mean and range over {len(FRONTIER_SEEDS)} seeds")
ax.legend()
plt.show()

# %% [markdown]
# What the plot shows (on a CPU; on a GPU the numbers differ slightly). **The β ordering of the KL holds**: β = 3
# stays within about 1 nat of the reference, β = 0.3 travels 5–12 nats, β = 0.03 the furthest, 11 nats for one seed
# and about 80 for the other. **The reward does not follow the KL all the way**: β = 3 gains the least reward
# (about 1.8, against −0.45 for the reference), β = 0.3 the most (about 2.8), and β = 0.03 pays about 5× the KL of
# β = 0.3 (45 against 9 nats, seed means) for less reward on average (2.6). That is **over-optimisation**: past a few nats the extra distance buys text
# the reward does not value. It shows in the samples: the β = 0.03 seed that travelled ~80 nats writes completions
# about 50% longer than the reference's (30 against 20 tokens); the other five runs are at most 11% longer. Two seeds give a range, not a confidence interval: the β = 0.03 seeds disagree by a factor
# 7 in KL, so a steeper learning rate or more steps (the §5 run reaches a KL of several tens) puts every β into the
# over-optimised regime, and the ordering disappears in the noise; the paper's frontier, with a real sentiment
# classifier and thousands of steps, is a much smoother version of the same trade-off.

# %% [markdown]
# ## Appendix A. The other loss variants
#
# The fourteen variants not drawn in §3, with the same parameterisation (β = 1, $|y| = 1$, $\rho_w = \Delta/2$,
# $\rho_l = -\Delta/2$, reference log-probs −4) and the same check at $\Delta = 0$ (the table in §3). The dashed line in
# every panel is DPO; all panels share their axes (clipped).
#
# - `exo_pair` (ε = 10⁻³, its paper's value) pulls hardest near $\Delta = 0$ and less on pairs ranked very wrong;
#   `robust` (ε = 0.1) subtracts a linear term, so its weight never reaches 0.
# - `nca_pair`, `bco_pair`, `apo_zero`, `apo_down` and `sppo_hard` score $\rho_w$ and $\rho_l$ separately, so their
#   curves depend on how $\Delta$ is split (here evenly). **Why some weights go negative**: with $\rho_w = \Delta/2$,
#   raising the margin also raises $\rho_w$, and `nca_pair`'s term $-\frac12\log\sigma(-\beta\rho_w)$ and
#   `apo_down`'s term $\sigma(\beta\rho_w)$ penalise a rising chosen log-ratio (APO-down is meant for chosen
#   completions *worse* than the model's own): past some margin these terms win and the loss rises with $\Delta$.
#   `sppo_hard` is a sum of two squares with targets $\rho_w = \frac{1}{2\beta}$, $\rho_l = -\frac{1}{2\beta}$.
# - `discopop` is not convex: its gate $\sigma(\beta\Delta/\tau)$ with τ = 0.05 switches from the logistic to the
#   exponential term within about ±0.2 of $\Delta = 0$, and there its weight dips below zero (−0.78 at
#   $\Delta = 0$, in the table of §3): a narrow region where a better margin *raises* the loss.
# - `aot` and `aot_unpaired` sort over the batch; with one pair they are DPO. `sigmoid_norm` and `rdpo` equal DPO
#   here (one-token completions, equal lengths). `sft` and `orpo` carry an NLL term whose gradient does not vanish.

# %%
others = [name for name in losses.LOSS_TYPES if name not in {name for name, _ in MAIN.values()}]
curves = {name: [loss_and_weight(name, m) for m in grid] for name in others}
COLUMNS = 7
fig, axes = plt.subplots(4, COLUMNS, figsize=(15, 8.5), sharex=True)
for index, name in enumerate(others):
    block, col = divmod(index, COLUMNS)
    for row_index, (ylabel, ylim) in enumerate((("loss ℓ(Δ)", (-0.5, 6)), ("weight −dℓ/dΔ", (-1.5, 2)))):
        ax = axes[2 * block + row_index, col]
        ax.plot(grid, [v[row_index] for v in main_curves["DPO"]], "k--", lw=0.8)
        ax.plot(grid, [v[row_index] for v in curves[name]], lw=1.8)
        ax.axhline(0, color="grey", lw=0.5), ax.axvline(0, color="grey", lw=0.5)
        ax.set_ylim(*ylim)
        if col == 0:
            ax.set_ylabel(ylabel)
        if row_index == 0:
            ax.set_title(name, fontsize=9)
        elif block == 1:
            ax.set_xlabel("Δ")
fig.tight_layout()
plt.show()

# %% [markdown]
# ## Appendix B. LoRA, QLoRA and memory
#
# **LoRA** ("LoRA: Low-Rank Adaptation of Large Language Models", Hu et al., 2021, arXiv:2106.09685) freezes each
# weight $W \in \mathbb{R}^{d_{\rm out}\times d_{\rm in}}$ and trains a low-rank update
# $W' = W + \frac{\alpha}{k} B_{\rm LoRA} A_{\rm LoRA}$ with $A_{\rm LoRA} \in \mathbb{R}^{k\times d_{\rm in}}$,
# $B_{\rm LoRA} \in \mathbb{R}^{d_{\rm out}\times k}$ and $B_{\rm LoRA} = 0$ at the start: $k(d_{\rm in} + d_{\rm out})$
# trainable parameters instead of $d_{\rm in} d_{\rm out}$. For DPO it also gives the reference for free: adapters off.
#
# **QLoRA** ("QLoRA: Efficient Finetuning of Quantized LLMs", Dettmers et al., 2023, arXiv:2305.14314) stores the
# frozen $W$ in 4-bit **NormalFloat (NF4)**: blocks of 64 weights share one absmax scale, and each weight is one of 16
# levels placed at quantiles of a normal distribution. **Double quantisation** stores the scales in 8 bits with one
# fp32 scale per 256 of them: $4 + 8/64 + 32/(64\cdot256) \approx 4.127$ bits per weight. In the forward pass each
# block is dequantised to the compute dtype, so the arithmetic is unchanged; only storage shrinks, about 4× against
# bf16. The embedding and the LM head are not quantised.
#
# In `dpo.py`: `--use_peft` (on by default) adds LoRA to every linear layer, and `--load_in_4bit` loads the base in
# NF4 with double quantisation (`dpo.load_model`). bitsandbytes also runs 4-bit on a CPU, so the counts below are
# real models (on a CPU the non-quantised weights stay in fp32).

# %%
def count(model):
    # parameters as the model sees them: a packed 4-bit weight holds 2 per byte, quant_state keeps the real shape
    total = sum(p.quant_state.shape.numel() if hasattr(p, "quant_state") else p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return total, trainable

print(f"{'mode':<8} {'parameters':>11} {'trainable':>10} {'share':>7} {'weights in memory':>18}")
models = {}
for mode, args in (("full", ["--use_peft", "False"]), ("LoRA", []), ("QLoRA", ["--load_in_4bit"])):
    mode_cfg = options.parse_args(["--output_dir", str(WORK / "unused")] + args)
    models[mode] = dpo.load_model(mode_cfg, mode_cfg.model, device, trainable=True)
    total, trainable = count(models[mode])
    megabytes = models[mode].get_memory_footprint() / 1e6
    print(f"{mode:<8} {total:>11,} {trainable:>10,} {trainable / total:>7.1%} {megabytes:>15.2f} MB")
q_proj = models["QLoRA"].base_model.model.model.layers[0].self_attn.q_proj
weight = q_proj.base_layer.weight
print(f"\nQLoRA's first attention projection stores {type(weight).__name__} {weight.dtype} {tuple(weight.shape)}: "
      f"{weight.quant_state.shape.numel():,} weights in {weight.numel():,} bytes, blocksize {weight.quant_state.blocksize}")

# %% [markdown]
# **Memory arithmetic**, costed as `dpo.main` builds each mode. $N$ is the model's parameter count ($N_{\rm lin}$ in the
# decoder's linear layers, $N_{\rm emb}$ in the embedding and LM head), $L$ layers, hidden size $d$, MLP size
# $d_{\rm ff}$, key/value width $d_{\rm kv}$, vocabulary $V$, LoRA rank $k = 16$ on the 7 linear layers of each block, and
# one micro-batch of 1 pair of 1024-token sequences (2 rows, $T = 2048$ tokens), gradient checkpointing on.
#
# The reference: **full fine-tuning** (`--use_peft False`) keeps fp32 master weights (`load_model`) and makes the
# reference a frozen `copy.deepcopy` of the policy at step 0 in the *same* dtype (`dpo.main`; a bf16 copy would
# differ from the policy before any step), so it costs another $4N$ (freed after `--precompute_ref_log_probs`).
# **LoRA and QLoRA** make no copy: the reference is the policy with its adapters off.
#
# | term | full fine-tuning | LoRA (bf16 base) | QLoRA (NF4 base) |
# |---|---|---|---|
# | policy weights | $4N$ (fp32) | $2N$ | $\frac{4.127}{8}N_{\rm lin} + 2N_{\rm emb}$ |
# | reference | $4N$ (fp32 copy) | 0 (adapters off) | 0 (adapters off) |
# | trainable + AdamW | $12N$ (grad, $m$, $v$ in fp32) | $16P$, $P = L\,k\sum_{\rm lin}(d_{\rm in}+d_{\rm out})$ | $16P$ |
# | activations | $2TdL + 2T(6d + 2d_{\rm kv} + 4d_{\rm ff})$ | same | same |
# | logits | $2\cdot 4 \cdot 1024\,V$ | same | same |
#
# *Activations*: with checkpointing, one bf16 hidden state per layer boundary plus one layer's activations while it is
# recomputed in backward. The reference forward keeps nothing (`no_grad`). *Logits*: `dpo.completion_logps` projects
# at most 1024 tokens at a time, in fp32, and recomputes them in backward. Add about 1 GiB for the CUDA context. All
# of it is an estimate, good to a GiB or so; the real peak is `peak_memory_gb` in `metrics.jsonl`. The cell checks
# the counting formulas on the shipped model, then fills the table from each model's published configuration.

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
assert parameters(tiny_c)[2] == count(models["full"])[0], "the parameter formula does not match the shipped model"
assert lora_parameters(tiny_c, cfg.lora_r) == count(models["LoRA"])[1], "the LoRA formula does not match peft"
print(f"formulas match the shipped model: N = {parameters(tiny_c)[2]:,}, LoRA P = {lora_parameters(tiny_c):,}")
del models

configs = {  # from each model's config.json on the Hugging Face hub
    "Qwen2.5-0.5B": dict(hidden=896, heads=14, kv_heads=2, inter=4864, layers=24, vocab=151936, tied=True, qkv_bias=True),
    "Mistral-7B": dict(hidden=4096, heads=32, kv_heads=8, inter=14336, layers=32, vocab=32000, tied=False, qkv_bias=False),
    "Llama-3.1-8B": dict(hidden=4096, heads=32, kv_heads=8, inter=14336, layers=32, vocab=128256, tied=False, qkv_bias=False),
}
chunk = inspect.signature(dpo.completion_logps).parameters["chunk_tokens"].default  # tokens per logits chunk
GiB, n_tokens, overhead = 2**30, 2 * 1024, 1.0
print(f"\n{'model':<13} {'N':>6} {'method':<6} {'policy':>7} {'ref':>6} {'train+Adam':>10} {'activ.':>7} {'logits':>7} "
      f"{'total GiB':>9}  {'16 GB':>5} {'24 GB':>5}")
for name, c in configs.items():
    n_lin, n_emb, n_all = parameters(c)
    p = lora_parameters(c)
    d_kv = c["hidden"] // c["heads"] * c["kv_heads"]
    activations = 2 * n_tokens * c["hidden"] * c["layers"] + 2 * n_tokens * (6 * c["hidden"] + 2 * d_kv + 4 * c["inter"])
    logits = 2 * 4 * chunk * c["vocab"]
    for method, weights, ref, trainable in (("full", 4 * n_all, 4 * n_all, 12 * n_all), ("LoRA", 2 * n_all, 0, 16 * p),
                                            ("QLoRA", 4.127 / 8 * n_lin + 2 * n_emb, 0, 16 * p)):
        terms = [weights / GiB, ref / GiB, trainable / GiB, activations / GiB, logits / GiB]
        total = sum(terms) + overhead
        fits = ["yes" if total <= card else "no" for card in (16, 24)]
        print(f"{name:<13} {n_all / 1e9:>5.2f}B {method:<6} "
              + " ".join(f"{t:>{width}.2f}" for t, width in zip(terms, (7, 6, 10, 7, 7)))
              + f" {total:>9.1f}  {fits[0]:>5} {fits[1]:>5}")

# %% [markdown]
# Reading the table: full fine-tuning as `dpo.py` does it (fp32 policy, its fp32 reference copy, AdamW) costs 20
# bytes per parameter before any activation: 0.5B fits a 16 GB card, 7–8B would need 137–152 GiB. LoRA drops
# the reference copy and the optimizer state of the base and keeps the base in bf16: Mistral-7B fills a 16 GB card
# to the last GiB, with no room for longer rows, and Llama-3.1-8B needs 24 GB. QLoRA stores each linear weight in
# about half a byte, which brings both onto a 16 GB card with room to spare; what is left is mostly Llama-3's
# embedding and LM head in bf16 (2 GiB for its 128k vocabulary) and the activations. The logits column is one chunk
# of `completion_logps` (256 tokens) in fp32, twice. Longer sequences or more pairs per micro-batch grow the
# activation column in proportion; `--gradient_accumulation_steps` grows the batch without it.

# %%
shutil.rmtree(WORK)  # the runs of sections 5 and 6; comment this out to keep them
print(f"wall time: notebook ran in {time.time() - start_time:.0f} s on {device}")

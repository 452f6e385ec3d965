"""Write walkthrough.ipynb from the cells below, so that the notebook is reviewed as plain Python.

    python scripts/build_notebook.py        # rewrites walkthrough.ipynb (no outputs); tests/test_notebook.py
                                            # checks that the committed file equals what this script writes

Each section is a Markdown cell (the idea and its equations) followed by code cells whose printed output and
asserts show it. The code imports the project's modules (losses, data, dpo, sample_eval, sentiment) and never
repeats them, so what the notebook teaches is what runs.
"""

from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "walkthrough.ipynb"

CELLS = []


def md(text):
    CELLS.append(nbformat.v4.new_markdown_cell(text.strip("\n")))


def code(text):
    CELLS.append(nbformat.v4.new_code_cell(text.strip("\n")))


# ---------------------------------------------------------------------------------------------------------------
md(r"""
# DPO, step by step

This notebook goes from the equation to a trained model and prints every tensor on the way. It uses this
repository's own modules (`losses.py`, `data.py`, `dpo.py`, `sample_eval.py`, `sentiment.py`), so what you read
here is what `python dpo.py` runs.

1. From the RLHF objective to the DPO loss: the closed-form optimal policy, the implicit reward, why $Z(x)$ cancels
2. The loss zoo: every loss in `losses.py` as a function of the margin, its gradient weight, its value at 0
3. Data: a raw row, its tokens and completion mask, `keep_end` against `keep_start`, the collated batch
4. The concatenated forward pass and one training step by hand, checked against the paper's gradient
5. Training the shipped tiny model with `dpo.main`
6. What DPO did: samples before and after, and a miniature of the paper's reward–KL frontier
7. QLoRA: what 4-bit NF4 plus LoRA changes, and the memory arithmetic for 0.5B, 7B and 8B models

The paper is "Direct Preference Optimization: Your Language Model is Secretly a Reward Model", Rafailov et al.,
2023, [arXiv:2305.18290](https://arxiv.org/abs/2305.18290); "Eq. n" below means its equation n.

Run it from the repository root. It runs top to bottom in a few minutes on a laptop CPU, and unchanged on a GPU
(it uses the device `dpo.main` picks). Everything it writes goes to a temporary folder, deleted at the end.
""")

code(r"""
import json
import math
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

import matplotlib
import matplotlib.pyplot as plt
import torch

assert Path("dpo.py").exists(), "start the notebook from the repository root (the folder with dpo.py)"
sys.path.insert(0, os.getcwd())
warnings.filterwarnings("ignore", message="IProgress not found")  # tqdm falls back to a text bar without ipywidgets

import data
import dpo
import losses
from sample_eval import sample_eval
from sentiment import sentiment_score

start_time = time.time()
device = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # the rule dpo.main uses
if device.type == "cpu":
    # The shipped model is tiny (hidden size 128): a second thread mostly waits for the first, and on a busy 2-core
    # machine two threads ran this notebook's training 3-5x slower than one.
    torch.set_num_threads(1)
WORK = Path(tempfile.mkdtemp(prefix="dpo-walkthrough-"))  # every run of this notebook writes here, not in the repo
torch.set_printoptions(precision=4, linewidth=160, sci_mode=False)
PLOT_BACKEND = matplotlib.get_backend()  # dpo.main saves curves.png through matplotlib's "Agg"; restored after each run
print(f"python {sys.version.split()[0]}, torch {torch.__version__}, device {device}, output folder {WORK}")
""")

# ---------------------------------------------------------------------------------------------------------------
md(r"""
## 1. From the RLHF objective to the DPO loss

RLHF assumes preferences follow the Bradley–Terry model with a latent reward $r^*$ (Eq. 1)

$$p^*(y_1 \succ y_2 \mid x) = \frac{\exp r^*(x, y_1)}{\exp r^*(x, y_1) + \exp r^*(x, y_2)}
= \sigma\big(r^*(x, y_1) - r^*(x, y_2)\big),$$

fits a reward model $r$ to the pairs by maximum likelihood (Eq. 2), and then maximises the reward while staying
close to a reference policy $\pi_{\rm ref}$ (the SFT model), with a KL penalty of strength $\beta$ (Eq. 3):

$$\max_{\pi}\; \mathbb{E}_{x\sim\mathcal D,\; y\sim\pi(\cdot\mid x)}\big[r(x, y)\big]
\;-\; \beta\, \mathbb{D}_{\rm KL}\big[\pi(y\mid x)\,\|\,\pi_{\rm ref}(y\mid x)\big].$$

**The optimum in closed form (Eq. 4).** For one prompt $x$, put the reward inside the logarithm (the paper's
Appendix A.1):

$$\mathbb{E}_{\pi}[r] - \beta\,\mathbb{D}_{\rm KL}(\pi\|\pi_{\rm ref})
= -\beta\,\mathbb{E}_{y\sim\pi}\Big[\log\frac{\pi(y\mid x)}{\pi_{\rm ref}(y\mid x)\,e^{r(x,y)/\beta}}\Big]
= \beta\log Z(x) \;-\; \beta\,\mathbb{D}_{\rm KL}\big(\pi\,\|\,\pi_r\big),$$

$$\pi_r(y\mid x) = \frac{1}{Z(x)}\,\pi_{\rm ref}(y\mid x)\exp\Big(\frac{1}{\beta}r(x, y)\Big),
\qquad Z(x) = \sum_y \pi_{\rm ref}(y\mid x)\exp\Big(\frac{1}{\beta}r(x, y)\Big).$$

$\beta \log Z(x)$ does not depend on $\pi$ and a KL divergence is $\ge 0$, zero only when the two distributions are
equal: $\pi_r$ is the maximiser. It cannot be computed directly, because $Z(x)$ sums over every possible completion.

**The implicit reward (Eq. 5).** Take the logarithm of Eq. 4 and solve for the reward:

$$r(x, y) = \beta\log\frac{\pi_r(y\mid x)}{\pi_{\rm ref}(y\mid x)} + \beta\log Z(x).$$

Read backwards, every policy $\pi_\theta$ defines a reward,
$\hat r_\theta(x, y) = \beta\log\frac{\pi_\theta(y\mid x)}{\pi_{\rm ref}(y\mid x)}$, up to the term
$\beta\log Z(x)$ that depends on the prompt only.

**Why $Z(x)$ cancels (Eq. 6).** Bradley–Terry only sees the *difference* of the rewards of two completions of the
same prompt, so the $\beta\log Z(x)$ of Eq. 5 appears twice with opposite signs:

$$p^*(y_1 \succ y_2 \mid x) = \sigma\Big(\beta\log\frac{\pi^*(y_1\mid x)}{\pi_{\rm ref}(y_1\mid x)}
- \beta\log\frac{\pi^*(y_2\mid x)}{\pi_{\rm ref}(y_2\mid x)}\Big).$$

**The DPO loss (Eq. 7)** is the negative log-likelihood of the preferences under this model, now a function of the
policy instead of a reward model:

$$\mathcal L_{\rm DPO}(\pi_\theta;\pi_{\rm ref}) = -\mathbb{E}_{(x, y_w, y_l)\sim\mathcal D}\Big[\log\sigma\Big(
\beta\log\frac{\pi_\theta(y_w\mid x)}{\pi_{\rm ref}(y_w\mid x)}
- \beta\log\frac{\pi_\theta(y_l\mid x)}{\pi_{\rm ref}(y_l\mid x)}\Big)\Big].$$

`losses.py` writes $c = \log\frac{\pi_\theta(y_w|x)}{\pi_{\rm ref}(y_w|x)}$ (`chosen_logratios`),
$r = \log\frac{\pi_\theta(y_l|x)}{\pi_{\rm ref}(y_l|x)}$ (`rejected_logratios`; in `losses.py` $r$ is this
log-ratio, not a reward), the margin $h = c - r$, and $\ell = -\log\sigma(\beta h)$.

The cell below checks each step on a problem small enough to enumerate: one prompt with five possible completions.
""")

code(r"""
beta = 0.5
pi_ref = torch.tensor([0.40, 0.25, 0.15, 0.12, 0.08], dtype=torch.float64)  # the reference policy over 5 completions
reward = torch.tensor([0.0, 1.0, -0.5, 2.0, 0.5], dtype=torch.float64)       # the true reward r*(x, y)

def objective(pi):
    # Eq. 3 for one prompt: E_pi[r] - beta KL(pi || pi_ref)
    return (pi * reward).sum() - beta * (pi * (pi / pi_ref).log()).sum()

Z = (pi_ref * torch.exp(reward / beta)).sum()
pi_star = pi_ref * torch.exp(reward / beta) / Z  # Eq. 4

# The identity behind Eq. 4: objective(pi) = beta log Z - beta KL(pi || pi_star), for any pi (here 1000 random ones).
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
# Eq. 6: Bradley-Terry probabilities from the implicit reward equal those from the true reward: Z(x) cancels.
bt_true = torch.sigmoid(reward[:, None] - reward[None, :])
bt_implicit = torch.sigmoid(implicit[:, None] - implicit[None, :])
assert torch.allclose(bt_true, bt_implicit)
print(f"implicit reward - true reward = {(implicit - reward).tolist()}  (each = -beta log Z = {-beta * Z.log():.4f})")
print("P(y_i > y_j) from the implicit reward, identical to the true reward's:\n", bt_implicit)
""")

md(r"""
Now the other direction: minimise Eq. 7 over a free policy $\pi_\theta = \mathrm{softmax}(\theta)$, with every
ordered pair $(y_i, y_j)$ weighted by how often Bradley–Terry prefers $y_i$ (infinite data). The loss comes from
`losses.dpo_loss` (its `pair_weights` multiply each pair's loss). No reward model and no sampling are involved,
yet the minimiser is the RLHF optimum $\pi^*$ of Eq. 4: $\sigma(\beta(c_i - c_j)) = p^*(y_i \succ y_j)$ for all
pairs forces $\beta\log\frac{\pi_\theta}{\pi_{\rm ref}} = r^* + \text{const}$.
""")

code(r"""
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
for k in range(5):
    print(f"{k:2d}   {pi_ref[k]:.3f}   {reward[k]:+.2f}     {pi_star[k]:.4f}        {pi_dpo[k]:.4f}")
assert torch.allclose(pi_dpo, pi_star, atol=1e-3)
""")

# ---------------------------------------------------------------------------------------------------------------
md(r"""
## 2. The loss zoo

Every variant in `losses.LOSSES` is a function of the same four summed log-probabilities. With
$c = \log\frac{\pi_\theta(y_w)}{\pi_{\rm ref}(y_w)}$, $r = \log\frac{\pi_\theta(y_l)}{\pi_{\rm ref}(y_l)}$ and the
margin $h = c - r$, DPO is $\ell(h) = -\log\sigma(\beta h)$. Its **gradient weight**

$$-\frac{d\ell}{dh} = \beta\,\sigma(-\beta h)$$

is how hard a pair pulls: close to $\beta$ for a pair ranked the wrong way, close to 0 for one already ranked right
by a wide margin (the paper's Section 4, "What does the DPO update do?").

Some variants do not read $h$ alone, so to draw all of them against $h$ I fixed:

- $\beta = 0.1$ for every loss (the project's default; SimPO's paper uses 2–10, so its curve here is flat);
- $c = h/2$ and $r = -h/2$ (the policy moves both completions equally, in opposite directions), which matters for
  `nca_pair`, `bco_pair`, `sppo_hard`, `apo_zero`, `apo_down`, `dpop` (its penalty needs $c < 0$, so only $h<0$);
- reference log-probs $\log\pi_{\rm ref}(y_w) = \log\pi_{\rm ref}(y_l) = -40$ with $|y_w| = |y_l| = 10$ tokens
  (a mean of −4 nats per token), so the policy log-probs are $-40 \pm h/2$; this matters for the length-normalised
  losses (`ipo`, `sigmoid_norm`, `simpo`, `rdpo`, `orpo`, which see $h/10$) and the NLL in `sft` and `orpo`;
- $\varepsilon$ (`label_smoothing`) $= 0$, except `exo_pair` ($10^{-3}$, its paper's value; it needs $\varepsilon>0$)
  and `robust` ($0.1$); the other hyperparameters at their defaults ($\tau = 0.05$, $\gamma = 0.5$,
  $\lambda = 50$, $\alpha = 0.01$);
- one pair per batch, so `aot` and `aot_unpaired` (which sort over the batch) reduce to cDPO.

The gradient is taken by autograd through `losses.dpo_loss`. The dashed line in every panel is DPO.
""")

code(r"""
BETA, LENGTH, REF_LOGP = 0.1, 10, -40.0
EXTRA = {"exo_pair": dict(label_smoothing=1e-3), "robust": dict(label_smoothing=0.1)}

def loss_and_weight(name, h):
    # (loss, -dloss/dh) of one pair at margin h, under the parameterisation above
    h = torch.tensor([float(h)], dtype=torch.float64, requires_grad=True)
    ref = torch.full((1,), REF_LOGP, dtype=torch.float64)
    lengths = torch.full((1,), float(LENGTH), dtype=torch.float64)
    loss, _, _ = losses.dpo_loss(ref + h / 2, ref - h / 2, ref, ref, loss_type=name, beta=BETA,
                                 chosen_lengths=lengths, rejected_lengths=lengths, **EXTRA.get(name, {}))
    (grad,) = torch.autograd.grad(loss.sum(), h)
    return loss.item(), -grad.item()

h_grid = torch.linspace(-60, 60, 121).tolist()
curves = {name: [loss_and_weight(name, h) for h in h_grid] for name in losses.LOSS_TYPES}

for what, column in (("loss  ℓ(h)", 0), ("gradient weight  −dℓ/dh", 1)):
    fig, axes = plt.subplots(4, 5, figsize=(17, 11), sharex=True)
    for ax, name in zip(axes.flat, losses.LOSS_TYPES):
        ax.plot(h_grid, [v[column] for v in curves["sigmoid"]], "k--", lw=0.8)
        ax.plot(h_grid, [v[column] for v in curves[name]], lw=2)
        ax.axvline(0, color="grey", lw=0.5)
        ax.set_title(name)
    axes.flat[-1].axis("off")
    axes.flat[-1].text(0.05, 0.5, f"{what}\nβ = {BETA}, c = h/2, r = −h/2\n|y| = {LENGTH}, log π_ref = {REF_LOGP}\n"
                       "dashed: DPO (sigmoid)", fontsize=11)
    for ax in axes[-1]:
        ax.set_xlabel("margin h = c − r")
    fig.suptitle(what, fontsize=14)
    fig.tight_layout()
    plt.show()
""")

md(r"""
What the shapes say. `hinge` stops pulling once $\beta h \ge 1$ ($h = 10$ here). `ipo` and `sppo_hard` are squares
that pull toward a target margin and push *back* beyond it (their weight turns negative), instead of driving $h$ to
infinity. `robust`'s weight never reaches 0: its linear term, $-\frac{\varepsilon}{1-2\varepsilon}\beta h$, keeps
pushing. `exo_pair` pulls hardest near $h = 0$ and little on pairs ranked very wrong. `nca_pair`, `bco_pair` and
the APO losses score $c$ and $r$ separately, so their curves depend on how $h$ is split (here evenly). `discopop`
is not convex: near $h = 0$ its mixing gate switches from the logistic to the exponential term, and the weight dips
below 0. `dpop` adds $\lambda = 50$ times the chosen log-ratio's shortfall when $c < 0$. `sft` and `orpo` carry
an NLL term whose gradient does not vanish at any margin. The length-normalised losses see $h/|y|$: flatter.
""")

md(r"""
At $h = 0$ the policy equals the reference on both completions, and each loss has a value that can be worked out by
hand from its formula (with $\sigma(0) = \tfrac12$): for DPO $-\log\tfrac12 = \ln 2$; for IPO
$(0 - \tfrac{1}{2\beta})^2 = \tfrac{1}{4\beta^2}$; for DiscoPOP the mixing weight is $\sigma(0) = \tfrac12$, so
$\tfrac12\ln 2 + \tfrac12 e^0$; for SimPO $-\log\sigma(-\gamma) = \ln(1 + e^{\gamma})$; the NLL of `sft` and `orpo`
is the reference's mean per-token NLL, $40/10 = 4$. The table checks every loss against its closed form (a new
loss in `losses.py` makes this cell fail until its closed form is added).
""")

code(r"""
ln2, eps, gamma, nll = math.log(2), 1e-3, 0.5, -REF_LOGP / LENGTH
closed_forms = {
    "sigmoid": ("ln 2", ln2),
    "hinge": ("1", 1.0),
    "ipo": ("1/(4β²)", 1 / (4 * BETA**2)),
    "exo_pair": ("−ln 2 − ½ ln(ε(1−ε))", -ln2 - 0.5 * math.log(eps * (1 - eps))),
    "nca_pair": ("2 ln 2", 2 * ln2),
    "robust": ("((1−ε) ln 2 − ε ln 2)/(1−2ε) = ln 2", ln2),
    "bco_pair": ("2 ln 2", 2 * ln2),
    "sppo_hard": ("2·(1/(2β))² = 1/(2β²)", 1 / (2 * BETA**2)),
    "aot": ("ln 2", ln2),
    "aot_unpaired": ("ln 2", ln2),
    "apo_zero": ("(1 − ½) + ½ = 1", 1.0),
    "apo_down": ("½ + (1 − ½) = 1", 1.0),
    "discopop": ("½ ln 2 + ½", 0.5 * ln2 + 0.5),
    "sft": ("NLL = −log π_ref(y_w)/|y_w|", nll),
    "sigmoid_norm": ("ln 2", ln2),
    "simpo": ("ln(1 + e^γ)", math.log1p(math.exp(gamma))),
    "dpop": ("ln 2 (no penalty at c = 0)", ln2),
    "rdpo": ("ln 2 (equal lengths)", ln2),
    "orpo": ("NLL + β ln 2", nll + BETA * ln2),
}
assert set(closed_forms) == set(losses.LOSSES), set(losses.LOSSES) ^ set(closed_forms)
print(f"{'loss_type':<13} {'ℓ(0) computed':>14} {'closed form':>38} {'value':>10}   −dℓ/dh at 0")
for name, (formula, value) in closed_forms.items():
    at_zero, weight = loss_and_weight(name, 0.0)
    assert math.isclose(at_zero, value, rel_tol=1e-9), (name, at_zero, value)
    print(f"{name:<13} {at_zero:>14.6f} {formula:>38} {value:>10.6f}   {weight:.4f}")
assert math.isclose(loss_and_weight("sigmoid", 0.0)[1], BETA / 2)  # β σ(0) = β/2
""")

# ---------------------------------------------------------------------------------------------------------------
md(r"""
## 3. Data: from a row to a batch

The shipped preference set (`assets/sentiment-prefs`) is a miniature of the paper's controlled-sentiment task
(Section 6.1): the prompt is the start of a movie review, the completions were sampled from the shipped SFT model
(`assets/tiny-sentiment-lm`), and the more positive one (by `sentiment.sentiment_score`) is *chosen*.

`data.prepare_dataset` turns each row into three lists of token ids. A standard (string) completion gets the EOS
token appended, so the model also learns where to stop. A row with no `prompt` field is split by
`data.extract_prompt`: the prompt is the longest common prefix of chosen and rejected, so words that both
completions happen to start with join the prompt (and leave the loss). The loss needs
$\log\pi(y\mid x) = \sum_t \log\pi(y_t\mid x, y_{<t})$ over the completion tokens only, so each sequence carries a
**completion mask**: 1 on completion tokens, 0 on prompt and padding.

`cfg` below is the configuration `python dpo.py` would use (the shipped model and data, and the demo's defaults).
""")

code(r"""
from transformers import AutoTokenizer

cfg = dpo.parse_args(["--output_dir", str(WORK / "run")])
print(f"model {cfg.model}\ndataset {cfg.dataset}\nbeta {cfg.beta}, loss {cfg.loss_type}, max_length {cfg.max_length}, "
      f"LoRA {cfg.use_peft} (r={cfg.lora_r}), learning rate {cfg.learning_rate}, bf16 {cfg.bf16}")
tokenizer = AutoTokenizer.from_pretrained(cfg.model)
pad_id = data.pad_token_id(tokenizer)
train_rows, eval_rows = data.load_preference_dataset(cfg.dataset, cfg.dataset_split, cfg.eval_split)
print(f"{len(train_rows)} training pairs, {len(eval_rows)} held-out pairs")

row = train_rows[0]
print("\nraw row:", json.dumps(row, indent=1))
# The same pair in the implicit-prompt format: the prompt is what chosen and rejected have in common.
implicit = data.extract_prompt(row["prompt"] + row["chosen"], row["prompt"] + row["rejected"])
print("\nextract_prompt on prompt+chosen, prompt+rejected:", implicit)
""")

code(r"""
train_set = data.prepare_dataset(train_rows, tokenizer, max_length=cfg.max_length, truncation_mode=cfg.truncation_mode)
example = train_set[0]
print(example)

one = data.collate([example], pad_id)  # rows: [prompt + chosen, prompt + rejected], right-padded to one width
print(f"\n{'pos':>3}  {'prompt + chosen':<16}{'id':>4} {'attn':>4} {'compl':>5}   |  {'prompt + rejected':<18}{'id':>4} "
      f"{'attn':>4} {'compl':>5}")
for t in range(one["input_ids"].shape[1]):
    cells = []
    for k in (0, 1):
        token_id = int(one["input_ids"][k, t])
        cells.append(f"{tokenizer.convert_ids_to_tokens(token_id):<16}{token_id:>4} {int(one['attention_mask'][k, t]):>4} "
                     f"{int(one['completion_mask'][k, t]):>5}")
    print(f"{t:>3}  {cells[0]}   |  {cells[1]}")
""")

md(r"""
**Truncation.** A sequence longer than `max_length` must lose tokens from one end. `keep_end` (this project's
default) drops the *start* of the prompt and keeps the completion with its EOS, which is what the preference is
about; `keep_start` (TRL's default) keeps the prompt and drops the *end* of the completion, EOS included. Below,
the longest pair of the training set with `max_length` set to its longest completion plus 2, so that `keep_end`
keeps 2 prompt tokens of the longer sequence. `data.show_example` marks each cut part.
""")

code(r"""
import html

from IPython.display import HTML, display

untruncated = data.prepare_dataset(train_rows, tokenizer, max_length=None, verbose=False)
long_example = max(untruncated, key=lambda e: len(e["prompt_ids"]) + max(len(e["chosen_ids"]), len(e["rejected_ids"])))
short_max_length = max(len(long_example["chosen_ids"]), len(long_example["rejected_ids"])) + 2
views = {mode: data.show_example(long_example, tokenizer, max_length=short_max_length, truncation_mode=mode)
         for mode in data.TRUNCATION_MODES}
cell = '<td style="vertical-align:top; text-align:left"><b>{}</b><pre style="white-space:pre-wrap">{}</pre></td>'
display(HTML("<table><tr>" + "".join(cell.format(mode, html.escape(text)) for mode, text in views.items()) + "</tr></table>"))
for mode in data.TRUNCATION_MODES:
    kept = data.collate([long_example], pad_id, max_length=short_max_length, truncation_mode=mode)
    for k, name in enumerate(("chosen", "rejected")):
        print(f"{mode:<10} prompt+{name:<8} completion_mask {''.join(map(str, kept['completion_mask'][k].tolist()))}")
""")

md(r"""
**The collated batch.** `data.collate` stacks $B$ pairs into $2B$ rows: rows $0..B-1$ are prompt+chosen, rows
$B..2B-1$ prompt+rejected in the same order, right-padded to a common width. One forward pass then scores both
completions, and `.chunk(2)` (or `[:B]`, `[B:]`) separates them.
""")

code(r"""
B = 4
batch = data.collate(train_set[:B], pad_id, cfg.max_length, cfg.truncation_mode)
for key, value in batch.items():
    print(f"{key:<16} {tuple(value.shape)} {value.dtype}")
print("\ninput_ids:\n", batch["input_ids"])
for k in range(2 * B):
    kind = f"chosen {k}" if k < B else f"rejected {k - B}"
    length = int(batch["attention_mask"][k].sum())
    print(f"row {k} ({kind:<10}): {tokenizer.decode(batch['input_ids'][k, :length])}")

fig, ax = plt.subplots(figsize=(12, 2.6))
ax.imshow(batch["attention_mask"] + batch["completion_mask"], cmap="viridis", aspect="auto")  # 0 pad, 1 prompt, 2 completion
ax.set_yticks(range(2 * B), [f"chosen {k}" for k in range(B)] + [f"rejected {k}" for k in range(B)])
ax.set_xlabel("position")
ax.set_title("dark: padding, teal: prompt, yellow: completion (completion_mask = 1)")
plt.show()
""")

# ---------------------------------------------------------------------------------------------------------------
md(r"""
## 4. The concatenated forward pass and one step by hand

For each of the $2B$ rows the model gives logits $z_t \in \mathbb{R}^V$ at every position; position $t$ predicts
token $t+1$, so

$$\log\pi(y_{t+1}\mid x, y_{\le t}) = z_{t, y_{t+1}} - \log\sum_{v} e^{z_{t,v}},\qquad
\log\pi(y\mid x) = \sum_{t} m_{t+1}\,\log\pi(y_{t+1}\mid x, y_{\le t})$$

with $m$ the completion mask. `dpo.completion_logps_naive` computes this with a full log-softmax;
`dpo.completion_logps` (what training uses) gives the same numbers while projecting only completion positions
through the LM head, in chunks. `dpo.sequence_logps` sums over positions.

The policy is the shipped model with LoRA adapters (`dpo.load_model`, as `dpo.main` does). LoRA's $B$ matrices
start at zero, so at step 0 the policy *is* the reference; `dpo.reference` gives the reference as the same
network with its adapters switched off, so no second copy is kept in memory.
""")

code(r"""
torch.manual_seed(cfg.seed)
model = dpo.load_model(cfg, cfg.model, device, trainable=True)
autocast = lambda: torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.bf16)  # as in dpo.main
batch = dpo.to_device(batch, device)

atol = 5e-2 if cfg.bf16 else 1e-4  # bf16 matrix products of different shapes round differently
with torch.no_grad(), autocast():
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    naive = dpo.completion_logps_naive(model, batch)
    per_token, _ = dpo.completion_logps(model, batch)
assert torch.allclose(naive, per_token, atol=atol)
logps = dpo.sequence_logps(per_token, batch["completion_mask"])
assert torch.allclose(logps, (per_token * batch["completion_mask"][:, 1:]).sum(1))
print(f"input_ids {tuple(batch['input_ids'].shape)} = [2B, T];  logits {tuple(logits.shape)} = [2B, T, V];  "
      f"per-token log-probs {tuple(per_token.shape)} = [2B, T-1];  sequence log-probs {tuple(logps.shape)} = [2B]")

row0 = batch["input_ids"][0]
print("\nrow 0 (prompt + chosen 0): each position t predicts token t+1")
for t in range(int(batch["attention_mask"][0].sum()) - 1):
    mask = int(batch["completion_mask"][0, t + 1])
    logp = f"log π = {naive[0, t].item():8.4f}" if mask else "(prompt: not scored)"
    print(f"  t={t:>2} -> {tokenizer.convert_ids_to_tokens(int(row0[t + 1])):<14} mask {mask}  {logp}")
print(f"sum over the completion = log π(y_w|x) = {logps[0].item():.4f}")
print("\nsequence log-probs, chosen rows:  ", logps[:B].cpu())
print("sequence log-probs, rejected rows:", logps[B:].cpu())
""")

md(r"""
**One prompt per pair.** Rows $i$ and $B+i$ start with the same prompt $x$: the concatenated batch computes every
prompt twice. `data.share_prompts` packs each pair as one row $[x; y_w; y_l]$: the positions of $y_l$ restart
right after $x$, and a 4D attention mask keeps $y_l$'s tokens from seeing $y_w$'s, so every token sees exactly the
tokens and positions it sees in its own concatenated row. The log-probs are the same; the prompt is computed once
(Wang et al. 2024, "Accelerating Direct Preference Optimization with Prefix Sharing", arXiv:2410.20305). It also
needs both completions to be scored under *one* prompt, which is what makes $\beta\log Z(x)$ cancel in §1: with
`truncation_scope="pair"` (the default) a long pair is cut so that it is. `dpo.main` uses the shared rows by
default (`--prefix_sharing`), after checking on a real batch that the model gives the same numbers both ways.
""")

code(r"""
shared = dpo.to_device(data.share_prompts({k: v.cpu() for k, v in batch.items()}, pad_id), device)  # re-laid
with torch.no_grad(), autocast():
    shared_per_token, _ = dpo.completion_logps(model, {**batch, **shared})
assert torch.allclose(shared_per_token, per_token, atol=atol)
print(f"token slots: concatenated rows {tuple(batch['input_ids'].shape)} = {batch['input_ids'].numel()}, "
      f"shared rows {tuple(shared['shared_input_ids'].shape)} = {shared['shared_input_ids'].numel()}")

n = int((shared["shared_input_ids"][0] != pad_id).sum())  # pair 0 without its padding
fig, ax = plt.subplots(figsize=(5, 5))
ax.imshow(shared["shared_attention_mask"][0, 0, :n, :n].cpu(), cmap="Greys")
prompt_len = int(batch["completion_mask"][0].argmax())
chosen_len = int(batch["completion_mask"][0].sum())
for edge in (prompt_len, prompt_len + chosen_len):
    ax.axhline(edge - 0.5, color="tab:red", lw=0.8), ax.axvline(edge - 0.5, color="tab:red", lw=0.8)
ax.set_xlabel("key (attended) token"), ax.set_ylabel("query token")
ax.set_title("pair 0: [prompt; chosen; rejected], black = attends")
plt.show()
print("positions of pair 0:", shared["shared_position_ids"][0, :n].tolist())
""")

md(r"""
**One training step by hand.** With $h_i = c_i - r_i$ per pair and the batch loss
$L = \frac1B\sum_i -\log\sigma(\beta h_i)$, the gradient of Eq. 7 with respect to the summed log-probs (the paper's
Section 4) is

$$\frac{\partial L}{\partial \log\pi_\theta(y_{w,i}\mid x_i)} = -\frac{\beta}{B}\,\sigma(-\beta h_i),\qquad
\frac{\partial L}{\partial \log\pi_\theta(y_{l,i}\mid x_i)} = +\frac{\beta}{B}\,\sigma(-\beta h_i):$$

raise the chosen log-prob, lower the rejected one, each by $\beta\,\sigma(-\beta h_i)$, i.e. by how wrong the
implicit reward model currently is on that pair. The paper writes the same gradient for the parameters, with
$\hat r_\theta(x, y_l) - \hat r_\theta(x, y_w) = -\beta h$:

$$\nabla_\theta\mathcal L_{\rm DPO} = -\beta\,\mathbb{E}\Big[\sigma\big(\hat r_\theta(x, y_l) - \hat r_\theta(x, y_w)\big)
\big(\nabla_\theta\log\pi_\theta(y_w\mid x) - \nabla_\theta\log\pi_\theta(y_l\mid x)\big)\Big].$$

Autograd's gradient is checked against it on two steps: at step 0 ($h = 0$, the loss is exactly $\ln 2$) and after
one AdamW update, where $h \ne 0$. `dpo.dpo_step`, the function the training loop calls, must give the same loss.
""")

code(r"""
optimizer = dpo.make_optimizer(cfg, model)
for step in range(2):
    with autocast():
        per_token, _ = dpo.completion_logps(model, batch)
        logps = dpo.sequence_logps(per_token, batch["completion_mask"])
        logps.retain_grad()  # keep the gradient of this intermediate tensor to inspect it
        with dpo.reference(model, None) as ref:  # LoRA: the reference is the policy with adapters off
            ref_logps = dpo.sequence_logps(dpo.completion_logps(ref, batch)[0], batch["completion_mask"])
        pair_losses, chosen_rewards, rejected_rewards = losses.dpo_loss(
            logps[:B], logps[B:], ref_logps[:B], ref_logps[B:], beta=cfg.beta)
        loss = pair_losses.mean()
    loss.backward()

    h = (logps[:B] - ref_logps[:B]) - (logps[B:] - ref_logps[B:])
    eq7 = -cfg.beta / B * torch.sigmoid(-cfg.beta * h.detach())
    assert torch.allclose(logps.grad[:B], eq7) and torch.allclose(logps.grad[B:], -eq7)
    with torch.no_grad(), autocast():
        step_loss, metrics = dpo.dpo_step(cfg, model, None, batch)
    assert torch.isclose(step_loss, loss.detach(), atol=atol)
    if step == 0:
        assert math.isclose(loss.item(), math.log(2), abs_tol=1e-6)  # policy = reference: h = 0
    print(f"step {step}: loss {loss.item():.6f}  (dpo.dpo_step: {step_loss.item():.6f})")
    print(f"  margin h               {h.detach().cpu()}")
    print(f"  rewards chosen β·c     {chosen_rewards.cpu()}\n  rewards rejected β·r   {rejected_rewards.cpu()}")
    print(f"  dL/dlogπ(y_w) autograd {logps.grad[:B].cpu()}\n  −β/B·σ(−βh)  (Eq. 7)   {eq7.cpu()}")
    print(f"  dL/dlogπ(y_l) autograd {logps.grad[B:].cpu()}")
    optimizer.step()  # dpo.main also clips the gradient norm and steps the learning-rate schedule here
    optimizer.zero_grad(set_to_none=True)
del model, optimizer
""")

# ---------------------------------------------------------------------------------------------------------------
md(r"""
## 5. Training the shipped tiny model

`dpo.main` runs the whole loop: data, the LoRA policy and its reference, AdamW with a linear schedule, and a line
of TRL-named metrics every `logging_steps` into `output_dir/metrics.jsonl`:

- `rewards/chosen` $= \beta\,c$ and `rewards/rejected` $= \beta\,r$, the implicit rewards (batch means);
- `rewards/margins` $= \beta(c - r) = \beta h$; `rewards/accuracies`: the fraction of pairs with $h > 0$;
- `eval_*`: the same on the held-out pairs.

The run below is short (the full demo, `python dpo.py`, trains one epoch).
""")

TRAIN_STEPS = 100
code(rf"""
train_args = ["--max_steps", "{TRAIN_STEPS}", "--logging_steps", "5", "--eval_steps", "25", "--save_steps", "0",
              "--show_examples", "0", "--sample_eval", "0"]  # section 6 samples
run_cfg = dpo.parse_args(["--output_dir", str(WORK / "run")] + train_args)
t = time.time()
final_eval = dpo.main(run_cfg)
plt.switch_backend(PLOT_BACKEND)
print(f"trained {{run_cfg.max_steps}} steps in {{time.time() - t:.0f}} s")
""")

code(r"""
records = [json.loads(line) for line in (WORK / "run" / "metrics.jsonl").read_text().splitlines()]
train_log = [r for r in records if "loss" in r]
eval_log = [r for r in records if "eval_loss" in r]

fig, axes = plt.subplots(1, 4, figsize=(18, 3.8))
panels = [("loss", ["loss"]), ("implicit rewards", ["rewards/chosen", "rewards/rejected"]),
          ("margin β·h", ["rewards/margins"]), ("accuracy", ["rewards/accuracies"])]
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
""")

md(r"""
**Why can the chosen reward fall while accuracy rises?** The loss sees only the margin $h = c - r$. Lowering both
log-probs, the rejected one faster, raises $h$ just as well as raising $c$, and nothing in Eq. 7 keeps
$\sum_y \pi_\theta(y\mid x)$ on the two completions of the pair: the probability that leaves them can go to completions that
appear in no pair. Here the chosen completions are themselves samples of the SFT model that merely beat another
sample, so nothing asks the policy to keep them likely: it can move probability to reviews more positive still. And
chosen and rejected completions share many tokens and phrases ("the", "was", "overall ,"), pushed up in one and down
in the other at the same step; lowering the rejected one drags the chosen one down with it. So `rewards/chosen` can
drift below 0 while `rewards/accuracies` climbs. Pal et al. 2024 (DPO-Positive, arXiv:2402.13228; `loss_type dpop`
here) and Razin et al. 2024 ("Unintentional Unalignment: Likelihood Displacement in Direct Preference Optimization",
arXiv:2410.08847) study this; whether it happens depends on the data and $\beta$, so read the printed numbers above
rather than expecting it.
""")

# ---------------------------------------------------------------------------------------------------------------
md(r"""
## 6. What DPO did

Preference accuracy says the policy *ranks* two given completions correctly. The paper's question (Section 6.1) is
whether it *writes* better ones: sample completions of held-out prompts from the reference and from the trained
policy, and score them with the ground-truth reward (here `sentiment.sentiment_score`: positive minus negative words
of the whole review, see its docstring). `sample_eval.sample_eval` does this with common random numbers (the same
seed for both models) and also estimates the KL divergence that Eq. 3 pays for, on the policy's own samples:

$$\mathbb{D}_{\rm KL}\big(\pi_\theta\,\|\,\pi_{\rm ref}\big) = \mathbb{E}_{y\sim\pi_\theta}\Big[\log\pi_\theta(y\mid x)
- \log\pi_{\rm ref}(y\mid x)\Big]\quad\text{(nats per sequence)}.$$
""")

code(r"""
from peft import PeftModel

def trained_policy(run_dir):
    # the shipped base model with the LoRA adapter dpo.main saved in run_dir/model
    return PeftModel.from_pretrained(dpo.load_model(cfg, cfg.model, device, trainable=False), run_dir / "model").eval()

prompts = eval_rows[:64]["prompt"]
policy = trained_policy(WORK / "run")
result = sample_eval(policy, tokenizer, prompts, reference=None, reward_fn=sentiment_score, seed=0, show=4)
""")

BETAS = (0.02, 0.1, 0.5)
FRONTIER_STEPS, FRONTIER_SAVE = 60, 20
BETA_SET = ", ".join(map(str, BETAS))
SCORED_AT = ", ".join(str(step) for step in range(FRONTIER_SAVE, FRONTIER_STEPS + 1, FRONTIER_SAVE))
md(rf"""
**The reward–KL frontier.** The paper's Figure 2 (left) plots, for many training runs and checkpoints, the mean
reward of the samples against their KL to the reference: a method is better if it reaches more reward for the same
KL. In Eq. 3 $\beta$ is the price of one nat of KL, so a smaller $\beta$ lets the policy travel further from the
reference. Below: {len(BETAS)} runs of {FRONTIER_STEPS} steps with $\beta \in \{{{BETA_SET}\}}$, each scored at steps
{SCORED_AT} (from its checkpoints) on the same 64 held-out prompts, with 2 samples per prompt. The KL is a Monte
Carlo estimate and each run is short: this is a miniature of the figure, not a reproduction. Where the reward stops growing with the KL, the
extra nats bought text the reward does not value; compare the policy's samples above with the reference's.
""")

code(rf"""
import contextlib
import io

from safetensors.torch import load_file

def reward_and_kl(model):
    out = sample_eval(model, tokenizer, prompts, reference=None, reward_fn=sentiment_score, num_samples=2, seed=1, show=0)
    return out["reward_reference"], out["reward_policy"], out["kl"]

frontier = {{}}
for beta in {BETAS}:
    run_dir = WORK / f"beta-{{beta}}"
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):  # section 5 showed the logs
        dpo.main(dpo.parse_args(["--output_dir", str(run_dir), "--beta", str(beta), "--max_steps", "{FRONTIER_STEPS}",
                                 "--save_steps", "{FRONTIER_SAVE}", "--logging_steps", "{FRONTIER_SAVE}",
                                 "--show_examples", "0", "--sample_eval", "0",
                                 "--per_device_eval_batch_size", "32"]))  # its final evaluation is not used here
        policy = trained_policy(run_dir)  # loaded once; each checkpoint's LoRA weights are copied in below
        points = []
        for checkpoint in sorted(run_dir.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1])):
            loaded = policy.load_state_dict(load_file(checkpoint / "trainable.safetensors"), strict=False)
            assert not loaded.unexpected_keys, loaded.unexpected_keys  # every saved tensor found its LoRA weight
            reference_reward, policy_reward, kl = reward_and_kl(policy)
            points.append((int(checkpoint.name.split("-")[1]), kl, policy_reward))
    plt.switch_backend(PLOT_BACKEND)
    frontier[beta] = points
    print(f"beta {{beta}}: " + ",  ".join(f"step {{s}}: KL {{kl:.2f}}, reward {{r:+.3f}}" for s, kl, r in points))
""")

code(r"""
fig, ax = plt.subplots(figsize=(7, 4.5))
ax.plot([0], [reference_reward], "k*", markersize=12, label="reference (SFT model)")
for beta, points in frontier.items():
    ax.plot([0] + [kl for _, kl, _ in points], [reference_reward] + [r for _, _, r in points], "o-", label=f"β = {beta}")
    for step, kl, r in points:
        ax.annotate(str(step), (kl, r), textcoords="offset points", xytext=(4, -10), fontsize=7)
ax.set_xlabel("KL(π_θ ‖ π_ref), nats per sequence")
ax.set_ylabel("mean ground-truth reward of samples")
ax.set_title("reward vs KL, labels = training step (cf. the paper's Figure 2, left)")
ax.legend()
plt.show()
""")

# ---------------------------------------------------------------------------------------------------------------
md(r"""
## 7. QLoRA: LoRA on a 4-bit base

**LoRA** ("LoRA: Low-Rank Adaptation of Large Language Models", Hu et al., 2021, arXiv:2106.09685) freezes each
weight $W \in \mathbb{R}^{d_{\rm out}\times d_{\rm in}}$ and trains a low-rank update,
$W' = W + \frac{\alpha}{r_{\rm LoRA}} B A$ with $A \in \mathbb{R}^{r_{\rm LoRA}\times d_{\rm in}}$,
$B \in \mathbb{R}^{d_{\rm out}\times r_{\rm LoRA}}$, $B = 0$ at the start: $r_{\rm LoRA}(d_{\rm in} + d_{\rm out})$
trainable parameters instead of $d_{\rm in} d_{\rm out}$. For DPO it also gives the reference for free: adapters
off.

**QLoRA** ("QLoRA: Efficient Finetuning of Quantized LLMs", Dettmers et al., 2023, arXiv:2305.14314) stores the
frozen $W$ in 4-bit **NormalFloat (NF4)**: blocks of 64 weights share one absmax scale, and each weight is one of 16
levels placed at quantiles of a normal distribution (weights are roughly normal, so each level is used equally
often). **Double quantisation** stores the scales in 8 bits with one fp32 scale per 256 of them:
$4 + 8/64 + 32/(64\cdot256) \approx 4.127$ bits per weight. In the forward pass each block is dequantised to the
compute dtype (bf16), so the *arithmetic* is unchanged; only storage shrinks, about 4× against bf16. Gradients flow
through the frozen 4-bit weights into the LoRA matrices, which stay in fp32 with their AdamW state. The
embedding and the LM head are not quantised.

In `dpo.py`: `--use_peft` (on by default) adds LoRA to every linear layer (`--lora_target_modules all-linear`),
and `--load_in_4bit` loads the base in NF4 with double quantisation (`dpo.load_model`). bitsandbytes also runs
4-bit on a CPU, so the counts below are real models. (On a CPU the frozen base stays in fp32, as `dpo.py` uses bf16
only on a GPU that supports it; so here LoRA's footprint is the whole model plus its adapters.)
""")

code(r"""
def count(model):
    # parameters as the model sees them: a packed 4-bit weight holds 2 per byte, quant_state keeps the real shape
    total = sum(p.quant_state.shape.numel() if hasattr(p, "quant_state") else p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return total, trainable

print(f"{'mode':<8} {'parameters':>11} {'trainable':>10} {'share':>7} {'weights in memory':>18}")
models = {}
for mode, args in (("full", ["--use_peft", "False"]), ("LoRA", []), ("QLoRA", ["--load_in_4bit"])):
    mode_cfg = dpo.parse_args(["--output_dir", str(WORK / "unused")] + args)
    models[mode] = dpo.load_model(mode_cfg, mode_cfg.model, device, trainable=True)
    total, trainable = count(models[mode])
    megabytes = models[mode].get_memory_footprint() / 1e6
    print(f"{mode:<8} {total:>11,} {trainable:>10,} {trainable / total:>7.1%} {megabytes:>15.2f} MB")
q_proj = models["QLoRA"].base_model.model.model.layers[0].self_attn.q_proj
print("\nQLoRA's first attention projection:\n", q_proj)
weight = q_proj.base_layer.weight
print(f"stored as {type(weight).__name__} {weight.dtype} {tuple(weight.shape)}: {weight.quant_state.shape.numel():,} "
      f"weights in {weight.numel():,} bytes, blocksize {weight.quant_state.blocksize}")
""")

md(r"""
**Memory arithmetic.** What a DPO step on one GPU must hold, with $N$ the model's parameters ($N_{\rm lin}$ in the
decoder's linear layers, $N_{\rm emb}$ in the embedding and LM head), $L$ layers, hidden size $h$, MLP size $i$,
key/value width $k$, vocabulary $V$, LoRA rank $r_{\rm LoRA}=16$ on the 7 linear layers of each block, and one
micro-batch of 1 pair of 1024-token sequences (2 rows, $n = 2048$ tokens), gradient checkpointing on:

| term | full fine-tuning (`--use_peft False`) | LoRA (bf16 base) | QLoRA (NF4 base) |
|---|---|---|---|
| weights | $4N$ (fp32 policy) $+\,4N$ (fp32 reference copy) | $2N$ | $\frac{4.127}{8}N_{\rm lin} + 2N_{\rm emb}$ |
| trainable + AdamW | $12N$ (grad, $m$, $v$ in fp32) | $16P$, $P = L\,r_{\rm LoRA}\sum_{\rm lin}(d_{\rm in}+d_{\rm out})$ | $16P$ |
| activations | $2nhL + 2n(6h + 2k + 4i)$ | same | same |
| logits | $2\cdot 4 \cdot 1024\,V$ | same | same |

*Activations*: with checkpointing, one bf16 hidden state per layer boundary ($2nhL$ bytes) plus one layer's
activations while it is recomputed in backward (roughly $6h + 2k + 4i$ bf16 values per token: norms, q/k/v,
attention and projection outputs, the MLP's gate, up, product and down). The reference forward keeps nothing (it
runs under `no_grad`). *Logits*: `dpo.completion_logps` projects at most 1024 tokens at a time through the LM
head, in fp32, and recomputes them in backward: one $[1024, V]$ fp32 chunk and its gradient. Without chunking the
fp32 logits, their log-softmax and its gradient for all $n$ tokens would take $3\cdot4nV$ bytes (2.9 GiB for
Llama-3's $V = 128256$). Add about 1 GiB for the CUDA context and allocator slack. All of it is an estimate, good
to a GiB or so; the real peak is what `peak_memory_gb` in `metrics.jsonl` reports.

The cell checks the two counting formulas on the shipped model first, then fills the table from each model's
published configuration (Qwen2.5-0.5B, Mistral-7B-v0.1, Llama-3.1-8B).
""")

code(r"""
def shapes(c):
    # (d_in, d_out) of the 7 linear layers of one decoder block: q, k, v, o, gate, up, down
    kv = c["hidden"] // c["heads"] * c["kv_heads"]
    return [(c["hidden"], c["hidden"]), (c["hidden"], kv), (c["hidden"], kv), (c["hidden"], c["hidden"]),
            (c["hidden"], c["inter"]), (c["hidden"], c["inter"]), (c["inter"], c["hidden"])]

def parameters(c):
    # (N_lin, N_emb, N): linear weights (+ q/k/v biases), embedding (+ untied LM head) and norms, total
    kv = c["hidden"] // c["heads"] * c["kv_heads"]
    linear = c["layers"] * (sum(i * o for i, o in shapes(c)) + c["qkv_bias"] * (c["hidden"] + 2 * kv))
    other = c["vocab"] * c["hidden"] * (1 if c["tied"] else 2) + (2 * c["layers"] + 1) * c["hidden"]
    return linear, other, linear + other

def lora_parameters(c, r=16):
    return c["layers"] * r * sum(i + o for i, o in shapes(c))

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
GiB, n_tokens, chunk, overhead = 2**30, 2 * 1024, 1024, 1.0
print(f"\n{'model':<13} {'N':>6} {'method':<6} {'weights':>8} {'train+Adam':>10} {'activ.':>7} {'logits':>7} "
      f"{'total GiB':>9}  {'16 GB':>5} {'24 GB':>5}")
for name, c in configs.items():
    n_lin, n_emb, n = parameters(c)
    p = lora_parameters(c)
    kv = c["hidden"] // c["heads"] * c["kv_heads"]
    activations = 2 * n_tokens * c["hidden"] * c["layers"] + 2 * n_tokens * (6 * c["hidden"] + 2 * kv + 4 * c["inter"])
    logits = 2 * 4 * chunk * c["vocab"]
    for method, weights, trainable in (("full", 8 * n, 12 * n), ("LoRA", 2 * n, 16 * p),
                                       ("QLoRA", 4.127 / 8 * n_lin + 2 * n_emb, 16 * p)):
        terms = [weights / GiB, trainable / GiB, activations / GiB, logits / GiB]
        total = sum(terms) + overhead
        fits = ["yes" if total <= card else "no" for card in (16, 24)]
        print(f"{name:<13} {n / 1e9:>5.2f}B {method:<6} " + " ".join(f"{t:>{w}.2f}" for t, w in zip(terms, (8, 10, 7, 7)))
              + f" {total:>9.1f}  {fits[0]:>5} {fits[1]:>5}")
""")

md(r"""
Reading the table: full fine-tuning as `dpo.py` does it (fp32 weights, an fp32 reference copy, AdamW) costs 20
bytes per parameter before any activation: 0.5B fits a 16 GB card, 7–8B would need 137–152 GiB. LoRA drops the
gradients and optimizer state of the base but keeps it in bf16 at 2 bytes per parameter: Mistral-7B just misses a
16 GB card and Llama-3.1-8B needs 24 GB. QLoRA stores each linear weight in about half a byte, which brings both
onto a 16 GB card; what is left is mostly Llama-3's embedding and LM head in bf16 (2 GiB for its 128k vocabulary)
and the logits chunk. Longer sequences or more pairs per micro-batch grow the activation column in proportion;
`--gradient_accumulation_steps` grows the batch without it.
""")

code(r"""
import shutil

shutil.rmtree(WORK)  # the runs of sections 5 and 6; comment this out to keep them
print(f"notebook ran in {time.time() - start_time:.0f} s on {device}")
""")


def build():
    nb = nbformat.v4.new_notebook()
    nb.metadata = {"kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
                   "language_info": {"name": "python"}}
    for k, cell in enumerate(CELLS):
        cell.id = f"cell-{k:02d}"  # fixed ids, so rebuilding gives the same file
    nb.cells = CELLS
    return nb


def render():
    """The notebook file's exact text."""
    nb = build()
    nbformat.validate(nb)
    return nbformat.writes(nb) + "\n"


def main():
    NOTEBOOK.write_text(render())
    print(f"wrote {NOTEBOOK} ({len(CELLS)} cells, no outputs)")


if __name__ == "__main__":
    main()

"""losses.dpo_loss against TRL 1.16's own DPOTrainer loss (trl is a development dependency only).

One DPOTrainer (fp32, no gradient checkpointing) holds a tiny random Qwen2 policy and a *different* random Qwen2
reference. TRL computes the loss of one collated batch with `compute_loss`; we compute summed completion
log-probs of the same batch with a plain forward (log_softmax(logits[:, :-1]).gather(...) · completion_mask[:, 1:])
and call `dpo_loss`. Every option is switched on the trainer's attributes, which `_compute_loss` reads on each call.
Tolerance: 1e-5, relative for losses above 1 (the trainer's fused LM head and our forward differ by ~1e-7).
"""

import types

import pytest
import torch

pytestmark = pytest.mark.trl
pytest.importorskip("trl")
from datasets import Dataset  # noqa: E402
from tokenizers import Tokenizer, models, pre_tokenizers  # noqa: E402
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM  # noqa: E402
from trl import DPOConfig, DPOTrainer  # noqa: E402

from losses import F_DIVERGENCE_LOSSES, LOSS_TYPES, dpo_loss  # noqa: E402

TRL_LOSS_TYPES = LOSS_TYPES[:15]  # the 15 loss types TRL 1.16 shares with losses.py
BETA = 0.5
ROWS = [  # completions of different lengths, so the length-normalised losses see |y_w| ≠ |y_l|
    {"prompt": "the sky is", "chosen": " blue", "rejected": " green red"},
    {"prompt": "a cat sat on", "chosen": " a mat yes", "rejected": " a dog"},
    {"prompt": "the dog", "chosen": " sat", "rejected": " sat on a red mat no"},
    {"prompt": "is the cat", "chosen": " on the mat", "rejected": " no maybe yes"},
]


def tiny_model(seed, vocab_size):
    torch.manual_seed(seed)
    # initializer_range 0.5 (not 0.02) so the two random models disagree by several nats: h is far from 0
    config = Qwen2Config(vocab_size=vocab_size, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                         initializer_range=0.5)
    return Qwen2ForCausalLM(config)


def completion_logps(model, batch):
    """Per-token log-probs of the completion tokens, [2B, T-1], zero elsewhere; and the full log-softmax."""
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    log_probs = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    per_token = log_probs.gather(-1, batch["input_ids"][:, 1:, None]).squeeze(-1)
    return per_token * batch["completion_mask"][:, 1:], log_probs


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    words = "the sky is blue green red a cat dog sat on mat yes no maybe".split()
    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(words)}}
    tokenizer_model = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer_model.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tokenizer_model, pad_token="<pad>", eos_token="<eos>",
                                        unk_token="<unk>")
    args = DPOConfig(output_dir=str(tmp_path_factory.mktemp("trl")), bf16=False, report_to="none",
                     gradient_checkpointing=False, per_device_train_batch_size=len(ROWS), beta=BETA,
                     use_weighting=True)  # builds the WPO output of the fused head; switched off per test below
    trainer = DPOTrainer(model=tiny_model(0, len(vocab)), ref_model=tiny_model(1, len(vocab)), args=args,
                         train_dataset=Dataset.from_list(ROWS), processing_class=tokenizer)
    trainer.use_weighting = False
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(ROWS))])

    policy_per_token, policy_log_probs = completion_logps(trainer.model, batch)
    reference_per_token, _ = completion_logps(trainer.ref_model, batch)
    shift_mask = batch["completion_mask"][:, 1:]
    chosen_mask = shift_mask.chunk(2)[0].bool()
    # WPO (Zhou et al. 2024, arXiv:2406.11827, Eq. 2): w = exp(mean_t [log p(y_t) - log Σ_v p_v(t)²]) per row
    log_sum_sq = torch.logsumexp(2 * policy_log_probs, dim=-1)
    wpo = torch.exp(((policy_per_token - log_sum_sq) * shift_mask).sum(1) / shift_mask.sum(1).clamp(min=1))
    return dict(
        trainer=trainer, batch=batch, policy_per_token=policy_per_token, reference_per_token=reference_per_token,
        logps=(*policy_per_token.sum(1).chunk(2), *reference_per_token.sum(1).chunk(2)),
        lengths=batch["completion_mask"].sum(1).clamp(min=1).chunk(2),  # TRL's |y|: the unshifted mask
        nll_loss=-policy_per_token.chunk(2)[0][chosen_mask].mean(),  # exactly TRL's `sft` term
        pair_weights=wpo.chunk(2)[0] * wpo.chunk(2)[1],
    )


def trl_loss(setup, **options):
    """TRL's loss on the batch, with trainer attributes (and args.discopop_tau) set for this call only."""
    trainer = setup["trainer"]
    options.setdefault("loss_types", ["sigmoid"])
    options.setdefault("loss_weights", [1.0] * len(options["loss_types"]))
    target = {name: trainer.args if name == "discopop_tau" else trainer for name in options}
    saved = {name: getattr(target[name], name) for name in options}
    for name, value in options.items():
        setattr(target[name], name, value)
    try:
        with torch.no_grad():
            return trainer.compute_loss(trainer.model, setup["batch"]).item()
    finally:
        for name, value in saved.items():
            setattr(target[name], name, value)


def our_loss(setup, logps=None, **options):
    chosen_lengths, rejected_lengths = setup["lengths"]
    options.setdefault("nll_loss", setup["nll_loss"])
    options.setdefault("beta", BETA)
    losses, _, _ = dpo_loss(*(logps or setup["logps"]), chosen_lengths=chosen_lengths,
                            rejected_lengths=rejected_lengths, **options)
    return losses.mean().item()


def assert_parity(ours, theirs):
    assert ours == pytest.approx(theirs, rel=1e-5, abs=1e-5)


def smoothing_for(loss_type):
    """ε where the loss reads it (exo_pair needs ε > 0); sigmoid's ε is a documented difference, tested apart."""
    return {"exo_pair": 1e-3, "robust": 0.1, "aot": 0.1, "aot_unpaired": 0.1}.get(loss_type, 0.0)


@pytest.mark.parametrize("loss_type", TRL_LOSS_TYPES)
def test_every_shared_loss_type(setup, loss_type):
    eps = smoothing_for(loss_type)
    theirs = trl_loss(setup, loss_types=[loss_type], label_smoothing=eps)
    assert_parity(our_loss(setup, loss_type=loss_type, label_smoothing=eps), theirs)


def test_discopop_tau(setup):
    theirs = trl_loss(setup, loss_types=["discopop"], discopop_tau=0.7)
    assert_parity(our_loss(setup, loss_type="discopop", discopop_tau=0.7), theirs)


@pytest.mark.parametrize("f_divergence_type, alpha", [("forward_kl", 0.5), ("js_divergence", 0.5),
                                                      ("alpha_divergence", 0.5), ("alpha_divergence", 0.2),
                                                      ("alpha_divergence", 1.0)])
@pytest.mark.parametrize("loss_type", sorted(F_DIVERGENCE_LOSSES))
def test_every_f_divergence(setup, loss_type, f_divergence_type, alpha):
    eps = smoothing_for(loss_type)
    theirs = trl_loss(setup, loss_types=[loss_type], label_smoothing=eps, f_divergence_type=f_divergence_type,
                      f_alpha_divergence_coef=alpha)
    ours = our_loss(setup, loss_type=loss_type, label_smoothing=eps, f_divergence_type=f_divergence_type,
                    f_alpha_divergence_coef=alpha)
    assert_parity(ours, theirs)


@pytest.mark.parametrize("loss_types, loss_weights", [(["sigmoid", "bco_pair", "sft"], [0.8, 0.2, 1.0]),  # MPO
                                                      (["sigmoid", "sft"], [1.0, 0.3]),  # RPO in TRL 1.16
                                                      (["ipo", "hinge", "apo_zero"], None)])
def test_loss_weights(setup, loss_types, loss_weights):
    theirs = trl_loss(setup, loss_types=loss_types, loss_weights=loss_weights or [1.0] * len(loss_types))
    assert_parity(our_loss(setup, loss_type=loss_types, loss_weights=loss_weights), theirs)


def test_rpo_alpha_is_trls_sigmoid_plus_sft(setup):
    theirs = trl_loss(setup, loss_types=["sigmoid", "sft"], loss_weights=[1.0, 0.3])
    assert_parity(our_loss(setup, rpo_alpha=0.3), theirs)


def test_sft_nll_derived_from_sums_and_lengths(setup):
    """Without nll_loss, -Σ policy_chosen / Σ chosen_lengths gives TRL's token-mean NLL (every prompt is non-empty)."""
    theirs = trl_loss(setup, loss_types=["sft"])
    assert_parity(our_loss(setup, loss_type="sft", nll_loss=None), theirs)


@pytest.mark.parametrize("loss_type", [t for t in TRL_LOSS_TYPES if t not in ("aot", "aot_unpaired", "sft")])
def test_use_weighting_is_pair_weights(setup, loss_type):
    eps = smoothing_for(loss_type)
    theirs = trl_loss(setup, loss_types=[loss_type], label_smoothing=eps, use_weighting=True)
    assert_parity(our_loss(setup, loss_type=loss_type, label_smoothing=eps, pair_weights=setup["pair_weights"]),
                  theirs)


def test_use_weighting_with_sft_is_a_documented_difference(setup):
    """TRL 1.16 crashes here: `sft` is one scalar expanded to [B], and `per_sequence_loss *= weights` writes into it
    in place. Ours gives what TRL describes, mean_i(p_i·NLL), and equals TRL's weighted sigmoid + that term."""
    with pytest.raises(RuntimeError, match="more than one element of the written-to tensor"):
        trl_loss(setup, loss_types=["sft"], use_weighting=True)
    p = setup["pair_weights"]
    assert_parity(our_loss(setup, loss_type="sft", pair_weights=p), (p * setup["nll_loss"]).mean().item())
    theirs = trl_loss(setup, loss_types=["sigmoid"], use_weighting=True)
    ours = our_loss(setup, loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.5], pair_weights=p)
    assert_parity(ours, theirs + 0.5 * (p * setup["nll_loss"]).mean().item())


def test_ld_alpha_is_a_log_prob_transform(setup):
    """LD-DPO (ld_alpha) only changes the summed log-probs, for policy and reference alike:
    S = Σ_{k ≤ min(n_w, n_l)} lp_k + α·Σ_{k > min(n_w, n_l)} lp_k, k the position within the completion."""
    alpha = 0.3
    position = setup["batch"]["completion_mask"][:, 1:].cumsum(1)
    shared = torch.minimum(*position[:, -1].chunk(2)).repeat(2)[:, None]
    scale = torch.where(position <= shared, 1.0, alpha)
    policy, reference = (setup[k] * scale for k in ("policy_per_token", "reference_per_token"))
    logps = (*policy.sum(1).chunk(2), *reference.sum(1).chunk(2))
    theirs = trl_loss(setup, loss_types=["sigmoid"], ld_alpha=alpha)
    assert_parity(our_loss(setup, logps=logps), theirs)
    assert abs(our_loss(setup) - theirs) > 1e-3  # the transform matters on this batch


def test_sigmoid_label_smoothing_is_a_documented_difference(setup):
    """TRL 1.16's `sigmoid` ignores label_smoothing; ours applies cDPO. With ε = 0 they agree."""
    theirs = trl_loss(setup, loss_types=["sigmoid"], label_smoothing=0.2)
    assert_parity(our_loss(setup, label_smoothing=0.0), theirs)
    assert abs(our_loss(setup, label_smoothing=0.2) - theirs) > 1e-3


def test_reward_metrics(setup):
    """chosen/rejected rewards are TRL's `rewards/chosen`, `rewards/rejected` (means over the batch), also for ipo."""
    trainer = setup["trainer"]
    mode = "train" if trainer.model.training else "eval"
    trainer._metrics[mode].clear()
    trl_loss(setup, loss_types=["ipo"])
    _, chosen, rejected = dpo_loss(*setup["logps"], loss_type="ipo", beta=BETA, chosen_lengths=setup["lengths"][0],
                                   rejected_lengths=setup["lengths"][1])
    assert_parity(chosen.mean().item(), trainer._metrics[mode]["rewards/chosen"][-1])
    assert_parity(rejected.mean().item(), trainer._metrics[mode]["rewards/rejected"][-1])
    assert_parity((chosen - rejected).mean().item(), trainer._metrics[mode]["rewards/margins"][-1])


def test_orpo_odds_ratio_term_matches_trl_orpo_trainer(setup):
    """Our orpo minus its NLL is TRL's ORPOTrainer odds-ratio term -beta·log σ(log odds) on mean log-probs."""
    orpo_trainer = pytest.importorskip("trl.experimental.orpo").ORPOTrainer
    policy_chosen, policy_rejected, _, _ = setup["logps"]
    chosen_lengths, rejected_lengths = setup["lengths"]
    stub = types.SimpleNamespace(beta=BETA, accelerator=types.SimpleNamespace(device="cpu"))
    chosen_mean, rejected_mean = policy_chosen / chosen_lengths, policy_rejected / rejected_lengths
    trl_terms = orpo_trainer.odds_ratio_loss(stub, chosen_mean, rejected_mean)[0]
    losses, _, _ = dpo_loss(*setup["logps"], loss_type="orpo", beta=BETA, chosen_lengths=chosen_lengths,
                            rejected_lengths=rejected_lengths, nll_loss=setup["nll_loss"])
    torch.testing.assert_close(losses - setup["nll_loss"], -trl_terms, rtol=1e-5, atol=1e-5)


def test_simpo_matches_trl_cpo_trainer(setup):
    """Our simpo is TRL's CPOTrainer loss_type='simpo' (no label smoothing, alpha 0) on mean log-probs."""
    cpo_trainer = pytest.importorskip("trl.experimental.cpo").CPOTrainer
    policy_chosen, policy_rejected, _, _ = setup["logps"]
    chosen_lengths, rejected_lengths = setup["lengths"]
    stub = types.SimpleNamespace(beta=2.0, simpo_gamma=0.8, loss_type="simpo", label_smoothing=0.0, alpha=0.0,
                                 accelerator=types.SimpleNamespace(device="cpu"))
    trl_losses = cpo_trainer.cpo_loss(stub, policy_chosen / chosen_lengths, policy_rejected / rejected_lengths)[0]
    losses, _, _ = dpo_loss(*setup["logps"], loss_type="simpo", beta=2.0, simpo_gamma=0.8,
                            chosen_lengths=chosen_lengths, rejected_lengths=rejected_lengths)
    torch.testing.assert_close(losses, trl_losses, rtol=1e-5, atol=1e-5)

"""Model families whose forward does more than `lm_head(hidden)`, and mixture-of-experts models.

(A) `completion_logps` runs the decoder and projects only completion positions itself, so it must turn hidden states
into logits exactly as each family's own `forward` does (scale, divide, soft-cap, ...). For every causal-LM family of
the installed transformers with such a step (found by reading each ForCausalLM.forward between the decoder and the
loss), a tiny random model with a non-trivial factor: per-token log-probs equal log_softmax(model(...).logits)
gathered at the labels (`completion_logps_naive`) within 1e-5 in fp32. A plain Llama is the control.

(B) MoE: TRL 1.16 adds router_aux_loss_coef * aux_loss of the policy forward to the DPO loss; `dpo_step` must too.
"""
import pytest
import torch
import transformers

import dpo
from harness.errors import OptionError, RunError
from harness import models

BASE = dict(vocab_size=48, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=8, max_position_embeddings=64, initializer_range=0.2)
CAP = dict(final_logit_softcapping=5.0)  # 5, not Gemma's 30: with initializer_range 0.2 the cap must bite
FAMILIES = [  # (model_type, config class, model class, the factor and what the tiny config needs)
    ("llama", "LlamaConfig", "LlamaForCausalLM", {}),  # control: lm_head alone
    ("granite", "GraniteConfig", "GraniteForCausalLM", dict(logits_scaling=8.0)),  # logits / logits_scaling
    ("granite_swa", "GraniteSWAConfig", "GraniteSWAForCausalLM", dict(logits_scaling=8.0)),
    ("granitemoe", "GraniteMoeConfig", "GraniteMoeForCausalLM", dict(logits_scaling=8.0)),
    ("granitemoe_swa", "GraniteMoeSWAConfig", "GraniteMoeSWAForCausalLM", dict(logits_scaling=8.0)),
    ("granitemoehybrid", "GraniteMoeHybridConfig", "GraniteMoeHybridForCausalLM",
     dict(logits_scaling=8.0, mamba_n_heads=4, layer_types=["attention", "mamba"])),
    ("granitemoeshared", "GraniteMoeSharedConfig", "GraniteMoeSharedForCausalLM", dict(logits_scaling=8.0)),
    ("hyperclovax", "HyperCLOVAXConfig", "HyperCLOVAXForCausalLM", dict(logits_scaling=8.0)),  # logits * logits_scaling
    ("cohere", "CohereConfig", "CohereForCausalLM", dict(logit_scale=0.25)),  # logits * logit_scale
    ("cohere2", "Cohere2Config", "Cohere2ForCausalLM", dict(logit_scale=0.25)),
    ("cohere2_moe", "Cohere2MoeConfig", "Cohere2MoeForCausalLM", dict(logit_scale=0.25)),
    ("cohere_compass_text", "CohereCompassTextConfig", "CohereCompassForCausalLM",
     dict(logit_scale=0.25, rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 10000.0}})),
    ("falcon_h1", "FalconH1Config", "FalconH1ForCausalLM",  # logits * lm_head_multiplier
     dict(lm_head_multiplier=0.3, mamba_n_heads=4, mamba_d_head=8, mamba_d_ssm=32, mamba_d_state=16,
          mamba_chunk_size=16)),  # tiny Mamba too: the default sizes need 34 GB on transformers 5.0's CPU path
    ("minicpm3", "MiniCPM3Config", "MiniCPM3ForCausalLM",  # hidden / (hidden_size / dim_model_base) = hidden / 8
     dict(dim_model_base=4, num_key_value_heads=4, q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8,
          qk_rope_head_dim=8, v_head_dim=8)),
    ("inkling_text", "InklingTextConfig", "InklingForCausalLM",  # hidden / multiplier, then drop the padded vocab
     dict(logits_mup_width_multiplier=4.0, unpadded_vocab_size=40)),
    ("gemma2", "Gemma2Config", "Gemma2ForCausalLM", CAP),  # cap * tanh(logits / cap)
    ("gemma3_text", "Gemma3TextConfig", "Gemma3ForCausalLM", CAP),
    ("gemma3n_text", "Gemma3nTextConfig", "Gemma3nForCausalLM", dict(CAP, num_kv_shared_layers=0)),
    ("gemma4_text", "Gemma4TextConfig", "Gemma4ForCausalLM", CAP),
    ("gemma4_unified_text", "Gemma4UnifiedTextConfig", "Gemma4UnifiedForCausalLM", CAP),
    ("vaultgemma", "VaultGemmaConfig", "VaultGemmaForCausalLM", CAP),
    ("nanochat", "NanoChatConfig", "NanoChatForCausalLM", CAP),
    ("beam", "BeamConfig", "BeamForCausalLM", CAP),
    ("inkling2_text", "Inkling2TextConfig", "Inkling2ForCausalLM", CAP),
    ("inkling2_loop_text", "Inkling2LoopTextConfig", "Inkling2LoopForCausalLM", CAP),
    ("recurrent_gemma", "RecurrentGemmaConfig", "RecurrentGemmaForCausalLM", dict(logits_soft_cap=5.0)),
    ("xlstm", "xLSTMConfig", "xLSTMForCausalLM", dict(output_logit_soft_cap=5.0)),
    ("dory", "DoryConfig", "DoryForCausalLM", {}),  # a learned per-token scale inside its LM head module
]


def build(config_name, model_name, extra, seed=0):
    config_class, model_class = getattr(transformers, config_name, None), getattr(transformers, model_name, None)
    if config_class is None or model_class is None:
        pytest.skip(f"{config_name} is not in this transformers")
    torch.manual_seed(seed)
    return model_class(config_class(**{**BASE, **extra})).eval()


def make_batch(rows=4, length=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, 40, (rows, length), generator=g)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, :3] = 0  # one left-padded row
    completion_mask = torch.zeros_like(input_ids)
    completion_mask[:, 6:] = 1
    return dict(input_ids=input_ids, attention_mask=attention_mask, completion_mask=completion_mask)


@pytest.mark.parametrize("model_type, config_name, model_name, extra", FAMILIES, ids=[f[0] for f in FAMILIES])
def test_logps_equal_the_models_own_forward(model_type, config_name, model_name, extra):
    model, batch = build(config_name, model_name, extra), make_batch()
    assert model.config.model_type == model_type
    with torch.no_grad():
        ours, _ = dpo.completion_logps(model, batch, chunk_tokens=7)  # several chunks
        theirs = dpo.completion_logps_naive(model, batch)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)
    models.check_head(model)  # and the load-time check accepts it


@pytest.mark.parametrize("family", ["granite", "cohere", "gemma2", "minicpm3"])
def test_gradients_equal_the_models_own_forward(family):
    _, config_name, model_name, extra = next(f for f in FAMILIES if f[0] == family)
    model, batch = build(config_name, model_name, extra), make_batch()
    grads = []
    for fn in (lambda: dpo.completion_logps(model, batch, chunk_tokens=7)[0], lambda: dpo.completion_logps_naive(model, batch)):
        model.zero_grad()
        (fn() * torch.linspace(-1, 1, 11)).sum().backward()  # a non-uniform weight per position
        grads.append({k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for k in grads[0]:
        torch.testing.assert_close(grads[0][k], grads[1][k], rtol=1e-4, atol=1e-6, msg=k)


def test_peft_wrapped_scaled_model():
    import peft  # a runtime requirement: an import error must fail, not skip
    _, config_name, model_name, extra = FAMILIES[1]  # granite
    model = peft.get_peft_model(build(config_name, model_name, extra),
                                peft.LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    batch = make_batch()
    with torch.no_grad():
        torch.testing.assert_close(dpo.completion_logps(model, batch)[0], dpo.completion_logps_naive(model, batch),
                                   rtol=0, atol=1e-5)


def test_unknown_head_is_refused():
    """A forward that rescales logits in a way logits_from_hidden does not know: refused at load, with the fix."""
    class TripledLlama(transformers.LlamaForCausalLM):
        def forward(self, *args, **kwargs):
            out = super().forward(*args, **kwargs)
            out.logits = out.logits * 3
            return out

    torch.manual_seed(0)
    model = TripledLlama(transformers.LlamaConfig(**BASE)).eval()
    with pytest.raises(RunError, match=r"llama \(TripledLlama\).*logits_from_hidden"):
        models.check_head(model)


# ---- (B) mixture of experts ----------------------------------------------------------------------------------

MOE = [("mixtral", "MixtralConfig", "MixtralForCausalLM", dict(num_local_experts=4, num_experts_per_tok=2)),
       ("qwen2_moe", "Qwen2MoeConfig", "Qwen2MoeForCausalLM",
        dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=32))]
ROWS = [{"prompt": "the sky is", "chosen": " blue", "rejected": " green red"},
        {"prompt": "a cat sat on", "chosen": " a mat yes", "rejected": " a dog"},
        {"prompt": "the dog", "chosen": " sat", "rejected": " sat on a red mat no"}]


def trl_trainer(tmp_path, config_name, model_name, extra):
    pytest.importorskip("trl")
    from datasets import Dataset
    from tokenizers import Tokenizer, models, pre_tokenizers
    from trl import DPOConfig, DPOTrainer

    words = "the sky is blue green red a cat dog sat on mat yes no".split()
    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(words)}}
    tokenizer_model = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer_model.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer_model, pad_token="<pad>",
                                                     eos_token="<eos>", unk_token="<unk>")
    args = DPOConfig(output_dir=str(tmp_path), bf16=False, report_to="none", gradient_checkpointing=False,
                     per_device_train_batch_size=len(ROWS), beta=0.5)
    policy, reference = (build(config_name, model_name, extra, seed=s).train() for s in (0, 1))
    trainer = DPOTrainer(model=policy, ref_model=reference, args=args, train_dataset=Dataset.from_list(ROWS),
                         processing_class=tokenizer)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(ROWS))])
    return trainer, batch


@pytest.mark.trl
@pytest.mark.parametrize("model_type, config_name, model_name, extra", MOE, ids=[m[0] for m in MOE])
@pytest.mark.parametrize("coef", [None, 0.5, 0.0])  # None: the config's own (0.001), as TRL
def test_moe_loss_equals_trl(tmp_path, model_type, config_name, model_name, extra, coef):
    trainer, batch = trl_trainer(tmp_path, config_name, model_name, {**extra, "vocab_size": 17})
    assert trainer.aux_loss_enabled and trainer.router_aux_loss_coef == trainer.model.config.router_aux_loss_coef
    if coef is not None:  # what DPOConfig(router_aux_loss_coef=coef) sets at init
        trainer.router_aux_loss_coef, trainer.aux_loss_enabled = coef, coef != 0.0
    with torch.no_grad():
        theirs = trainer.compute_loss(trainer.model, batch).item()
        cfg = dpo.Config(beta=0.5, router_aux_loss_coef=coef)
        ours, metrics = dpo.dpo_step(cfg, trainer.model, trainer.ref_model, {k: batch[k] for k in
                                                                             ("input_ids", "attention_mask", "completion_mask")})
    assert ours.item() == pytest.approx(theirs, rel=1e-5, abs=1e-5)
    if coef != 0.0:
        assert metrics["aux_loss"].item() == pytest.approx(trainer._metrics["train"]["aux_loss"][-1], rel=1e-5)
        assert metrics["aux_loss"].item() > 1  # ~ top_k for a balanced router: the term is really there
    else:
        assert "aux_loss" not in metrics


def test_router_gets_a_balancing_gradient():
    _, config_name, model_name, extra = MOE[0]
    model, batch = build(config_name, model_name, extra).train(), make_batch()
    gate = dict(model.named_parameters())["model.layers.0.mlp.gate.weight"]
    _, stats = dpo.completion_logps(model, batch, with_aux=True)
    stats["aux_loss"].backward()  # the aux loss alone
    assert gate.grad is not None and gate.grad.abs().sum() > 0
    grads = []
    for coef in (0.0, 1.0):  # and through dpo_step: the coefficient changes the gate's gradient
        model.zero_grad()
        ref = build(config_name, model_name, extra, seed=1)
        dpo.dpo_step(dpo.Config(router_aux_loss_coef=coef), model, ref, batch)[0].backward()
        grads.append(gate.grad.clone())
    assert (grads[1] - grads[0]).abs().max() > 1e-6


def test_router_aux_loss_coef_on_a_dense_model_is_refused():
    model = build("LlamaConfig", "LlamaForCausalLM", {})
    assert models.aux_loss_coef(dpo.Config(), model) == 0.0  # unset: nothing to add
    with pytest.raises(OptionError, match="not a mixture-of-experts model"):
        models.aux_loss_coef(dpo.Config(router_aux_loss_coef=0.01), model)

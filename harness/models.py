"""What model families do differently around the decoder, reproduced so that dpo.py's log-probs are the model's own:
the step between the last hidden states and the logits (scales and soft-caps), the check that refuses a model whose
head this file does not know, and the mixture-of-experts load-balancing loss. dpo.py calls it; a reader of the
algorithm can skip it: for most models `logits_from_hidden` is just the LM head.
"""
import contextlib
import logging
import sys
import warnings

import torch

from harness.errors import OptionError, RunError


def logits_from_hidden(model, hidden):
    """Decoder hidden states [N, H] -> fp32 logits [N, V] exactly as the model's own forward makes them: the LM head, plus
    each family's step (transformers 5.24, all in tests/test_model_families.py). check_head refuses any other model."""
    c = model.config.get_text_config()  # PEFT forwards config and get_output_embeddings to the base model
    if c.model_type in ("minicpm3", "inkling_text"):  # these scale the hidden states down, not the logits
        hidden = hidden / (c.logits_scaling if c.model_type == "minicpm3" else c.logits_mup_width_multiplier)
    logits = model.get_output_embeddings()(hidden).float()
    if c.model_type.startswith("granite"):  # muP: Granite divides by logits_scaling ...
        logits = logits / c.logits_scaling
    elif c.model_type == "hyperclovax":  # ... HyperCLOVA X multiplies by an option of the same name
        logits = logits * c.logits_scaling
    elif c.model_type.startswith("cohere") and c.logit_scale is not None:
        logits = logits * c.logit_scale
    elif c.model_type == "falcon_h1":
        logits = logits * c.lm_head_multiplier
    elif c.model_type == "inkling_text" and c.unpadded_vocab_size:  # the head's padding rows are not tokens
        logits = logits[:, :c.unpadded_vocab_size]
    cap = getattr(c, "final_logit_softcapping", None) or getattr(c, "logits_soft_cap", None) or getattr(c, "output_logit_soft_cap", None)
    if cap:  # Gemma-2 style soft-capping
        logits = cap * torch.tanh(logits / cap)
    return logits


@torch.no_grad()
def check_head(model):
    """Refuse, in one line before training, a model dpo.py cannot train: one whose get_decoder() is not its
    decoder (transformers' Llama4ForCausalLM and MllamaForCausalLM return the whole model,
    ModernBertDecoderForCausalLM its LM head), whose decoder fails on the call dpo.completion_logps makes,
    or whose own forward makes other logits than logits_from_hidden (a family or remote code this file does
    not know): its log-probs would be silently wrong. Costs one 8-token forward at the start of a run."""
    c = model.config.get_text_config()
    ids, was_training = torch.arange(8, device=model.device)[None] % c.vocab_size, model.training
    mask = torch.ones_like(ids)  # (without one, a model whose pad id is among the 8 warns about padding)
    name = f"{c.model_type} ({type(model).__name__})"
    model.eval()  # no dropout: both passes must see the same net
    try:
        theirs = refuse_on_failure(name, "its own forward fails on 8 tokens", lambda: model(
            input_ids=ids, attention_mask=mask, use_cache=False).logits[0].float())
        decoder = refuse_on_failure(name, "its get_decoder() fails", model.get_decoder)
        if decoder is model or not isinstance(decoder, torch.nn.Module):
            returned = "the whole model" if decoder is model else repr(decoder)
            raise RunError(f"{name}: its get_decoder() returns {returned}, not the decoder whose hidden "
                           "states dpo.py turns into log-probs; dpo.py cannot train it: use another model "
                           "(or TRL's DPOTrainer)")
        ours = refuse_on_failure(
            name, "its decoder fails on the call dpo.py makes (get_decoder()(input_ids, attention_mask, "
            "use_cache=False), then the LM head)", lambda: logits_from_hidden(
                model, decoder(input_ids=ids, attention_mask=mask, use_cache=False)[0][0]))
    finally:
        model.train(was_training)
    if ours.shape != theirs.shape or (ours - theirs).abs().max() > 0.02 * theirs.abs().max() + 1e-4:  # bf16
        raise RunError(f"{name} makes its logits in a way dpo.py does not reproduce; add its step to "
                       "harness/models.py's logits_from_hidden (and tests/test_model_families.py)")


def refuse_on_failure(name, what, compute):
    """compute(), with an error of the model's own code turned into a one-line refusal (a model that fails
    here would fail at the first step, with a traceback). Running out of GPU memory is not the model's."""
    try:
        return compute()
    except torch.cuda.OutOfMemoryError:
        raise
    except Exception as err:
        detail = " ".join(f"{type(err).__name__}: {err}".split())[:160]
        raise RunError(f"{name}: {what} ({detail}); dpo.py cannot train it: use another model (or TRL's "
                       "DPOTrainer)") from None


def router_aux_loss(model, router_logits, attention_mask):
    """MoE load-balancing loss (Switch Transformer, arXiv:2101.03961, Eq. 4) exactly as the model's forward computes
    it: its family's load_balancing_loss_func with its expert counts; padding (attention_mask 0) is not counted."""
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model  # PEFT: the wrapped ForCausalLM
    balance = getattr(sys.modules[type(lm).__module__], "load_balancing_loss_func", None)  # e.g. modeling_mixtral's
    if balance is None or not hasattr(lm, "num_experts") or lm.config.model_type == "doge":  # doge's takes other arguments
        raise RunError(f"{lm.config.model_type}: dpo.py cannot compute its load-balancing loss as "
                            "the model does; train without it: --router_aux_loss_coef 0")
    return balance(router_logits, lm.num_experts, lm.num_experts_per_tok, attention_mask)


def aux_loss_coef(cfg, model):
    """TRL's rule: a model is MoE when its config has output_router_logits; unset takes its router_aux_loss_coef."""
    c = model.config.get_text_config()
    if cfg.router_aux_loss_coef and not hasattr(c, "output_router_logits"):
        raise OptionError(f"--router_aux_loss_coef: {c.model_type} is not a mixture-of-experts model; drop the option")
    coef = getattr(c, "router_aux_loss_coef", 0.0) if cfg.router_aux_loss_coef is None else cfg.router_aux_loss_coef
    return coef if hasattr(c, "output_router_logits") else 0.0


@contextlib.contextmanager
def quiet_library_notices():
    """Two notices that loading a model printed on every LoRA run, about the libraries and not the run:
    bitsandbytes (imported by peft) found no optional CPU kernel from the `kernels` package and uses its own, and peft
    asks transformers for a renamed attribute (a FutureWarning). Only these two; anything else is still shown."""
    # (and under HF_HUB_OFFLINE=1 the `kernels` package's "Skipping publisher trust check", logged as bitsandbytes
    # looks for that kernel)
    loggers = [logging.getLogger(name) for name in ("bitsandbytes.backends.cpu.ops", "kernels._internals.hf_hub")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
            yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def disable_dropout(model):
    """Every dropout to 0: the nn.Dropout modules and the float rates that attention layers pass to SDPA themselves
    (Llama's, Qwen's `attention_dropout`), so that the policy and the reference are the same network."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        for name in ("attention_dropout", "attn_dropout", "dropout"):
            if isinstance(getattr(module, name, None), float):
                setattr(module, name, 0.0)


def prepare_4bit(model, compute_dtype, gradient_checkpointing: bool):
    """peft's k-bit preparation for QLoRA, then two corrections. peft upcasts every non-4-bit weight to fp32 (the
    paper's stability advice for norms); the embedding and the LM head are frozen and large (1B parameters on
    Llama-3-8B), so they go back to the compute dtype. bitsandbytes on a CPU repacks 4-bit weights at the first
    eval-mode forward for a kernel with no backward: later gradients would be wrong, so that is turned off."""
    from peft import prepare_model_for_kbit_training

    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing,
                                            gradient_checkpointing_kwargs={"use_reentrant": False})
    for module in (model.get_input_embeddings(), model.get_output_embeddings()):
        module.to(compute_dtype)
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    return model


def load_error(name, err) -> RunError:
    """from_pretrained failed: no weights, unreadable weights, or an architecture transformers lacks."""
    return RunError(f"could not load the model {name} ({str(err).splitlines()[0]}); check that the folder holds a "
                    "causal language model saved with save_pretrained")


def count_trainable(model) -> str:
    from harness.checks import count_parameters

    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return f"trainable parameters: {n_train:,} of {count_parameters(model):,}"

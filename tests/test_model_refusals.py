"""Every model dpo.py cannot train is refused before training, in one line (harness/models.check_head, run at
load): a model whose get_decoder() is not its decoder (transformers' Llama-4 and Mllama text models return the
whole model, ModernBERT-decoder its LM head), one whose decoder or own forward fails on the call dpo.py makes.
Each one would otherwise stop at the first step with a traceback, or score the wrong tensor."""
import pytest
import torch
import transformers

import dpo
from harness import models, options
from harness.errors import RunError
from tiny import make_preference_dir, make_tokenizer

SMALL = dict(vocab_size=48, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=8, max_position_embeddings=64)


def llama4():
    config = transformers.Llama4TextConfig(**SMALL, intermediate_size_mlp=64, num_local_experts=2)
    return transformers.Llama4ForCausalLM(config)


def mllama():
    config = transformers.MllamaTextConfig(**{k: v for k, v in SMALL.items() if k != "head_dim"},
                                           cross_attention_layers=[1], pad_token_id=0)
    return transformers.MllamaForCausalLM(config)


def modernbert_decoder():
    config = transformers.ModernBertDecoderConfig(**{k: v for k, v in SMALL.items() if k not in (
        "num_key_value_heads", "head_dim")}, pad_token_id=0, bos_token_id=2, eos_token_id=3, cls_token_id=2,
        sep_token_id=3)
    return transformers.ModernBertDecoderForCausalLM(config)


class NeedsImages(transformers.LlamaForCausalLM):
    """A model whose own forward fails on text alone (as a vision-language model's may)."""

    def forward(self, *args, **kwargs):
        raise ValueError("pixel_values must be given")


def needs_images():
    return NeedsImages(transformers.LlamaConfig(**SMALL))


@pytest.mark.parametrize("build, message", [
    (llama4, r"^llama4_text \(Llama4ForCausalLM\): its get_decoder\(\) returns the whole model, not the "
             r"decoder"),
    (mllama, r"^mllama_text_model \(MllamaForCausalLM\): its get_decoder\(\) returns the whole model"),
    (modernbert_decoder, r"^modernbert-decoder \(ModernBertDecoderForCausalLM\): its decoder fails on the "
                         r"call dpo.py makes .*\(TypeError: Linear.forward\(\) got an unexpected keyword "
                         r"argument"),
    (needs_images, r"^llama \(NeedsImages\): its own forward fails on 8 tokens \(ValueError: "
                   r"pixel_values must"),
], ids=["llama4", "mllama", "modernbert-decoder", "forward-fails"])
def test_a_model_dpo_cannot_train_is_refused_in_one_line(build, message):
    torch.manual_seed(0)
    model = build().train()
    with pytest.raises(RunError, match=message) as err:
        models.check_head(model)
    text = str(err.value)
    assert "\n" not in text and text.endswith("use another model (or TRL's DPOTrainer)")  # (no period)
    assert model.training  # left as it was found


def test_llama4_is_refused_by_dpo_py_before_training(tmp_path, capsys):
    """Through the command line: exit status 1, one `dpo.py: error:` line, nothing trained or written."""
    torch.manual_seed(0)
    tokenizer = make_tokenizer()
    model = llama4()
    model.config.vocab_size = len(tokenizer)
    model.resize_token_embeddings(len(tokenizer))
    model.save_pretrained(tmp_path / "llama4")
    tokenizer.save_pretrained(tmp_path / "llama4")
    out = tmp_path / "out"
    argv = ["--model", str(tmp_path / "llama4"), "--dataset", make_preference_dir(tmp_path / "data"),
            "--output_dir", str(out), "--max_length", "32", "--show_examples", "0", "--use_peft", "False"]
    with pytest.raises(SystemExit) as exit_:
        options.cli(argv, dpo.main)
    assert exit_.value.code == 1
    err = capsys.readouterr().err  # (progress bars of the data loading go there too)
    (line,) = [line for line in err.splitlines() if line.startswith("dpo.py:")]
    assert line.startswith("dpo.py: error: llama4_text (Llama4ForCausalLM): its get_decoder() returns the")
    assert "Traceback" not in err
    assert not (out / "metrics.jsonl").exists() and not list(out.glob("checkpoint-*"))

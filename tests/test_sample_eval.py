"""--sample_eval at the end of a run: it finishes on a QLoRA model in bf16 (generation and scoring under the
run's autocast), and its memory stays bounded on a large vocabulary (demo/sample_eval.py; tests/test_assets.py
checks what it computes)."""
import json
import math
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import LlamaConfig, LlamaForCausalLM

import dpo
from demo.sample_eval import generate, sequence_logps
from tiny import make_tokenizer, run_config


def test_qlora_bf16_run_with_sample_eval_finishes(tiny, tmp_path):
    """The GPU default (bf16) with QLoRA: peft keeps the norms in fp32 and the LM head is bf16, so outside
    autocast generation failed with `expected m1 and m2 to have the same dtype`. Tested through CPU bf16 and
    bitsandbytes' CPU NF4. The policy's samples get finite log-probs under both models, and a LoRA policy
    after 2 steps is close to its base: the KL estimate is small."""
    cfg = run_config(tiny, tmp_path, "--load_in_4bit", "--bf16", "True", "--max_steps", "2",
                     "--sample_eval", "4")
    dpo.main(cfg)
    result = json.loads((tmp_path / "sample_eval.json").read_text())
    assert len(result["samples"]) == 4
    for s in result["samples"]:
        assert math.isfinite(s["policy_logp"]) and math.isfinite(s["reference_logp"])
        assert s["policy_tokens"] >= 1
    assert abs(result["kl"]) < 1.0


class PeakMemory(TorchDispatchMode):
    """The peak of the bytes held by tensors that torch operations create while it is on (the model's weights,
    made before, are not counted), and the largest single one. A storage is counted once, however many views
    share it, until the last tensor on it is freed."""

    def __init__(self):
        super().__init__()
        self.size, self.users, self.now, self.peak, self.largest = {}, {}, 0, 0, 0

    def _release(self, key):
        self.users[key] -= 1
        if self.users[key] == 0:
            self.now -= self.size.pop(key)
            del self.users[key]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                key = storage.data_ptr()
                if key not in self.users:
                    self.size[key], self.users[key] = storage.nbytes(), 0
                    self.now += storage.nbytes()
                    self.peak, self.largest = max(self.peak, self.now), max(self.largest, storage.nbytes())
                self.users[key] += 1
                weakref.finalize(t, self._release, key)
        return out


B, PROMPT, NEW, CHUNK = 32, 100, 32, 256  # rows, prompt tokens, sampled tokens, dpo.completion_logps' chunk


def peaks(vocab_size, chunk_tokens=CHUNK, lora=False):
    """Peak bytes of generating B completions, then of scoring them, with a tiny Llama of this vocabulary
    (with lora: wrapped by peft, as dpo.py's policy is; its generate goes through the wrapper)."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         bos_token_id=2, eos_token_id=3, pad_token_id=0)
    model = LlamaForCausalLM(config).eval()
    if lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear")).eval()
    rows = torch.randint(4, 26, (B, PROMPT), generator=torch.Generator().manual_seed(1)).tolist()
    with PeakMemory() as generation:
        completions = generate(model, make_tokenizer(), rows, max_new_tokens=NEW, seed=0)
    with PeakMemory() as scoring:
        sequence_logps(model, rows, completions, pad_id=0,
                       score=lambda m, batch: dpo.completion_logps(m, batch, chunk_tokens=chunk_tokens)[0])
    return generation.peak, scoring.peak, sum(map(len, completions))


def test_memory_grows_like_a_chunk_times_the_vocabulary_not_the_batch():
    """From a 1k to a 32k vocabulary, the peak of generation and of scoring grows by at most two [256, V] fp32
    tensors (65 MB), where full logits of the batch, B x T x V in fp32, would add 553 MB (and 17.6 GB for 32
    rows of a 1,024-token prompt and 48 samples with Llama-3's 128,256 tokens). Generation keeps the last
    position's logits; scoring projects completion tokens only, 256 at a time. Scoring all completion tokens
    in one chunk is measured too, to show that the measure sees the difference."""
    small, large = 1024, 32768
    bound = 2 * CHUNK * (large - small) * 4
    (gen_small, score_small, _), (gen_large, score_large, scored) = peaks(small), peaks(large)
    assert scored > 3 * CHUNK  # enough completion tokens for several chunks
    full_logits = B * (PROMPT + NEW) * (large - small) * 4
    assert bound * 8 < full_logits
    assert gen_large - gen_small < bound, (gen_small, gen_large)
    assert score_large - score_small < bound, (score_small, score_large)
    gen_lora, score_lora, _ = peaks(large, lora=True)
    assert gen_lora - gen_small < bound and score_lora - score_small < bound, (gen_lora, score_lora)
    unchunked = peaks(large, chunk_tokens=4096)[1] - score_small  # every completion token's logits at once
    assert unchunked > bound, unchunked

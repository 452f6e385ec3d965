"""Every causal-LM class of the installed transformers, built tiny from a generic config, through prefix
sharing's decision: the rules (structural_problem), the numeric check on a narrow fp32 copy (numeric_problem),
and the model itself compared both ways (layout_differences). The line to look for is KEPT with the model
itself differing: there should be none. docs/prefix_sharing.md reports a run.

    python bench/prefix_sharing_sweep.py              # all 200 (2 hours on one loaded CPU thread)
    python bench/prefix_sharing_sweep.py llama mpt    # some model types

A class that does not build from the generic config, or fails on the concatenated rows too, is listed as
such: that is the sweep's limit, not a verdict.
"""
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GENERIC = dict(head_dim=8, initializer_range=0.02, rotary_dim=4, q_lora_rank=16, kv_lora_rank=16,
               qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, n_routed_experts=4,
               num_experts_per_tok=2, n_group=1, topk_group=1, moe_intermediate_size=16,
               first_k_dense_replace=1, embedding_size=32)
MLA = dict(num_key_value_heads=4)  # multi-head latent attention: as many key/value heads as query heads
OWN = {"deepseek_v2": MLA, "deepseek_v3": MLA, "glm4_moe_lite": MLA, "longcat_flash": MLA, "minicpm3": MLA,
       "sarvam_mla": MLA, "youtu": MLA, "axk1": MLA,
       "lfm2": dict(full_attn_idxs=[1]),  # a conv layer, then attention
       "falcon": dict(head_dim=None),  # None: not set
       "gpt_neo": dict(attention_types=[[["global", "local"], 1]])}


def one(model_type):
    import logging
    import warnings

    import torch
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
    import dpo
    import test_prefix_sharing as t
    from speedups import prefix_sharing

    name = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type]
    name = name[0] if isinstance(name, tuple) else name
    try:
        settings = {k: v for k, v in {**GENERIC, **OWN.get(model_type, {})}.items() if v is not None}
        model = t.family(CONFIG_MAPPING_NAMES[model_type], name, settings)
        assert model.config.get_text_config().vocab_size == t.V, "a vocabulary of its own"
    except BaseException as err:  # noqa: BLE001
        return f"{model_type:28s} does not build here ({type(err).__name__})"
    rules = prefix_sharing.structural_problem(t.OPTIONS, model, t.LONGEST)
    numeric = prefix_sharing.numeric_problem(model, t.batches(t.OPTIONS), dpo.completion_logps)
    concatenated = True
    try:
        own = max(max(prefix_sharing.layout_differences(model, batch, dpo.completion_logps).values())
                  for batch in t.batches(t.OPTIONS))
    except Exception:  # noqa: BLE001 - the model fails on the shared rows, or (a config it dislikes) on both
        own = float("inf")
        try:
            with torch.no_grad():
                dpo.completion_logps(model, prefix_sharing.concatenated(t.batches(t.OPTIONS)[0]))
        except Exception:  # noqa: BLE001
            concatenated = False
    if not concatenated:
        return f"{model_type:28s} fails on the concatenated rows too (the generic config does not suit it)"
    verdict = "KEPT" if not rules and not numeric else "refused"
    alarm = "  !!! the model itself differs" if verdict == "KEPT" and own > prefix_sharing.TOLERANCE else ""
    return (f"{model_type:28s} {verdict:8s} itself {own:.1e}{alarm} | rules: {rules or '-'} | "
            f"numbers: {(numeric or '-')[:100]}")


def main(model_types):
    """Children take the model types in turn, each with a time limit; one that kills its child (memory) is
    reported as crashed, and the next child goes on after it."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    todo = list(model_types or sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES))
    while todo:
        child = subprocess.Popen([sys.executable, __file__, "--some", *todo], text=True,
                                 stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                 env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
        for line in child.stdout:
            if line.split()[:1] and line.split()[0] in todo:  # (a library's own prints are not results)
                print(line.rstrip(), flush=True)
                todo.remove(line.split()[0])
        if child.wait() and todo:
            print(f"{todo.pop(0):28s} crashed", flush=True)


def some(model_types):
    import signal

    def too_long(*_):
        raise TimeoutError

    signal.signal(signal.SIGALRM, too_long)
    for model_type in model_types:
        signal.alarm(120)
        try:
            line = one(model_type)
        except TimeoutError:
            line = f"{model_type:28s} timed out"
        signal.alarm(0)
        print(line, flush=True)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--some"]:
        some(sys.argv[2:])
    else:
        main(sys.argv[1:])

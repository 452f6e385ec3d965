"""Before/after evaluation by sampling: does the trained policy write better completions than the reference?

Preference accuracy on held-out pairs says the policy *ranks* two given completions correctly. This module
asks what the DPO paper's controlled-sentiment experiment asks ("Direct Preference Optimization: Your
Language Model is Secretly a Reward Model", Rafailov et al., 2023, arXiv:2305.18290, section 6.1, figure 2):
sample from the policy and from the reference, then report

- the mean ground-truth reward of the samples of each model (only when a `reward_fn` is given),
- the win rate of the policy over the reference: sample k of prompt i from the policy against sample k of
  prompt i from the reference, 1 for a higher reward, 1/2 for a tie, 0 for a lower reward, averaged,
- a sequence-level estimate of the KL divergence the DPO objective pays for (eq. 3 of the paper):

      KL(pi || pi_ref) = E_{y ~ pi(.|x)} [ log pi(y|x) - log pi_ref(y|x) ]
                      ~= mean over policy samples of  sum over completion tokens of
                         ( log pi(y_t | x, y_<t) - log pi_ref(y_t | x, y_<t) )

  Both log-probabilities come from a forward pass of each model over the policy's samples. The estimate is
  unbiased only for samples drawn from pi itself, so sampling is plain ancestral sampling (no top-k, no
  top-p) and the KL is exact in expectation at temperature 1 only.

Both models sample with the same seed, so identical models give identical samples (win rate 1/2, KL 0) and
different models are compared on common random numbers. The global RNG state is restored afterwards.

Memory stays bounded on a large vocabulary: generation computes the logits of the last position only
(transformers' `logits_to_keep=1`, with the KV cache), and scoring projects only completion positions through
the LM head, in chunks (the trainer's `completion_logps`); tests/test_sample_eval.py measures both against the
vocabulary size.
"""
import contextlib

import torch
from transformers import GenerationConfig


def _prompt_ids(tokenizer, prompt):
    """Token ids of one prompt, as the trainer tokenizes it: token ids as they are (what dpo.py passes:
    exactly the prompt it trained on), a string with the tokenizer's special tokens (BOS for Llama), or a list
    of chat messages through the chat template with the generation prompt."""
    if isinstance(prompt, list) and all(isinstance(t, int) for t in prompt):
        return list(prompt)
    if isinstance(prompt, str):
        return tokenizer(prompt)["input_ids"]
    rendered = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True,
                                             return_dict=True)
    return list(rendered["input_ids"])


def _eos_ids(model, tokenizer):
    eos = model.generation_config.eos_token_id if model.generation_config is not None else None
    eos = tokenizer.eos_token_id if eos is None else eos
    if eos is None:
        raise ValueError("sample_eval: neither the model's generation_config nor the tokenizer has an "
                         "eos_token_id; set one so that samples can stop")
    return [eos] if isinstance(eos, int) else list(eos)


@torch.no_grad()
def generate(model, tokenizer, prompt_ids, *, max_new_tokens=48, temperature=1.0, seed=0, batch_size=32):
    """Sample one completion for each row of `prompt_ids` (lists of token ids). Returns lists of completion
    token ids, cut after the first EOS (which is kept: the probability of stopping is part of log pi(y|x))."""
    if temperature <= 0:
        raise ValueError(f"sample_eval: temperature must be > 0 (got {temperature}); greedy decoding does "
                         "not sample the policy, and the KL estimate needs samples")
    eos_ids = _eos_ids(model, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_ids[0]
    # A fresh GenerationConfig, so a model's own defaults (top_k=50, repetition penalty, ...) cannot bend the
    # samples.
    config = GenerationConfig(do_sample=True, temperature=temperature, top_k=0, top_p=1.0,
                              max_new_tokens=max_new_tokens, eos_token_id=eos_ids, pad_token_id=pad_id)
    completions = []
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        for start in range(0, len(prompt_ids), batch_size):
            rows = prompt_ids[start:start + batch_size]
            width = max(len(r) for r in rows)
            # Left padding: every row's prompt ends at the same position, and generation appends after it.
            input_ids = torch.tensor([[pad_id] * (width - len(r)) + r for r in rows], device=model.device)
            attention_mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows],
                                          device=model.device)
            out = model.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=config)
            for new in out[:, width:].tolist():
                ends = [i for i, t in enumerate(new) if t in eos_ids]
                completions.append(new[:ends[0] + 1] if ends else new)
    return completions


@torch.no_grad()
def sequence_logps(model, prompt_ids, completion_ids, *, score, pad_id=0, batch_size=32):
    """log pi(y|x) = sum over completion tokens of log pi(y_t | x, y_<t), one forward pass per batch, scored
    by `score(model, batch) -> per-token log-probs [N, T-1]` (the trainer's own: dpo.completion_logps, passed
    in so that this module does not import dpo). Right padding: positions are 0..len-1 for every row, as in
    training."""
    logps = []
    for start in range(0, len(prompt_ids), batch_size):
        pairs = list(zip(prompt_ids[start:start + batch_size], completion_ids[start:start + batch_size]))
        width = max(len(p) + len(c) for p, c in pairs)
        rows = [(len(p), len(c), width - len(p) - len(c)) for p, c in pairs]  # prompt, completion, padding
        batch = {"input_ids": [p + c + [pad_id] * pad for (p, c), (_, _, pad) in zip(pairs, rows)],
                 "attention_mask": [[1] * (n_p + n_c) + [0] * pad for n_p, n_c, pad in rows],
                 "completion_mask": [[0] * n_p + [1] * n_c + [0] * pad for n_p, n_c, pad in rows]}
        batch = {k: torch.tensor(v, device=model.device) for k, v in batch.items()}
        logps += score(model, batch).sum(dim=1).tolist()
    return logps


def _sample_and_score(policy, reference, tokenizer, prompt_ids, score, pad_id, seed, batch_size, kwargs):
    """Samples of both models on common random numbers, and the policy's samples scored by both."""
    policy_ids = generate(policy, tokenizer, prompt_ids, seed=seed, **kwargs)
    policy_logps = sequence_logps(policy, prompt_ids, policy_ids, score=score, pad_id=pad_id,
                                  batch_size=batch_size)
    with policy.disable_adapter() if reference is None else contextlib.nullcontext():
        reference = policy if reference is None else reference  # (None: the policy with its adapters off)
        reference_ids = generate(reference, tokenizer, prompt_ids, seed=seed, **kwargs)
        reference_logps = sequence_logps(reference, prompt_ids, policy_ids, score=score, pad_id=pad_id,
                                         batch_size=batch_size)
    return policy_ids, reference_ids, policy_logps, reference_logps


def _show(prompt):
    return prompt if isinstance(prompt, str) else prompt[-1]["content"]


def sample_eval(policy, tokenizer, prompts, *, score, reference=None, reward_fn=None, num_samples=1,
                max_new_tokens=48, temperature=1.0, seed=0, show=3, batch_size=32,
                autocast=contextlib.nullcontext) -> dict:
    """Sample `num_samples` completions per prompt from `policy` and from `reference`, print `show` of them
    side by side and a summary, and return {"reward_reference", "reward_policy", "win_rate", "kl",
    "length_reference", "length_policy", "samples"}. The rewards and the win rate are None without
    `reward_fn`. Each sample is a dict with the prompt, both completions (decoded), their rewards, and the
    policy sample's token count and log-probabilities under the policy and the reference.

    prompts: strings (standard data), lists of chat messages (conversational data), or lists of token ids
        (used as they are: no template, no special tokens added).
    reference: a separate model, or None for the PEFT policy itself with its adapters disabled.
    reward_fn: text -> float, called on the decoded prompt + completion (for the shipped task:
        sentiment.sentiment_score, which scores the whole review).
    autocast: a context manager factory, the training run's autocast (dpo.py passes its bf16 one):
        generation and scoring run under it, as training did. Needed where the model mixes dtypes, as a QLoRA
        model does (fp32 norms, a bf16 LM head).
    """
    if reference is None and not hasattr(policy, "disable_adapter"):
        raise ValueError("sample_eval: reference=None means 'the policy with its adapters disabled', but the "
                         "policy is not a PEFT model; pass reference=<the reference model>")
    if not prompts:
        raise ValueError("sample_eval: prompts is empty; pass at least one prompt")
    rows = [p for p in prompts for _ in range(num_samples)]  # row i * num_samples + k is sample k of prompt i
    prompt_ids = [_prompt_ids(tokenizer, p) for p in rows]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else _eos_ids(policy, tokenizer)[0]
    kwargs = dict(max_new_tokens=max_new_tokens, temperature=temperature, batch_size=batch_size)
    models = {"policy": policy, "reference": reference}
    was_training = {name: m.training for name, m in models.items() if m is not None}
    for m in models.values():
        if m is not None:
            m.eval()
    try:
        with autocast():
            policy_ids, reference_ids, policy_logps, reference_logps = _sample_and_score(
                policy, reference, tokenizer, prompt_ids, score, pad_id, seed, batch_size, kwargs)
    finally:
        for name, training in was_training.items():
            models[name].train(training)

    samples = []
    for i, prompt in enumerate(rows):
        if isinstance(prompt, list) and all(isinstance(t, int) for t in prompt):  # token ids: store the text
            prompt = tokenizer.decode(prompt, skip_special_tokens=True)
        sample = {"prompt": prompt,
                  "policy": tokenizer.decode(policy_ids[i], skip_special_tokens=True),
                  "reference": tokenizer.decode(reference_ids[i], skip_special_tokens=True),
                  # the policy's sample: its length in tokens (EOS included) and its log-prob under each model
                  "policy_tokens": len(policy_ids[i]), "policy_logp": policy_logps[i],
                  "reference_logp": reference_logps[i]}
        if reward_fn is not None:
            # The reward reads the whole text, prompt included: a prompt ending in "not" changes what follows.
            for name, ids in (("policy", policy_ids[i]), ("reference", reference_ids[i])):
                text = tokenizer.decode(prompt_ids[i] + ids, skip_special_tokens=True)
                sample["reward_" + name] = float(reward_fn(text))
        samples.append(sample)
    setting = f"{len(prompts)} prompts x {num_samples} samples, temperature {temperature}, seed {seed}"
    return _summarize(samples, policy_ids, reference_ids, policy_logps, reference_logps,
                      rewarded=reward_fn is not None, setting=setting, show=show)


def _summarize(samples, policy_ids, reference_ids, policy_logps, reference_logps, rewarded, setting, show):
    """The means (KL, lengths, rewards, win rate) over the samples, printed with `show` samples."""
    n = len(samples)
    result = {"kl": sum(p - r for p, r in zip(policy_logps, reference_logps)) / n,
              "length_policy": sum(map(len, policy_ids)) / n,
              "length_reference": sum(map(len, reference_ids)) / n,
              "reward_policy": None, "reward_reference": None, "win_rate": None, "samples": samples}
    if rewarded:
        result["reward_policy"] = sum(s["reward_policy"] for s in samples) / n
        result["reward_reference"] = sum(s["reward_reference"] for s in samples) / n
        pairs = [(s["reward_policy"], s["reward_reference"]) for s in samples]
        wins = [(p > r) + 0.5 * (p == r) for p, r in pairs]  # 1 win, 1/2 tie, 0 loss
        result["win_rate"] = sum(wins) / n

    for s in samples[:show]:
        print(f"prompt:    {_show(s['prompt'])}")
        for name in ("reference", "policy"):
            reward = f" [reward {s['reward_' + name]:+.2f}]" if rewarded else ""
            print(f"{name + ':':<10} {s[name]}{reward}")
        print()
    print(f"sample_eval: {setting}")
    if rewarded:
        print(f"  mean reward      reference {result['reward_reference']:+.3f} -> policy "
              f"{result['reward_policy']:+.3f}")
        print(f"  win rate         {result['win_rate']:.3f}  (policy over reference on the same prompt and "
              "sample index, ties count 1/2)")
    print(f"  KL(policy||ref)  {result['kl']:.3f} nats per sequence  (mean over policy samples of"
          " log pi(y|x) - log pi_ref(y|x))")
    print(f"  mean length      reference {result['length_reference']:.1f} -> policy "
          f"{result['length_policy']:.1f} tokens")
    return result

"""Rebuild everything in demo/assets/ from nothing, on a CPU: the tiny SFT model and the sentiment preference data.

    python scripts/make_assets.py              # about 7 minutes on one CPU core (run_seconds in demo/assets/MANIFEST.json)
    python scripts/make_assets.py /tmp/assets  # the same into another folder, e.g. to compare with the committed one

A miniature of the controlled-sentiment experiment of "Direct Preference Optimization: Your Language Model is
Secretly a Reward Model" (Rafailov et al., 2023, arXiv:2305.18290, section 6.1 and appendix C), where GPT-2 is
fine-tuned on IMDb, prompts are review prefixes, a sentiment classifier is the ground-truth reward, and the
preference pairs are built from 4 samples per prefix. Here:

1. A small grammar writes movie reviews (positive, negative and mixed, one third each) in a lowercase language
   of about 220 words with spaced punctuation ("the plot was dull . i loved the music .").
2. A word-level tokenizer covers exactly that language, with BOS/EOS/PAD/UNK and a chat template.
3. A Llama model of about one million parameters is trained (the "SFT" step) on grammar reviews, so that it
   writes fluent reviews and, sampled at temperature 1, continues a review start positively as often as
   negatively.
4. For each prompt (the first 2 to 5 words of a fresh grammar review) the SFT model samples 4 continuations,
   sentiment.sentiment_score rates each whole review (prompt + continuation), and every pair of continuations
   whose scores differ by at least min_score_gap becomes a preference pair, chosen = the more positive one.

Deterministic: fixed seeds, one thread, torch.use_deterministic_algorithms. Bit-identical reruns still need the
same torch version and CPU kind (vector units change float rounding); build_tokenizer() and build_config() depend
on neither, and tests/test_assets.py checks them against the committed files.
"""

import functools
import json
import math
import random
import re
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import transformers
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from demo.sample_eval import generate  # noqa: E402  (the same sampler the evaluation uses)
from demo.sentiment import NEGATIVE_WORDS, POSITIVE_WORDS, sentiment_score  # noqa: E402


SETTINGS = dict(
    seed=0, threads=1,
    # model: Llama, ~1M parameters, 4.4 MB in float32
    hidden_size=128, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4, max_position_embeddings=256,
    # SFT
    sft_steps=1500, sft_batch_size=64, sft_lr=3e-3, sft_warmup_steps=100, sft_chat_fraction=0.1,
    # preference data
    train_prompts=600, test_prompts=70, samples_per_prompt=4, max_new_tokens=48, temperature=1.0, min_score_gap=2,
)

# ---------------------------------------------------------------------------------------------------------------
# 1. The review language. A template slot {name} is filled from FILLERS[name]; in an opinion of polarity "+",
# {adj} means a positive adjective and {adj~} a negative one ("~" = the opposite polarity), and vice versa.
# ---------------------------------------------------------------------------------------------------------------

FILLERS = {
    "subject": ["acting", "plot", "soundtrack", "script", "dialogue", "cinematography", "ending", "pacing", "cast",
                "direction", "story", "music", "lead actor", "lead actress", "villain", "editing", "humour",
                "first hour", "final act", "camera work", "set design", "opening scene", "twist", "romance",
                "main character", "screenplay", "sound design", "lighting", "supporting cast", "premise"],
    # empty strings make the adverb optional (one time in two)
    "adverb": ["", "", "", "", "", "", "very", "really", "truly", "quite", "rather", "simply"],
    "verb_adverb": ["", "", "", "really", "truly", "simply"],
    "when": ["last night", "on sunday", "with my family", "at the cinema", "on a long flight", "twice", "with friends"],
    "place": ["paris", "a small town", "new york", "space", "the desert", "a quiet village", "tokyo"],
    "character": ["a young detective", "two sisters", "a lonely robot", "an old soldier", "a small family",
                  "a stolen painting", "a retired teacher"],
    "audience": ["anyone", "my friends", "families", "fans of the genre", "everyone i know"],
    "source": ["a novel", "a true story", "a comic book", "an old play"],
    "released": ["last year", "in the summer", "this week", "a decade ago"],
    "adj+": ["good", "great", "excellent", "superb", "brilliant", "wonderful", "beautiful", "charming", "gripping",
             "moving", "clever", "funny", "delightful", "stunning", "fantastic", "memorable", "touching", "powerful",
             "impressive", "enjoyable", "lovely", "thrilling", "hilarious", "elegant", "inventive", "smart", "fresh",
             "solid"],
    "adj-": ["bad", "terrible", "awful", "dull", "boring", "weak", "clumsy", "flat", "forgettable", "tedious", "messy",
             "lifeless", "annoying", "predictable", "painful", "dreadful", "bland", "silly", "poor", "horrible", "lazy",
             "shallow", "stiff", "confusing", "cheap", "bloated", "hollow", "sloppy"],
    "verb+": ["loved", "enjoyed", "adored", "liked", "admired"],
    "verb-": ["hated", "disliked", "loathed", "despised", "detested"],
    "base+": ["like", "enjoy", "love"],
    "base-": ["hate", "dislike"],
    "noun+": ["masterpiece", "triumph", "gem", "delight", "joy", "treat"],
    "noun-": ["disaster", "mess", "bore", "failure", "letdown", "chore"],
}

OPINIONS = [  # (weight, template) of one opinion of polarity p; "not"/"never" + the opposite polarity has polarity p
    (4, "the {subject} was {adverb} {adj} ."),
    (2, "the {subject} was {adverb} {adj} and the {subject} was {adverb} {adj} ."),
    (2, "the {subject} is {adverb} {adj} ."),
    (2, "the {subject} felt {adverb} {adj} ."),
    (3, "i {verb_adverb} {verb} the {subject} ."),
    (1, "the {subject} was not {adverb} {adj~} ."),
    (1, "the {subject} was never {adj~} ."),
    (1, "i did not {base~} the {subject} ."),
    (1, "it is a {noun} ."),
]
VERDICTS = ["overall , a {noun} .", "overall , the film was {adverb} {adj} .", "i would recommend it to {audience} ."]
NEGATIVE_VERDICTS = ["i would not recommend it to {audience} ."]  # the negated form replaces "recommend" when p = "-"
MIXED = ["the {subject} was {adverb} {adj} but the {subject} was {adverb} {adj~} ."]
# Mixed verdicts share the frames of the polar ones, so they differ from them in one word. A long phrase that
# only mixed reviews use ("in the end , it is somewhere in the middle .") is mostly seen in rejected completions;
# DPO pushed its inner tokens down and the freed probability went to junk ("in in in the end ...").
MIXED_VERDICTS = ["overall , a mixed bag .", "overall , the film was uneven .", "overall , the film was average ."]
NEUTRAL = ["i watched it {when} .", "i saw it {when} .", "the film is set in {place} .",
           "the story follows {character} .", "it is about {character} in {place} .", "it runs about two hours .",
           "i went in knowing nothing about it .", "it is based on {source} .", "it came out {released} ."]


OPPOSITE = {"+": "-", "-": "+"}


def fill(template, polarity, rng, subjects):
    """Fill the slots of one template; `subjects` is this review's shuffled pool, so no subject repeats."""
    def slot(match):
        name, opposite = match.group(1), match.group(2) == "~"
        if name == "subject":
            return subjects.pop()
        if name + "+" in FILLERS:  # a polar slot
            return rng.choice(FILLERS[name + (OPPOSITE[polarity] if opposite else polarity)])
        return rng.choice(FILLERS[name])
    return " ".join(re.sub(r"\{(\w+)(~?)\}", slot, template).split())  # split/join drops the empty adverbs


def opinion(rng):
    return rng.choices([t for _, t in OPINIONS], weights=[w for w, _ in OPINIONS])[0]


def make_review(rng, tone=None):
    """One review of 3 to 5 sentences (about 20 to 40 words); tone is "+", "-" or "mixed" (random if None)."""
    tone = tone or rng.choice(["+", "-", "mixed"])
    subjects = rng.sample(FILLERS["subject"], 8)
    sentences = [fill(rng.choice(NEUTRAL), "+", rng, subjects)] if rng.random() < 0.5 else []
    if tone == "mixed":
        first = rng.choice("+-")
        parts = [fill(opinion(rng), first, rng, subjects), fill(opinion(rng), OPPOSITE[first], rng, subjects)]
        if rng.random() < 0.5:
            parts.append(fill(MIXED[0], rng.choice("+-"), rng, subjects))
        rng.shuffle(parts)
        sentences += parts
        if rng.random() < 0.7:
            sentences.append(rng.choice(MIXED_VERDICTS))
    else:
        sentences += [fill(opinion(rng), tone, rng, subjects) for _ in range(rng.randint(2, 3))]
        if rng.random() < 0.7:
            verdicts = VERDICTS[:2] + (VERDICTS[2:] if tone == "+" else NEGATIVE_VERDICTS)
            sentences.append(fill(rng.choice(verdicts), tone, rng, subjects))
    return " ".join(sentences)


def make_prompt(rng):
    """A prompt is the first 2 to 5 words of a fresh review, as the IMDb prefixes of the DPO paper."""
    return " ".join(make_review(rng).split()[:rng.randint(2, 5)])


def language_words():
    """Every word the grammar can write, sorted (the tokenizer's vocabulary order)."""
    texts = [w for fillers in FILLERS.values() for w in fillers]
    texts += [t for _, t in OPINIONS] + VERDICTS + NEGATIVE_VERDICTS + MIXED + MIXED_VERDICTS + NEUTRAL
    return sorted({w for t in texts for w in re.sub(r"\{\w+~?\}", " ", t).split()})


@functools.cache
def grammar_patterns():
    """One regular expression per template; a slot matches any of its fillers, of either polarity."""
    def slot(name):
        fillers = {f for key in (name, name + "+", name + "-") for f in FILLERS.get(key, [])}
        return "(?:" + "|".join(re.escape(f) + " " if f else "" for f in sorted(fillers, key=len, reverse=True)) + ")"
    templates = [t for _, t in OPINIONS] + VERDICTS + NEGATIVE_VERDICTS + MIXED + MIXED_VERDICTS + NEUTRAL
    return [re.compile("".join(slot(w[1:-1].rstrip("~")) if w[0] == "{" else re.escape(w) + " " for w in t.split()))
            for t in templates]


def grammatical(sentence):
    """Whether the grammar can write `sentence` (one sentence, ending with " ."): a fluency check of samples."""
    return any(p.fullmatch(sentence.strip() + " ") for p in grammar_patterns())


# ---------------------------------------------------------------------------------------------------------------
# 2. Tokenizer and model config: fast, no training, so tests can compare them with the committed files.
# ---------------------------------------------------------------------------------------------------------------

SPECIAL_TOKENS = ["<pad>", "<bos>", "<eos>", "<unk>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
CHAT_TEMPLATE = ("{{ bos_token }}{% for message in messages %}"
                 "<|{{ message['role'] }}|> {{ message['content'] }} <|end|> "
                 "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")


def build_tokenizer():
    """Word level: one token per word or punctuation mark, lowercased; BOS prepended like Llama's tokenizer."""
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS + language_words())}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()  # "great." -> "great", "."
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", pair="<bos> $A <bos> $B",
                                                       special_tokens=[("<bos>", vocab["<bos>"])])
    tok.add_special_tokens(SPECIAL_TOKENS)
    # No decoder: decode joins tokens with single spaces, which is exactly how the language is written.
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                   unk_token="<unk>", chat_template=CHAT_TEMPLATE, clean_up_tokenization_spaces=False,
                                   model_max_length=SETTINGS["max_position_embeddings"])


def build_config(tokenizer):
    s = SETTINGS
    return LlamaConfig(
        architectures=["LlamaForCausalLM"], vocab_size=len(tokenizer), hidden_size=s["hidden_size"],
        intermediate_size=s["intermediate_size"], num_hidden_layers=s["num_hidden_layers"],
        num_attention_heads=s["num_attention_heads"], num_key_value_heads=s["num_attention_heads"],
        max_position_embeddings=s["max_position_embeddings"], tie_word_embeddings=True, dtype="float32",
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)


def build_generation_config(tokenizer):
    # <|end|> also stops: it closes the assistant turn in the chat template.
    return GenerationConfig(bos_token_id=tokenizer.bos_token_id, pad_token_id=tokenizer.pad_token_id,
                            eos_token_id=[tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|end|>")],
                            max_new_tokens=SETTINGS["max_new_tokens"], do_sample=True, temperature=1.0,
                            top_k=0, top_p=1.0)  # plain sampling from the model's distribution


# ---------------------------------------------------------------------------------------------------------------
# 3. SFT: next-token prediction on whole grammar reviews (a prompt is just a review's start, so this is also
# prompt -> continuation training), a tenth of them wrapped in the chat template so that it means something.
# ---------------------------------------------------------------------------------------------------------------

def sft_example(rng, tokenizer):
    review = make_review(rng)
    if rng.random() >= SETTINGS["sft_chat_fraction"]:
        return tokenizer(review)["input_ids"] + [tokenizer.eos_token_id]
    words = review.split()
    k = rng.randint(2, 5)
    messages = [{"role": "user", "content": " ".join(words[:k])}, {"role": "assistant", "content": " ".join(words[k:])}]
    return list(tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"])


def sft_batches(rng, tokenizer):
    """Batches of similar length (sorted within groups of 8 batches), so that little compute goes to padding."""
    size = SETTINGS["sft_batch_size"]
    while True:
        rows = sorted((sft_example(rng, tokenizer) for _ in range(8 * size)), key=len)
        batches = [rows[i:i + size] for i in range(0, len(rows), size)]
        rng.shuffle(batches)
        yield from batches


def train_sft(model, tokenizer, rng):
    s = SETTINGS
    optimizer = torch.optim.AdamW(model.parameters(), lr=s["sft_lr"], weight_decay=0.01, betas=(0.9, 0.98))
    warmup, steps = s["sft_warmup_steps"], s["sft_steps"]
    scheduler = torch.optim.lr_scheduler.LambdaLR(  # linear warmup, then cosine decay to 0
        optimizer, lambda step: min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * step / steps)))
    model.train()
    start = time.time()
    for step, rows in zip(range(steps), sft_batches(rng, tokenizer)):
        width = max(map(len, rows))
        input_ids = torch.tensor([r + [tokenizer.pad_token_id] * (width - len(r)) for r in rows])
        attention_mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
        labels = input_ids.masked_fill(attention_mask == 0, -100)  # no loss on padding; EOS is learned
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten())  # position t predicts t+1
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 250 == 0 or step == steps - 1:
            lr = scheduler.get_last_lr()[0]
            print(f"sft step {step:5d}  loss {loss.item():.4f}  lr {lr:.2e}  {time.time() - start:.0f}s", flush=True)
    model.eval()
    return loss.item()


# ---------------------------------------------------------------------------------------------------------------
# 4. Preference pairs sampled from the SFT model and ranked by the ground-truth reward.
# ---------------------------------------------------------------------------------------------------------------

def sample_continuations(model, tokenizer, prompts, n, seed):
    """n continuations per prompt, as strings that start with a space: prompt + completion is the review text,
    and the word-level tokenizer splits that concatenation at exactly the prompt/completion boundary."""
    prompt_ids = [tokenizer(p)["input_ids"] for p in prompts for _ in range(n)]
    ids = generate(model, tokenizer, prompt_ids, max_new_tokens=SETTINGS["max_new_tokens"],
                   temperature=SETTINGS["temperature"], seed=seed, batch_size=256)
    texts = [" " + tokenizer.decode(c, skip_special_tokens=True) for c in ids]
    return [texts[i * n:(i + 1) * n] for i in range(len(prompts))], ids


def make_pairs(prompts, continuations):
    """Every pair of a prompt's continuations whose scores differ by at least min_score_gap, chosen = the more
    positive (the DPO paper's IMDb setup builds all 6 pairs of 4 samples). Rows are ordered round-robin
    over prompts (every prompt's first pair, then every prompt's second pair, ...), so any leading slice of
    the file has distinct prompts."""
    by_prompt = []
    for prompt, options in zip(prompts, continuations):
        scores = [sentiment_score(prompt + c) for c in options]
        pairs = []
        for i in range(len(options)):
            for j in range(i + 1, len(options)):
                if abs(scores[i] - scores[j]) >= SETTINGS["min_score_gap"]:
                    w, l = (i, j) if scores[i] > scores[j] else (j, i)
                    pair = {"prompt": prompt, "chosen": options[w], "rejected": options[l]}
                    pairs.append((pair, scores[w] - scores[l]))
        by_prompt.append(pairs)
    rows = [pairs[k] for k in range(max(map(len, by_prompt))) for pairs in by_prompt if k < len(pairs)]
    return [r for r, _ in rows], [g for _, g in rows]


def mean(xs):
    return round(sum(xs) / len(xs), 3)


def write_jsonl(path, rows):
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def check_language():
    """The grammar's polar words and the reward's lexicon must agree, or the reward would misjudge the language."""
    for sign, lexicon in (("+", POSITIVE_WORDS), ("-", NEGATIVE_WORDS)):
        missing = {w for name, fillers in FILLERS.items() if name.endswith(sign) for w in fillers} - lexicon
        if missing:
            raise ValueError(f"FILLERS words of polarity {sign} missing from sentiment.py's lexicon: {sorted(missing)}")
    polar = {w for name, fillers in FILLERS.items() if name[-1] in "+-" for w in fillers} | {"recommend"}
    wrong = (set(language_words()) - polar) & (POSITIVE_WORDS | NEGATIVE_WORDS)
    if wrong:
        raise ValueError(f"neutral words of the grammar are in sentiment.py's lexicon: {sorted(wrong)}")


def main(out):
    t0 = time.time()
    s = SETTINGS
    check_language()
    # One thread: the same float sums on any machine, and no slowdown when other jobs share the cores
    # (two spinning OpenMP threads on two busy cores made a tiny model's steps up to 20x slower).
    torch.set_num_threads(s["threads"])
    torch.manual_seed(s["seed"])
    torch.use_deterministic_algorithms(True)
    rng = random.Random(s["seed"])

    tokenizer = build_tokenizer()
    model = LlamaForCausalLM(build_config(tokenizer))
    model.generation_config = build_generation_config(tokenizer)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"vocabulary {len(tokenizer)} tokens, model {n_params:,} parameters")

    final_loss = train_sft(model, tokenizer, rng)
    t_sft = time.time() - t0

    # Distinct prompts, and no test prompt in train.
    prompts = []
    while len(prompts) < s["test_prompts"] + s["train_prompts"]:
        p = make_prompt(rng)
        if p not in prompts:
            prompts.append(p)
    splits = {"test": prompts[:s["test_prompts"]], "train": prompts[s["test_prompts"]:]}
    (out / "sentiment-prefs").mkdir(parents=True, exist_ok=True)
    stats = {}
    for i, (split, split_prompts) in enumerate(splits.items()):
        continuations, ids = sample_continuations(model, tokenizer, split_prompts, s["samples_per_prompt"],
                                                  seed=s["seed"] + i)
        pairs, gaps = make_pairs(split_prompts, continuations)
        write_jsonl(out / "sentiment-prefs" / f"{split}.jsonl", pairs)
        # What the SFT model wrote: its tone balance and fluency (the claims demo/assets/README.md makes).
        reviews = [p + c for p, cs in zip(split_prompts, continuations) for c in cs]
        scores = [sentiment_score(r) for r in reviews]
        sentences = [x + " ." for r in reviews for x in r.split(" .") if x.strip()]
        stats[split] = {"prompts": len(split_prompts), "pairs": len(pairs), "mean_score_gap": mean(gaps),
                        "sft_samples": len(scores), "sft_positive": mean([x > 0 for x in scores]),
                        "sft_negative": mean([x < 0 for x in scores]), "sft_mean_score": mean(scores),
                        "sft_grammatical_sentences": mean([grammatical(x) for x in sentences]),
                        "sft_ended_with_eos": mean([bool(c) and c[-1] == tokenizer.eos_token_id for c in ids])}
        print(split, stats[split])
        for p, cs in list(zip(split_prompts, continuations))[:2]:
            print(f"  {p!r}: " + " | ".join(f"{c} [{sentiment_score(p + c):+.0f}]" for c in cs[:2]))

    model.save_pretrained(out / "tiny-sentiment-lm")
    tokenizer.save_pretrained(out / "tiny-sentiment-lm")
    # transformers 5 records its own class name; the generic one also loads in transformers 4.
    tok_config = json.loads((out / "tiny-sentiment-lm" / "tokenizer_config.json").read_text())
    tok_config["tokenizer_class"] = "PreTrainedTokenizerFast"
    (out / "tiny-sentiment-lm" / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2) + "\n")
    run_time = time.time() - t0
    files = {str(p.relative_to(out)): p.stat().st_size for p in sorted(out.rglob("*"))
             if p.is_file() and p.name not in ("MANIFEST.json", "README.md")}
    manifest = {"script": "scripts/make_assets.py", "settings": s, "parameters": n_params, "vocabulary": len(tokenizer),
                "sft_final_loss": round(final_loss, 4), "sft_seconds": round(t_sft), "run_seconds": round(run_time),
                "torch": torch.__version__, "transformers": transformers.__version__, "data": stats, "files": files,
                "total_bytes": sum(files.values())}
    (out / "MANIFEST.json").write_text(json.dumps(manifest, indent=2) + "\n")
    print(f"done in {run_time:.0f}s (SFT {t_sft:.0f}s); {sum(files.values()) / 1e6:.2f} MB in {out}")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "demo" / "assets")  # another folder: rebuild without overwriting

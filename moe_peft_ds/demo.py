"""A built-in demo MoE model and demo data, built on CPU with no download.

A randomly initialised MoE routes almost uniformly, so expert selection (MoE-Sieve)
has nothing to find on it. This module pretrains a tiny Mixtral on a procedurally
generated corpus of clearly different domains (arithmetic, code, prose, geography);
the router learns domain-specialised routing, so a fine-tuning task drawn from one
domain (arithmetic or code) uses a skewed subset of the experts.

The same script builds ``tiny-llama``, a dense LLaMA of similar size pretrained on the same
corpus with the same tokenizer: the base for MixLoRA / MixDoRA (``--arch llama``).

Rebuild with ``python launch/build_demo_model.py`` (deterministic for a seed).
"""

import json
import math
import random
import time
from pathlib import Path

import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from tqdm import tqdm
from transformers import LlamaConfig, LlamaForCausalLM, MixtralConfig, MixtralForCausalLM, PreTrainedTokenizerFast

DEMO_DIR = Path(__file__).parent / "assets"
DEMO_MODEL_DIR = DEMO_DIR / "tiny-mixtral"
DEMO_DENSE_DIR = DEMO_DIR / "tiny-llama"
ARCHS = ("mixtral", "llama")
DEMO_DATA_DIR = DEMO_DIR / "demo_data"

DEFAULT_STEPS = 1200
TASKS = ("arithmetic", "code")  # the domains that have a fine-tuning task
N_TRAIN, N_EVAL = 2000, 200  # task examples per split

# Word lists: each domain draws on its own vocabulary so the router can tell them apart.
_NAMES = "Anna Ben Carla David Emma Felix Grace Hugo Iris Jonas".split()
_ITEMS = "apple book coin marble pencil stamp ticket shell".split()
_VERBS = "add scale merge count clip shift mix pack".split()
_NOUNS = "price total score weight offset width index delta".split()
_ARGS = "a b x y n m left right".split()
_OPS = {"sum": "+", "difference": "-", "product": "*", "quotient": "/", "remainder": "%"}
_ADJS = "quiet old bright small gentle tired golden distant".split()
_SUBJECTS = "fisherman teacher fox traveller child baker sailor poet".split()
_MOTIONS = "walked wandered hurried drifted climbed rode".split()
_PLACES = "harbor forest village valley river bank garden market".split()
_TIMES = "at dawn|before the storm|after supper|in the rain|under the stars|at noon".split("|")
_FEELINGS = "smiled|sighed|laughed softly|stayed silent|sang a song|closed her eyes".split("|")
# country, capital, continent, river
_GEO = [
    row.split(":")
    for row in (
        "France:Paris:Europe:Seine;Germany:Berlin:Europe:Rhine;Egypt:Cairo:Africa:Nile;"
        "Brazil:Brasilia:South America:Amazon;Japan:Tokyo:Asia:Tone;Canada:Ottawa:North America:Fraser;"
        "Peru:Lima:South America:Ucayali;Kenya:Nairobi:Africa:Tana;India:Delhi:Asia:Ganges;"
        "Spain:Madrid:Europe:Tagus;Poland:Warsaw:Europe:Vistula;Mali:Bamako:Africa:Niger"
    ).split(";")
]


def _sum_question(rng: random.Random) -> tuple[str, str]:
    """One arithmetic question and its answer, e.g. ("37 + 45", "82")."""
    op = rng.choice("+-*")
    a = rng.randint(10, 99)
    b = rng.randint(2, 9) if op == "*" else rng.randint(10, a if op == "-" else 99)
    return f"{a} {op} {b}", str({"+": a + b, "-": a - b, "*": a * b}[op])


def _arithmetic(rng: random.Random) -> str:
    """An equation, a Q/A line, or a word problem."""
    question, answer = _sum_question(rng)
    name, item = rng.choice(_NAMES), rng.choice(_ITEMS)
    a, b = rng.randint(2, 60), rng.randint(2, 30)
    return rng.choice(
        [
            f"{question} = {answer}",
            f"Q: What is {question}?\nA: {answer}",
            f"{name} has {a} {item}s and gets {b} more, so {name} has {a + b} {item}s.",
        ]
    )


def _function(rng: random.Random) -> tuple[str, str, str, str, str]:
    """A random (name, operation word, operator, arg1, arg2) for a small function."""
    word = rng.choice(list(_OPS))
    a, b = rng.sample(_ARGS, 2)
    return f"{rng.choice(_VERBS)}_{rng.choice(_NOUNS)}", word, _OPS[word], a, b


def _code(rng: random.Random) -> str:
    """A templated Python function: binary operation with docstring, or a loop."""
    name, word, op, a, b = _function(rng)
    if rng.random() < 0.7:
        return f'def {name}({a}, {b}):\n    """Return the {word} of {a} and {b}."""\n    return {a} {op} {b}\n'
    return (
        f"def {name}(items):\n    total = 0\n    for item in items:\n"
        f"        if item > {rng.randint(0, 9)}:\n            total {op}= item\n    return total\n"
    )


def _prose(rng: random.Random) -> str:
    """Two narrative sentences built from word lists."""
    c = rng.choice
    return (
        f"The {c(_ADJS)} {c(_SUBJECTS)} {c(_MOTIONS)} to the {c(_ADJS)} {c(_PLACES)} {c(_TIMES)}. "
        f"When the {c(_SUBJECTS)} saw the {c(_PLACES)}, she {c(_FEELINGS)}."
    )


def _geography(rng: random.Random) -> str:
    """One fact about a country: capital, continent or river."""
    country, capital, continent, river = rng.choice(_GEO)
    return rng.choice(
        [
            f"{capital} is the capital of {country}.",
            f"{country} is a country in {continent}.",
            f"The {river} river flows through {country}.",
        ]
    )


_DOMAINS = {"arithmetic": _arithmetic, "code": _code, "prose": _prose, "geography": _geography}


def demo_corpus(seed: int, n_per_domain: int) -> dict[str, list[str]]:
    """Procedurally generated plain text, ``n_per_domain`` documents per domain."""
    rng = random.Random(seed)  # one stream: the corpus depends on the seed only
    return {name: [make(rng) for _ in range(n_per_domain)] for name, make in _DOMAINS.items()}


def _task_pair(domain: str, rng: random.Random) -> dict[str, str]:
    """One instruction/response pair for the task of ``domain``."""
    if domain == "arithmetic":
        question, answer = _sum_question(rng)
        return {"prompt": f"Q: What is {question}?\nA:", "response": f" {answer}"}
    if domain == "code":
        name, word, op, a, b = _function(rng)
        return {
            "prompt": f"Q: Write a Python function {name} that returns the {word} of {a} and {b}.\nA:",
            "response": f"\ndef {name}({a}, {b}):\n    return {a} {op} {b}",
        }
    raise ValueError(f"no task for domain {domain!r}; choose from {TASKS}")


def task_examples(domain: str, seed: int, n: int) -> list[dict[str, str]]:
    """``n`` distinct prompt/response pairs from one domain (``"arithmetic"`` or ``"code"``)."""
    rng, seen = random.Random(seed), {}
    for _ in range(100 * n):  # both tasks have far more than n distinct pairs
        pair = _task_pair(domain, rng)
        seen.setdefault(pair["prompt"], pair)
        if len(seen) == n:
            return list(seen.values())
    raise ValueError(f"could not draw {n} distinct {domain} examples")


def build_tokenizer(texts: list[str], vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """Byte-level BPE trained on ``texts``; digits are split so sums stay learnable."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    # Prepend <s> like Llama/Mixtral tokenizers do; </s> is left to the caller.
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tok.token_to_id("<s>"))]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", padding_side="right"
    )


def tiny_mixtral_config(vocab_size: int) -> MixtralConfig:
    """4 layers x 16 experts (top-2), hidden 64: about 1.7M parameters, ~7 MB in fp32."""
    return MixtralConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=16,
        num_experts_per_tok=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        router_aux_loss_coef=0.001,  # weak: keeps experts alive, lets each domain specialise
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )


def tiny_llama_config(vocab_size: int) -> LlamaConfig:
    """4 layers, hidden 64, one FFN of 256 (as wide as tiny-mixtral's two active experts together): about 0.31M parameters."""
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )


def _pack(tokenizer: PreTrainedTokenizerFast, texts: list[str], seq_len: int, rng: random.Random) -> torch.Tensor:
    """Shuffle documents, join them as ``<s> text </s>`` and cut into rows: [n_rows, seq_len]."""
    docs = rng.sample(texts, len(texts))
    flat = [t for ids in tokenizer(docs)["input_ids"] for t in ids + [tokenizer.eos_token_id]]
    n_rows = len(flat) // seq_len
    return torch.tensor(flat[: n_rows * seq_len]).view(n_rows, seq_len)


def _lr_lambda(steps: int):
    """Linear warm-up over 5% of the steps, then cosine decay to 10%."""
    warmup = max(1, steps // 20)
    return lambda s: (
        (s + 1) / warmup
        if s < warmup
        else 0.1 + 0.45 * (1 + math.cos(math.pi * (s - warmup) / max(1, steps - warmup)))
    )


def pretrain(
    model: MixtralForCausalLM | LlamaForCausalLM,
    tokenizer: PreTrainedTokenizerFast,
    texts: list[str],
    steps: int,
    seq_len: int,
    batch_size: int,
    seed: int,
    lr: float,
) -> list[float]:
    """Causal-LM pretraining (plus router aux loss) on packed mixed-domain text; returns losses."""
    torch.manual_seed(seed)
    rows = _pack(tokenizer, texts, seq_len, random.Random(seed))  # [n_rows, seq_len]
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(steps))
    model.train()
    losses = []
    for _ in (bar := tqdm(range(steps), desc="pretrain")):
        batch = rows[torch.randint(len(rows), (batch_size,), generator=gen)]  # [B, seq_len]
        extra = {"output_router_logits": True} if isinstance(model, MixtralForCausalLM) else {}
        loss = model(input_ids=batch, labels=batch, **extra).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{sum(losses[-20:]) / len(losses[-20:]):.3f}")
    model.eval()
    return losses


def _write_tasks(data_dir: Path, seed: int) -> None:
    """``<task>_train.jsonl`` and ``<task>_eval.jsonl`` (disjoint prompts) for every task."""
    data_dir.mkdir(parents=True, exist_ok=True)
    for i, domain in enumerate(TASKS):
        pairs = task_examples(domain, seed + 1000 + i, N_TRAIN + N_EVAL)
        for split, rows in (("train", pairs[:N_TRAIN]), ("eval", pairs[N_TRAIN:])):
            (data_dir / f"{domain}_{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def _command(out_dir: Path, data_dir: Path, steps: int, seed: int, arch: str) -> str:
    """The CLI call that rebuilds these artefacts (default paths left out)."""
    paths = [("--output-dir", out_dir, default_dir(arch)), ("--data-dir", data_dir, DEMO_DATA_DIR)]
    flags = "".join(f" {flag} {path}" for flag, path, default in paths if Path(path) != default)
    return f"python launch/build_demo_model.py --arch {arch} --steps {steps} --seed {seed}{flags}"


def default_dir(arch: str) -> Path:
    return DEMO_MODEL_DIR if arch == "mixtral" else DEMO_DENSE_DIR


def build_demo(
    out_dir: Path = DEMO_MODEL_DIR,
    data_dir: Path = DEMO_DATA_DIR,
    steps: int = DEFAULT_STEPS,
    seed: int = 0,
    arch: str = "mixtral",
) -> Path:
    """Build corpus, tokenizer and tiny Mixtral (or dense tiny LLaMA), pretrain it, save model and task data.

    Returns ``out_dir``. About 3 minutes on 2 idle CPU cores with the default steps.
    """
    if arch not in ARCHS:
        raise ValueError(f"arch={arch!r}; choose one of {ARCHS}")
    start = time.time()
    out_dir, data_dir = Path(out_dir), Path(data_dir)
    torch.manual_seed(seed)
    corpus = demo_corpus(seed, n_per_domain=4000)
    texts = [t for docs in corpus.values() for t in docs]
    tokenizer = build_tokenizer(texts)
    if arch == "mixtral":
        model = MixtralForCausalLM(tiny_mixtral_config(len(tokenizer))).float()
    else:
        model = LlamaForCausalLM(tiny_llama_config(len(tokenizer))).float()
    losses = pretrain(model, tokenizer, texts, steps, seq_len=128, batch_size=16, seed=seed, lr=3e-3)
    model.save_pretrained(out_dir)  # creates out_dir
    tokenizer.save_pretrained(out_dir)
    _write_tasks(data_dir, seed)
    info = {  # final_loss: mean of the last 50 steps, less noisy than the last one
        "seed": seed,
        "steps": steps,
        "final_loss": round(sum(losses[-50:]) / len(losses[-50:]), 4),
        "corpus_sizes": {k: len(v) for k, v in corpus.items()},
        "task_sizes": {"train": N_TRAIN, "eval": N_EVAL},
        "build_seconds": round(time.time() - start, 1),
        "command": _command(out_dir, data_dir, steps, seed, arch),
        "arch": arch,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
    }
    (out_dir / "build_info.json").write_text(json.dumps(info, indent=2) + "\n")
    return out_dir

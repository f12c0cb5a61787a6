"""Multiple-choice evaluation: every option of every item scored by the model, three ways.

- ``acc`` (log-likelihood): the option whose continuation has the highest summed log-probability.
- ``acc_norm`` (length-normalised): the same divided by the continuation's length in
  characters (as lm-evaluation-harness does, so that it does not depend on the tokenizer).
- ``acc_letter``: the options listed as ``A. ... B. ...`` after the question, then the
  option whose letter gets the highest next-token logit after ``Answer:``.

Zero-shot by default; ``shots`` solved examples from the task's few-shot pool are put in
front of every prompt (seeded; drawn from the task's few-shot split, not the evaluated one). Accuracies come with a 95% Wilson
interval. Items can be split over data-parallel ranks (``rank``/``world``); the per-item
scores are gathered so every rank returns what one process would.
"""

from __future__ import annotations

import math
import random

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .device import model_device
from .tasks import MCItem, TaskError

METRICS = ("acc", "acc_norm", "acc_letter")


def wilson_interval(correct: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a proportion (sensible at 0, 1 and small n)."""
    if n == 0:
        return 0.0, 0.0
    p = correct / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def lettered_prompt(item: MCItem) -> str:
    lines = [f"Question: {item.question}"] + [f"{lab}. {c}" for lab, c in zip(item.labels, item.choices)]
    return "\n".join(lines) + "\nAnswer:"


def few_shot_prefixes(pool: list[MCItem], shots: int, seed: int, n_items: int) -> list[tuple[str, str]]:
    """For each item, ``(loglik prefix, letter prefix)`` built from ``shots`` solved pool items."""
    if shots < 0:
        raise TaskError(f"shots={shots} must be >= 0")
    if shots > len(pool):
        raise TaskError(f"{shots}-shot prompts need {shots} solved examples, but the few-shot pool holds {len(pool)}")
    rng = random.Random(seed)
    prefixes = []
    for _ in range(n_items):
        chosen = rng.sample(pool, shots)
        loglik = "".join(c.options[c.answer][0] + c.options[c.answer][1] + "\n\n" for c in chosen)
        letter = "".join(f"{lettered_prompt(c)} {c.labels[c.answer]}\n\n" for c in chosen)
        prefixes.append((loglik, letter))
    return prefixes


@torch.no_grad()
def _continuation_logprobs(
    model, tokenizer, pairs: list[tuple[str, str]], batch_size: int, device, bar
) -> list[float]:
    """Summed log-probability of each continuation given its context."""
    encoded = []
    for context, continuation in pairs:
        ctx = tokenizer(context, add_special_tokens=False)["input_ids"]
        cont = tokenizer(continuation, add_special_tokens=False)["input_ids"]
        if not cont:
            raise TaskError(f"option {continuation!r} has no tokens to score")
        encoded.append((ctx, cont))
    scores = []
    for start in range(0, len(encoded), batch_size):
        chunk = encoded[start : start + batch_size]
        width = max(len(c) + len(o) for c, o in chunk)
        ids = torch.full((len(chunk), width), tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, (c, o) in enumerate(chunk):
            ids[i, : len(c) + len(o)] = torch.tensor(c + o)
            mask[i, : len(c) + len(o)] = 1
        logprobs = F.log_softmax(
            model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float(), dim=-1
        )
        for i, (c, o) in enumerate(chunk):
            positions = torch.arange(len(c) - 1, len(c) + len(o) - 1, device=logprobs.device)
            scores.append(float(logprobs[i, positions, torch.tensor(o, device=logprobs.device)].sum()))
        bar.update(len(chunk))
    return scores


@torch.no_grad()
def _letter_logits(
    model, tokenizer, prompts: list[str], letters: list[list[str]], batch_size: int, device, bar
) -> list[list[float]]:
    """The next-token logit of each option letter (``" A"``'s first token) after each prompt."""
    out = []
    for start in range(0, len(prompts), batch_size):
        chunk = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts[start : start + batch_size]]
        width = max(len(c) for c in chunk)
        ids = torch.full((len(chunk), width), tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, c in enumerate(chunk):
            ids[i, : len(c)], mask[i, : len(c)] = torch.tensor(c), 1
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float()
        for i, c in enumerate(chunk):
            token = [tokenizer(f" {lab}", add_special_tokens=False)["input_ids"][0] for lab in letters[start + i]]
            out.append(logits[i, len(c) - 1, token].tolist())
        bar.update(len(chunk))
    return out


def score_items(
    model,
    tokenizer,
    items: list[MCItem],
    pool: list[MCItem] | None = None,
    shots: int = 0,
    seed: int = 0,
    batch_size: int = 8,
    progress: bool = True,
    desc: str = "scoring",
    prefixes: list[tuple[str, str]] | None = None,
) -> list[dict]:
    """Per-item scores: ``loglik`` and ``chars`` per option, ``letter`` logits, ``answer``.
    ``prefixes`` (one per item) replaces the few-shot draw from ``pool``."""
    model.eval()
    device = model_device(model)
    if prefixes is None:
        prefixes = few_shot_prefixes(pool or [], shots, seed, len(items)) if shots else [("", "")] * len(items)
    pairs = [(pre + ctx, cont) for item, (pre, _) in zip(items, prefixes) for ctx, cont in item.options]
    with tqdm(total=len(pairs) + len(items), desc=desc, disable=not progress) as bar:
        logliks = _continuation_logprobs(model, tokenizer, pairs, batch_size, device, bar)
        letters = _letter_logits(
            model,
            tokenizer,
            [pre + lettered_prompt(i) for i, (_, pre) in zip(items, prefixes)],
            [i.labels for i in items],
            batch_size,
            device,
            bar,
        )
    results, k = [], 0
    for item, letter in zip(items, letters):
        n = len(item.options)
        results.append(
            {
                "loglik": logliks[k : k + n],
                "chars": [len(c) for _, c in item.options],
                "letter": letter,
                "answer": item.answer,
            }
        )
        k += n
    return results


def _argmax(values: list[float]) -> int:
    return max(range(len(values)), key=values.__getitem__)


def accuracy(scores: list[dict]) -> dict[str, dict]:
    """Each metric's accuracy, correct count and 95% interval over per-item ``scores``."""
    hits = {
        "acc": [_argmax(s["loglik"]) == s["answer"] for s in scores],
        "acc_norm": [_argmax([ll / c for ll, c in zip(s["loglik"], s["chars"])]) == s["answer"] for s in scores],
        "acc_letter": [_argmax(s["letter"]) == s["answer"] for s in scores],
    }
    n = len(scores)
    return {
        m: {"accuracy": sum(h) / n if n else 0.0, "correct": sum(h), "n": n, "ci95": wilson_interval(sum(h), n)}
        for m, h in hits.items()
    }


def score_distributed(model, tokenizer, items: list[MCItem], rank: int = 0, world: int = 1, **kw) -> list[dict]:
    """``score_items`` with the items split over ``world`` ranks; every rank returns all scores, in order."""
    if world == 1:
        return score_items(model, tokenizer, items, **kw)
    pool, shots, seed = kw.pop("pool", None), kw.pop("shots", 0), kw.pop("seed", 0)
    # the few-shot draw of the whole list, so that each item gets the prompt one process gives it
    prefixes = few_shot_prefixes(pool or [], shots, seed, len(items)) if shots else [("", "")] * len(items)
    mine = score_items(model, tokenizer, items[rank::world], prefixes=prefixes[rank::world], **kw)
    import torch.distributed as dist

    parts = [None] * world
    dist.all_gather_object(parts, mine)
    ordered = [None] * len(items)
    for r, part in enumerate(parts):
        for j, s in enumerate(part):
            ordered[r + j * world] = s
    return ordered


@torch.no_grad()
def exact_match(model, loader) -> dict[str, float]:
    """Teacher-forced exact match over ``loader``'s examples (labels -100 where not scored): a
    sample counts when the model's most likely next token is right at every scored position
    (for an instruction pair: the whole response, greedy). Also the token accuracy and the
    mean loss per scored token. Works for any data format the data layer encodes."""
    was_training = model.training
    model.eval()
    device = model_device(model)
    hits = samples = right = tokens = 0
    nll = 0.0
    for batch in loader:
        batch = {k: v.to(device) for k, v in batch.items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].float()
        target = batch["labels"][:, 1:]
        scored = target != -100
        correct = (logits.argmax(-1) == target) & scored
        hits += int(((correct | ~scored).all(1) & scored.any(1)).sum())
        samples += int(scored.any(1).sum())
        right, tokens = right + int(correct.sum()), tokens + int(scored.sum())
        nll += float(F.cross_entropy(logits[scored], target[scored], reduction="sum"))
    model.train(was_training)
    return {
        "exact_match": hits / max(samples, 1),
        "token_accuracy": right / max(tokens, 1),
        "loss": nll / max(tokens, 1),
        "samples": samples,
    }

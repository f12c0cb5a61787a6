"""The quality testbed: fine-tuning tasks for the bundled demo MoE whose data differ in form from
its pretraining mix (arithmetic expressions, code, prose, geography sentences: plain text, no
questions).

Every task is generated from a seed, as instruction pairs (``Q: ...\nA:`` + the answer) for
training and as multiple-choice items for evaluation, scored by the log-likelihood of each
answer (``evaluate.score_items``). Train and eval prompts are disjoint; nothing in a study is
chosen on the eval split.

- ``mood`` (prose): a generated story sentence, then "Was the <subject> happy or sad?"; the
  answer follows from how the sentence ends (smiled / sighed ...), never stated as such.
- ``operator`` (code): a two-line Python function, then "Does <name> add, subtract or multiply?".
- ``parity`` (numbers): "Is 4827 even or odd?".
- ``more_or_fewer`` (prose around arithmetic): "Anna has 37 coins and gives 12 away. Does Anna
  have more or fewer coins now?".
"""

from __future__ import annotations

import itertools
import platform
import random
import statistics
import time
from typing import Callable

from measure import peak_rss_delta  # benchmarks/ is on sys.path: the studies import this module from there
from transformers import get_cosine_schedule_with_warmup

from moe_peft_ds.data import encode, make_loader, make_train_loader
from moe_peft_ds.evaluate import accuracy, score_items
from moe_peft_ds.profiling import RoutingProfile, profile_routing
from moe_peft_ds.tasks import MCItem
from moe_peft_ds.train import build_optimizer, train_step

_NAMES = "Anna Ben Carla David Emma Felix Grace Hugo Iris Jonas".split()
_ITEMS = "apple book coin marble pencil stamp ticket shell".split()
_FUNCS = (
    "add scale merge count clip shift mix pack total sum blend join apply step fold move combine update "
    "compute adjust handle process reduce grow"
).split()
_ARGS = [("a", "b"), ("x", "y"), ("n", "m"), ("left", "right"), ("p", "q")]
_ADJS = "quiet old bright small gentle tired golden distant".split()
_SUBJECTS = "fisherman teacher fox traveller child baker sailor poet".split()
_MOTIONS = "walked wandered hurried drifted climbed rode".split()
_PLACES = "harbor forest village valley river bank garden market".split()
_TIMES = "at dawn|before the storm|after supper|in the rain|under the stars|at noon".split("|")
_HAPPY, _SAD = "smiled|laughed softly|sang a song|danced".split("|"), "sighed|wept|stayed silent|frowned".split("|")
TASK_NAMES = ("mood", "operator", "parity", "more_or_fewer")


def _mood(rng: random.Random) -> tuple[str, list[str], int]:
    subject, happy = rng.choice(_SUBJECTS), rng.random() < 0.5
    ending = rng.choice(_HAPPY if happy else _SAD)
    story = (
        f"The {rng.choice(_ADJS)} {subject} {rng.choice(_MOTIONS)} to the {rng.choice(_PLACES)} "
        f"{rng.choice(_TIMES)} and {ending}."
    )
    return f"{story} Was the {subject} happy or sad?", ["happy", "sad"], 0 if happy else 1


def _operator(rng: random.Random) -> tuple[str, list[str], int]:
    func, (x, y) = rng.choice(_FUNCS), rng.choice(_ARGS)
    k = rng.randrange(3)
    a, b = (x, y) if rng.random() < 0.5 else (y, x)
    expr = f"{a} {'+-*'[k]} {b}"
    body = rng.choice([f"return {expr}", f"return ({expr})", f"result = {expr}\n    return result"])
    code = f"def {func}({x}, {y}):\n    {body}"
    return f"{code}\nDoes {func} add, subtract or multiply?", ["add", "subtract", "multiply"], k


def _parity(rng: random.Random) -> tuple[str, list[str], int]:
    n = rng.randint(10, 99999)
    return f"Is {n} even or odd?", ["even", "odd"], n % 2


def _more_or_fewer(rng: random.Random) -> tuple[str, list[str], int]:
    name, item, a = rng.choice(_NAMES), rng.choice(_ITEMS), rng.randint(10, 99)
    gets = rng.random() < 0.5
    change = f"gets {rng.randint(2, 40)} more" if gets else f"gives {rng.randint(2, a - 1)} away"
    return (
        f"{name} has {a} {item}s and {change}. Does {name} have more or fewer {item}s now?",
        ["more", "fewer"],
        0 if gets else 1,
    )


_MAKERS = {"mood": _mood, "operator": _operator, "parity": _parity, "more_or_fewer": _more_or_fewer}


def _prompt(question: str) -> str:
    return f"Q: {question}\nA:"


def task_pairs(task: str, seed: int, n_train: int, n_eval: int) -> tuple[list[dict], list[MCItem]]:
    """``n_train`` instruction pairs and ``n_eval`` multiple-choice items with disjoint prompts."""
    if task not in _MAKERS:
        raise ValueError(f"unknown task {task!r}; choose from {TASK_NAMES}")
    rng, seen = random.Random(f"{task}:{seed}"), {}
    for _ in range(50 * (n_train + n_eval)):
        question, choices, answer = _MAKERS[task](rng)
        seen.setdefault(question, (choices, answer))
        if len(seen) == n_train + n_eval:
            break
    else:
        raise ValueError(f"could not draw {n_train + n_eval} distinct {task} questions")
    questions = list(seen.items())
    train = [{"prompt": _prompt(q), "response": f" {choices[a]}"} for q, (choices, a) in questions[:n_train]]
    items = [
        MCItem(
            q, choices, [(_prompt(q), f" {c}") for c in choices], a, [chr(ord("A") + i) for i in range(len(choices))]
        )
        for q, (choices, a) in questions[n_train:]
    ]
    return train, items


def train_batches(examples: list[dict], tokenizer, batch_size: int, seed: int):
    """Shuffled training batches, epoch after epoch (each epoch its own seeded order)."""
    for epoch in itertools.count():
        yield from make_train_loader(examples, tokenizer, batch_size, seed=1000 * seed + epoch)


def held_out_accuracy(model, tokenizer, items: list[MCItem]) -> float:
    """Multiple-choice accuracy, each option scored by its log-likelihood."""
    return accuracy(score_items(model, tokenizer, items, progress=False, batch_size=32))["acc"]["accuracy"]


def mean_std(values: list[float]) -> dict:
    return {
        "mean": statistics.mean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "values": values,
    }


def fine_tune(
    model,
    tokenizer,
    examples: list[dict],
    *,
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
    evaluate: Callable[[], object],
    eval_every: int = 0,
    memory_step: int | None = None,
) -> dict:
    """Train ``model``'s trainable parameters on ``examples``: AdamW at ``lr``, 10 warm-up steps then
    cosine decay, gradients clipped to norm 1. Returns the losses, the median step time, the peak
    memory that step ``memory_step`` adds (``measure.peak_rss_delta``; None if not measured) and
    ``evals``: ``evaluate()`` (with the model in eval mode) after every ``eval_every`` steps and at the end."""
    optimizer = build_optimizer(model, lr)
    scheduler = get_cosine_schedule_with_warmup(optimizer, min(10, steps), steps)
    batches = train_batches(examples, tokenizer, batch_size, seed)
    losses, times, peak, evals = [], [], None, {}

    def one_step():
        losses.append(train_step(model, batch, optimizer, scheduler, clip=1.0))

    for step in range(steps):
        if step and eval_every and step % eval_every == 0:
            evals[step] = _evaluated(model, evaluate)
        model.train()
        batch = next(batches)
        if step == memory_step:  # not timed: the measurement collects garbage and trims the heap first
            peak = peak_rss_delta(one_step)
            continue
        start = time.perf_counter()
        one_step()
        times.append(time.perf_counter() - start)
    evals[steps] = _evaluated(model, evaluate)
    return {
        "losses": [round(x, 4) for x in losses],
        "step_time_s": statistics.median(times[1:] or times),
        "peak_step_memory_bytes": peak,
        "evals": evals,
    }


def _evaluated(model, evaluate):
    model.eval()
    return evaluate()


def study_machine() -> str:
    """The machine line of a study's result."""
    import torch

    return (
        f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"
    )


def profiled_task(base, tokenizer, task: str, n_train: int, n_eval: int, calibration: int):
    """A task's training examples (encoded), held-out items, calibration batches (the first
    ``calibration`` training samples) and the base model's routing profile on them."""
    pairs, items = task_pairs(task, seed=0, n_train=n_train, n_eval=n_eval)  # the data is fixed; seeds vary training
    examples = [encode(p, tokenizer, 128) for p in pairs]
    calib = list(make_loader(examples[:calibration], tokenizer, 32))
    profile: RoutingProfile = profile_routing(
        base, calib, progress=False, model_id="tiny-mixtral", data_id=f"{task}:train"
    )
    return examples, items, calib, profile

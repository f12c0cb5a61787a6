"""The eight commonsense multiple-choice tasks, read in the schemas they have on the Hugging
Face hub, turned into one shape: ``MCItem`` (a question, its options as (context,
continuation) pairs to score, and the index of the right one).

| task | hub dataset (config) | eval split | schema |
|---|---|---|---|
| arc_easy, arc_challenge | allenai/ai2_arc (ARC-Easy / ARC-Challenge) | test | question, choices{text,label}, answerKey ("A"-"E" or "1"-"5") |
| boolq | google/boolq | validation | question, passage, answer (bool) |
| openbookqa | allenai/openbookqa (main) | test | question_stem, choices{text,label}, answerKey |
| piqa | ybisk/piqa | validation | goal, sol1, sol2, label (0/1) |
| siqa | allenai/social_i_qa | validation | context, question, answerA/B/C, label ("1"-"3") |
| hellaswag | Rowan/hellaswag | validation | ctx, activity_label, endings[4], label ("0"-"3") |
| winogrande | allenai/winogrande (winogrande_xl) | validation | sentence with "_", option1, option2, answer ("1"/"2") |

WinoGrande is scored by option substitution: each option fills the blank in the context and
the rest of the sentence is the continuation whose likelihood is compared (the partial
scoring of the original paper). The bundled fixtures (``assets/eval_fixtures``) are a few
items per task in the same schemas, written by this project; they go through the same code.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

FIXTURES_DIR = Path(__file__).parent / "assets" / "eval_fixtures"


class TaskError(ValueError):
    """A task name or record that cannot be used; the message says why."""


@dataclass
class MCItem:
    """One multiple-choice question. ``options[i]`` is the ``(context, continuation)`` whose
    continuation is scored for choice i; ``question`` and ``labels`` make the lettered prompt."""

    question: str
    choices: list[str]
    options: list[tuple[str, str]]
    answer: int
    labels: list[str]


def _letters(n: int) -> list[str]:
    return [chr(ord("A") + i) for i in range(n)]


def _lettered(question: str, choices: list[str], answer: int) -> MCItem:
    """A question whose choices are scored as continuations of ``Question: ...\\nAnswer:``."""
    context = f"Question: {question}\nAnswer:"
    return MCItem(question, choices, [(context, f" {c}") for c in choices], answer, _letters(len(choices)))


def _answer_index(key, labels: list[str], task: str) -> int:
    """ARC/OpenBookQA answer keys: a letter or a digit, matching one of ``labels`` (mixed in ARC)."""
    key = str(key).strip()
    if key in labels:
        return labels.index(key)
    if key.isdigit() and all(lab.isalpha() for lab in labels) and 1 <= int(key) <= len(labels):
        return int(key) - 1
    if key.isalpha() and all(lab.isdigit() for lab in labels) and ord(key.upper()) - ord("A") < len(labels):
        return ord(key.upper()) - ord("A")
    raise TaskError(f"{task}: answer key {key!r} is not one of the labels {labels}")


def arc(r: dict) -> MCItem:
    labels = [str(x) for x in r["choices"]["label"]]
    return _lettered(r["question"], list(r["choices"]["text"]), _answer_index(r["answerKey"], labels, "arc"))


def openbookqa(r: dict) -> MCItem:
    labels = [str(x) for x in r["choices"]["label"]]
    return _lettered(
        r["question_stem"], list(r["choices"]["text"]), _answer_index(r["answerKey"], labels, "openbookqa")
    )


def boolq(r: dict) -> MCItem:
    answer = r["answer"] if isinstance(r["answer"], bool) else str(r["answer"]).lower() == "true"
    question = f"{r['passage']}\nQuestion: {r['question']}?"
    return MCItem(
        question,
        ["no", "yes"],
        [(f"{question}\nAnswer:", " no"), (f"{question}\nAnswer:", " yes")],
        int(answer),
        ["A", "B"],
    )


def piqa(r: dict) -> MCItem:
    return _lettered(r["goal"], [r["sol1"], r["sol2"]], int(r["label"]))


def siqa(r: dict) -> MCItem:
    return _lettered(
        f"{r['context']} {r['question']}", [r["answerA"], r["answerB"], r["answerC"]], int(r["label"]) - 1
    )


def hellaswag(r: dict) -> MCItem:
    context = f"{r['activity_label']}: {r['ctx']}"
    endings = list(r["endings"])
    return MCItem(context, endings, [(context, f" {e}") for e in endings], int(r["label"]), _letters(len(endings)))


def winogrande(r: dict) -> MCItem:
    sentence = r["sentence"]
    if sentence.count("_") != 1:
        raise TaskError(f"winogrande: sentence {sentence!r} must hold exactly one blank '_'")
    before, after = sentence.split("_")
    choices = [r["option1"], r["option2"]]
    options = [(before + c, after) for c in choices]  # the option fills the blank; the rest is scored
    return MCItem(sentence, choices, options, int(r["answer"]) - 1, ["A", "B"])


@dataclass(frozen=True)
class Task:
    name: str
    hub: str
    config: str | None
    split: str
    few_shot_split: str
    convert: Callable[[dict], MCItem]


TASKS = {
    t.name: t
    for t in (
        Task("arc_easy", "allenai/ai2_arc", "ARC-Easy", "test", "train", arc),
        Task("arc_challenge", "allenai/ai2_arc", "ARC-Challenge", "test", "train", arc),
        Task("boolq", "google/boolq", None, "validation", "train", boolq),
        Task("openbookqa", "allenai/openbookqa", "main", "test", "train", openbookqa),
        Task("piqa", "ybisk/piqa", None, "validation", "train", piqa),
        Task("siqa", "allenai/social_i_qa", None, "validation", "train", siqa),
        Task("hellaswag", "Rowan/hellaswag", None, "validation", "train", hellaswag),
        Task("winogrande", "allenai/winogrande", "winogrande_xl", "validation", "train", winogrande),
    )
}


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise TaskError(f"unknown task {name!r}; known: {sorted(TASKS)}")
    return TASKS[name]


def load_items(name: str, source: str = "hub", split: str | None = None, limit: int | None = None) -> list[MCItem]:
    """The items of task ``name``: from the hub (``source="hub"``), from the bundled fixtures
    (``"fixtures"``), or from a local directory holding ``<task>.jsonl`` / a ``save_to_disk`` copy."""
    import datasets

    task = get_task(name)
    split = split or task.split
    try:
        if source == "hub":
            ds = datasets.load_dataset(task.hub, task.config, split=split)
        else:
            root = FIXTURES_DIR if source == "fixtures" else Path(source)
            path = root / f"{name}.jsonl" if split == task.split else root / f"{name}_{split}.jsonl"
            if not path.is_file() and (root / name).is_dir():
                ds = datasets.load_from_disk(str(root / name))[split]
            else:
                ds = datasets.load_dataset("json", data_files=str(path), split="train")
    except TaskError:
        raise
    except Exception as err:  # unreachable hub, missing file, malformed records
        raise TaskError(f"{name}: split {split!r} could not be loaded from {source!r}: {err}") from err
    rows = list(ds) if limit is None else list(ds.select(range(min(limit, len(ds)))))
    if not rows:
        raise TaskError(f"{name}: split {split!r} from {source!r} holds no items")
    try:
        return [task.convert(r) for r in rows]
    except KeyError as err:
        raise TaskError(f"{name}: records lack the field {err} of the task's hub schema") from err

"""Training batches: the same global batches for any number of ranks; the loss's token count."""

import pytest
import torch

from moe_peft_ds.data import IGNORE_INDEX, DataError, GlobalBatches, target_tokens


def epochs(sampler, n: int) -> list[list[int]]:
    return [batch for _ in range(n) for batch in sampler]


def test_ranks_together_see_the_batches_of_one_process_with_the_global_batch():
    one = epochs(GlobalBatches(23, 6, seed=3), 3)
    ranks = [epochs(GlobalBatches(23, 3, rank=r, world=2, seed=3), 3) for r in range(2)]
    assert [a + b for a, b in zip(*ranks)] == one
    assert len(one) == 3 * 3 and all(len(b) == 6 for b in one)  # 23 // 6 batches an epoch; the 5 left over dropped
    assert len(set(one[0] + one[1] + one[2])) == 18  # no sample twice within an epoch


def test_each_epoch_is_a_new_shuffle_and_the_seed_decides_it():
    a, b = epochs(GlobalBatches(20, 4, seed=0), 2), epochs(GlobalBatches(20, 4, seed=0), 2)
    assert a == b
    assert a[:5] != a[5:]
    assert a != epochs(GlobalBatches(20, 4, seed=1), 2)


def test_fewer_samples_than_one_global_batch_is_an_error():
    with pytest.raises(DataError, match="fewer than one global batch"):
        GlobalBatches(7, 4, rank=0, world=2)


def test_target_tokens_counts_the_shifted_labels_that_are_not_ignored():
    labels = torch.tensor([[IGNORE_INDEX, IGNORE_INDEX, 5, 6, IGNORE_INDEX], [1, 2, 3, 4, 5]])
    assert target_tokens({"labels": labels}) == 2 + 4  # the first label of a row is never predicted


# --- loading and formats -------------------------------------------------------------

import json  # noqa: E402

import datasets  # noqa: E402

from moe_peft_ds.data import DataFormat, collate, load_examples, load_split, pack  # noqa: E402

ROWS = [{"question": f"What is {i} + 1?", "answer": str(i + 1)} for i in range(6)]


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from moe_peft_ds.demo import DEMO_MODEL_DIR

    return AutoTokenizer.from_pretrained(DEMO_MODEL_DIR)


QA = DataFormat(kind="instruction", prompt_column="question", response_column="answer")


def write(path, rows, kind):
    path.parent.mkdir(parents=True, exist_ok=True)
    ds = datasets.Dataset.from_list(rows)
    {
        "jsonl": lambda: ds.to_json(str(path)),
        "json": lambda: path.write_text(json.dumps(rows)),
        "parquet": lambda: ds.to_parquet(str(path)),
        "csv": lambda: ds.to_csv(str(path), index=False),
    }[kind]()
    return path


@pytest.mark.parametrize("kind", ["jsonl", "json", "parquet", "csv"])
def test_every_local_file_type_gives_the_same_examples(tmp_path, tokenizer, kind):
    path = write(tmp_path / f"qa.{kind}", ROWS, kind)
    examples = load_examples(str(path), tokenizer, 64, fmt=QA)
    reference = load_examples(str(write(tmp_path / "ref.jsonl", ROWS, "jsonl")), tokenizer, 64, fmt=QA)
    assert examples == reference and len(examples) == 6


def test_directories_pick_the_split_and_save_to_disk_works(tmp_path, tokenizer):
    write(tmp_path / "files" / "train.jsonl", ROWS[:4], "jsonl")
    write(tmp_path / "files" / "validation.jsonl", ROWS[4:], "jsonl")
    assert len(load_split(str(tmp_path / "files"), "validation")) == 2
    assert len(load_split(str(tmp_path / "files"), "train")) == 4
    datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(ROWS[:5]), "test": datasets.Dataset.from_list(ROWS[5:])}
    ).save_to_disk(str(tmp_path / "disk"))
    assert len(load_examples(str(tmp_path / "disk"), tokenizer, 64, split="test", fmt=QA)) == 1
    with pytest.raises(DataError, match="splits"):
        load_split(str(tmp_path / "disk"), "validation")


def test_a_hub_name_without_hub_access_fails_clearly(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True, raising=False)
    with pytest.raises(DataError, match="hub"):
        load_split("nobody-has/this-dataset", "train")


def test_prompt_and_padding_are_masked_and_train_on_prompt_keeps_the_prompt(tokenizer):
    record = {"question": "What is 2 + 2?", "answer": "4"}
    masked = load_examples_from([record], tokenizer, QA)[0]
    n_prompt = len(tokenizer(record["question"], add_special_tokens=False)["input_ids"])
    assert masked["labels"][:n_prompt] == [IGNORE_INDEX] * n_prompt
    assert (
        masked["labels"][n_prompt:] == masked["input_ids"][n_prompt:]
        and masked["labels"][-1] == tokenizer.eos_token_id
    )
    full = load_examples_from([record], tokenizer, DataFormat(**{**QA.__dict__, "train_on_prompt": True}))[0]
    assert full["labels"] == full["input_ids"]
    batch = collate([masked, {"input_ids": [5], "labels": [5]}], tokenizer.pad_token_id)
    assert (batch["labels"][1, 1:] == IGNORE_INDEX).all() and (batch["attention_mask"][1, 1:] == 0).all()


def load_examples_from(rows, tokenizer, fmt, **kw):
    import tempfile
    from pathlib import Path

    path = Path(tempfile.mkdtemp()) / "rows.jsonl"
    return load_examples(str(write(path, rows, "jsonl")), tokenizer, 64, fmt=fmt, **kw)


def test_chat_records_learn_the_last_assistant_turn_with_and_without_a_template(tokenizer):
    chat = [{"messages": [{"role": "user", "content": "Add 2 and 2."}, {"role": "assistant", "content": "4"}]}]
    plain = load_examples_from(chat, tokenizer, DataFormat(kind="chat"))[0]
    learned = [t for t, lab in zip(plain["input_ids"], plain["labels"]) if lab != IGNORE_INDEX]
    assert tokenizer.decode(learned) == "4" + tokenizer.eos_token
    templated = copy_tokenizer_with_template(tokenizer)
    ex = load_examples_from(chat, templated, DataFormat(kind="chat"))[0]
    text = tokenizer.decode(ex["input_ids"])
    assert text.startswith("<|user|>Add 2 and 2.") and "<|assistant|>" in text
    assert tokenizer.decode([t for t, lab in zip(ex["input_ids"], ex["labels"]) if lab != IGNORE_INDEX]).startswith(
        "4"
    )


def copy_tokenizer_with_template(tokenizer):
    import copy

    templated = copy.deepcopy(tokenizer)
    templated.chat_template = (
        "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    return templated


def test_text_format_and_column_errors(tokenizer):
    ex = load_examples_from([{"body": "hello world"}], tokenizer, DataFormat(text_column="body"))[0]
    assert ex["labels"] == ex["input_ids"]
    with pytest.raises(DataError, match="expected"):
        load_examples_from([{"q": "x", "a": "y"}], tokenizer, DataFormat())
    with pytest.raises(DataError, match="unknown"):
        DataFormat(kind="sharegpt")


def test_packing_fills_rows_and_keeps_every_token():
    examples = [{"input_ids": list(range(n)), "labels": [IGNORE_INDEX] + list(range(1, n))} for n in (5, 7, 3)]
    rows = pack(examples, 4)
    assert [len(r["input_ids"]) for r in rows] == [4, 4, 4, 3]
    assert sum((r["input_ids"] for r in rows), []) == sum((e["input_ids"] for e in examples), [])
    assert sum((r["labels"] for r in rows), []) == sum((e["labels"] for e in examples), [])


def test_tokenisation_is_cached_across_runs(tmp_path, tokenizer, monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")
    path = write(tmp_path / "qa.jsonl", ROWS, "jsonl")
    first = load_examples(str(path), tokenizer, 64, fmt=QA)
    cached = sorted((tmp_path / "cache").rglob("cache-*.arrow"))
    stamps = {p: p.stat().st_mtime_ns for p in cached}
    second = load_examples(str(path), tokenizer, 64, fmt=QA)
    assert first == second and cached  # the map result was written once ...
    assert sorted((tmp_path / "cache").rglob("cache-*.arrow")) == cached  # ... and read back, not redone
    assert all(p.stat().st_mtime_ns == stamps[p] for p in cached)

"""Multiple-choice tasks in their hub schemas, the three scorings, and launch/evaluate.py."""

import json
import runpy
from pathlib import Path

import pytest
import torch
from distributed import run_deepspeed

from moe_peft_ds.evaluate import accuracy, few_shot_prefixes, score_items, wilson_interval
from moe_peft_ds.tasks import TASKS, MCItem, TaskError, load_items

ROOT = Path(__file__).resolve().parents[1]
evaluate_main = runpy.run_path(str(ROOT / "launch" / "evaluate.py"), run_name="not_main")["main"]


@pytest.mark.parametrize("name", sorted(TASKS))
def test_every_task_reads_its_fixtures_in_the_hub_schema(name):
    items = load_items(name, "fixtures")
    assert items and all(0 <= i.answer < len(i.options) == len(i.choices) == len(i.labels) for i in items)
    assert load_items(name, "fixtures", TASKS[name].few_shot_split)  # the few-shot pool


def test_schema_details():
    arc = load_items("arc_easy", "fixtures")
    assert arc[1].answer == 1 and arc[1].labels == ["A", "B", "C", "D"]  # labels "1".."4", answerKey "2"
    assert len(arc[3].options) == 5 and arc[3].answer == 3
    assert load_items("boolq", "fixtures")[0].answer == 1 and load_items("boolq", "fixtures")[1].answer == 0
    assert load_items("siqa", "fixtures")[1].answer == 2  # label "3"
    assert (
        load_items("hellaswag", "fixtures")[1].answer == 1 and len(load_items("hellaswag", "fixtures")[1].options) == 4
    )
    wino = load_items("winogrande", "fixtures")[0]
    assert wino.options == [
        ("The trophy did not fit in the suitcase because the trophy", " was too big."),
        ("The trophy did not fit in the suitcase because the suitcase", " was too big."),
    ]
    assert wino.answer == 0 and load_items("winogrande", "fixtures")[1].answer == 1


class CharTokenizer:
    """One token per character, spaces dropped (so " A" is the token of "A")."""

    pad_token_id = 0

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [ord(c) for c in text if c != " "]}


class PreferenceLM(torch.nn.Module):
    """Whatever came before, the next token is 'a' (logit 5) or 'B' (logit 3) more than any other."""

    def __init__(self):
        super().__init__()
        self.bias = torch.nn.Parameter(torch.zeros(128))
        with torch.no_grad():
            self.bias[ord("a")], self.bias[ord("B")] = 5.0, 3.0

    def forward(self, input_ids, attention_mask=None):
        return type("Out", (), {"logits": self.bias.expand(*input_ids.shape, 128)})()


def item(options, answer):
    return MCItem("q", options, [("Q:", f" {o}") for o in options], answer, ["A", "B"][: len(options)])


def test_a_model_with_known_preferences_gets_the_expected_accuracies():
    items = [
        item(["aaa", "zzz"], 0),  # likelihood right, letter (B) wrong
        item(["zzz", "aaa"], 1),  # both right
        item(["aaa", "zzz"], 1),  # likelihood wrong, letter right
        item(["zz", "aaaa"], 1),
    ]  # both right (longer but likelier)
    scores = score_items(PreferenceLM(), CharTokenizer(), items, batch_size=3, progress=False)
    result = accuracy(scores)
    assert result["acc"]["accuracy"] == 0.75 and result["acc_letter"]["accuracy"] == 0.75
    assert result["acc_norm"]["correct"] == 3 and result["acc"]["ci95"] == pytest.approx(wilson_interval(3, 4))
    lp_a = torch.log_softmax(PreferenceLM().bias, 0)[ord("a")].item()
    assert scores[0]["loglik"][0] == pytest.approx(3 * lp_a, rel=1e-5)


def test_wilson_interval_brackets_the_proportion():
    lo, hi = wilson_interval(8, 10)
    assert lo < 0.8 < hi and 0 <= lo and hi <= 1
    assert wilson_interval(0, 5)[0] == 0.0 and wilson_interval(5, 5)[1] == pytest.approx(1.0)


def test_k_shot_prompts_and_their_errors():
    pool = load_items("piqa", "fixtures", "train")
    prefixes = few_shot_prefixes(pool, 2, seed=0, n_items=3)
    assert all(p[0].count("\n\n") == 2 and p[1].count("Answer:") == 2 for p in prefixes)
    assert prefixes == few_shot_prefixes(pool, 2, seed=0, n_items=3)  # seeded
    with pytest.raises(TaskError, match="few-shot pool holds 2"):
        few_shot_prefixes(pool, 3, seed=0, n_items=1)


def test_bad_task_inputs_fail_clearly(tmp_path, capsys):
    with pytest.raises(TaskError, match="unknown task"):
        load_items("mmlu", "fixtures")
    (tmp_path / "piqa.jsonl").write_text(json.dumps({"goal": "x", "solution": "y"}) + "\n")
    with pytest.raises(TaskError, match="lack the field"):
        load_items("piqa", str(tmp_path))
    (tmp_path / "boolq.jsonl").write_text("")
    with pytest.raises(TaskError, match="boolq"):
        load_items("boolq", str(tmp_path))
    rc = evaluate_main(["--model", "tiny-mixtral", "--tasks", "nope", "--output-dir", str(tmp_path / "out")])
    assert rc == 2 and "unknown task" in capsys.readouterr().err and not (tmp_path / "out").exists()
    rc = evaluate_main(
        [
            "--model",
            "tiny-mixtral",
            "--tasks",
            "winogrande",
            "--source",
            "fixtures",
            "--shots",
            "5",
            "--output-dir",
            str(tmp_path / "out"),
        ]
    )
    assert rc == 2 and "few-shot pool" in capsys.readouterr().err
    import transformers as tf

    from moe_peft_ds.demo import DEMO_MODEL_DIR

    big = tf.AutoTokenizer.from_pretrained(DEMO_MODEL_DIR)
    big.add_tokens([f"<extra{i}>" for i in range(100)])
    big.save_pretrained(tmp_path / "big-tokenizer")
    rc = evaluate_main(
        [
            "--model",
            "tiny-mixtral",
            "--tokenizer",
            str(tmp_path / "big-tokenizer"),
            "--tasks",
            "piqa",
            "--source",
            "fixtures",
            "--output-dir",
            str(tmp_path / "out"),
        ]
    )
    assert rc == 2 and "do not belong together" in capsys.readouterr().err and not (tmp_path / "out").exists()


@pytest.mark.slow
def test_evaluate_cli_base_and_adapter_and_two_ranks_equal_one(tmp_path):
    from conftest import randomize_adapters

    from moe_peft_ds import AdapterConfig, apply_sieve_lora, save_adapter
    from moe_peft_ds.models import load_model

    model, _ = load_model("tiny-mixtral")
    apply_sieve_lora(model, {0: [1, 2]}, AdapterConfig(r=4, attention_targets=["q_proj"]))
    randomize_adapters(model, std=0.5)
    save_adapter(model, tmp_path / "adapter")
    flags = [
        "--model",
        "tiny-mixtral",
        "--adapter",
        str(tmp_path / "adapter"),
        "--tasks",
        "arc_easy",
        "winogrande",
        "--source",
        "fixtures",
        "--shots",
        "1",
        "--batch-size",
        "3",
        "--no-progress",
    ]
    assert evaluate_main([*flags, "--output-dir", str(tmp_path / "one")]) == 0
    one = json.loads((tmp_path / "one" / "eval_results.json").read_text())
    assert set(one["results"]) == {"base", "adapter"} and one["results"]["base"]["arc_easy"]["acc"]["n"] == 4
    proc = run_deepspeed(
        [
            "deepspeed",
            "--num_gpus",
            "2",
            "--master_port",
            "29611",
            str(ROOT / "launch" / "evaluate.py"),
            *flags,
            "--output-dir",
            str(tmp_path / "two"),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = json.loads((tmp_path / "two" / "eval_results.json").read_text())
    assert two["world_size"] == 2 and two["results"] == one["results"]

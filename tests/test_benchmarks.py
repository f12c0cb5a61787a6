"""The benchmarks run and write well-formed results (a smoke run; speed is not asserted)."""

import json
import re
import runpy
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_step_time_quick_run_writes_results(tmp_path):
    main = runpy.run_path(str(ROOT / "benchmarks" / "step_time.py"), run_name="not_main")["main"]
    out = tmp_path / "step_time.json"
    assert main(["--quick", "--steps", "2", "--warmup", "0", "--no-memory", "--output", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["device"] == "cpu" and set(result["cells"]) == {
        "e16k2/fp32",
        "e16k2/bf16",
        "e64k8/fp32",
        "e64k8/bf16",
    }
    for name, cell in result["cells"].items():
        assert set(cell["variants"]) == {"sieve25", "ours_all", "peft_all", "frozen_base"}, name
        assert cell["checks"] == {"identical_first_loss": True, "ours_all_params_equal_peft_all": True}, name
        assert cell["ratios"]["trainable_params sieve25/ours_all"]["value"] == pytest.approx(0.25), name
        assert all(len(v["step_times_s"]) == 2 for v in cell["variants"].values()), name
        assert cell["profile"] is None and cell["config"]["memory_kind"] is None, name  # --quick, --no-memory
        assert "peak_memory sieve25/ours_all" not in cell["ratios"], name
        assert cell["ratios"]["step_time sieve25/frozen_base"]["applies"] == name.endswith("fp32"), name
    assert (
        result["cells"]["e64k8/fp32"]["config"]["experts"] == 16
        and result["cells"]["e64k8/bf16"]["config"]["top_k"] == 4
    )
    assert (
        result["cells"]["e16k2/bf16"]["variants"]["ours_all"]["adapter_dtype"] == "float32"
    )  # over a bf16 base, by default
    md = out.with_suffix(".md").read_text()
    assert "| ratio |" in md and "| cell | sieve/base |" in md and "### e64k8/bf16" in md


@pytest.mark.slow
def test_step_time_profiles_one_cell_and_measures_memory(tmp_path):
    main = runpy.run_path(str(ROOT / "benchmarks" / "step_time.py"), run_name="not_main")["main"]
    out = tmp_path / "step_time.json"
    assert (
        main(
            [
                "--quick",
                "--steps",
                "1",
                "--warmup",
                "0",
                "--shapes",
                "e16k2",
                "--dtypes",
                "fp32",
                "--profile",
                "--output",
                str(out),
            ]
        )
        == 0
    )
    cell = json.loads(out.read_text())["cells"]["e16k2/fp32"]
    assert set(cell["profile"]["tables"]) == {"sieve25", "ours_all"}
    assert all("Self CPU" in table for table in cell["profile"]["tables"].values())
    assert cell["config"]["memory_kind"].startswith("cpu_tensor_peak_delta")
    assert isinstance(cell["ratios"]["peak_memory sieve25/ours_all"]["pass"], bool)
    for v in cell["variants"].values():  # weights and optimizer state, plus a step that allocates
        assert v["peak_step_memory_bytes"] > 0
        assert v["peak_memory_bytes"] == v["resident_bytes"] + v["peak_step_memory_bytes"]
    per = cell["variants"]  # the sieve's 4x smaller optimizer state and gradients, exactly counted
    assert per["sieve25"]["resident_bytes"] < per["ours_all"]["resident_bytes"]
    assert "<details><summary>e16k2/fp32 <code>sieve25</code>" in (tmp_path / "step_time_profile.md").read_text()
    assert "<details>" not in out.with_suffix(".md").read_text()  # the report (quoted by the README) stays short


def test_step_time_cells_take_per_shape_sizes_unless_given():
    step_time = runpy.run_path(str(ROOT / "benchmarks" / "step_time.py"), run_name="not_main")
    args = step_time["parse_args"](["--quick"])
    assert args.profile is False and args.shapes == ["e16k2", "e64k8"] and args.dtypes == ["fp32", "bf16"]
    cells = {s: step_time["make_cell"](args, s, "bf16") for s in args.shapes}
    assert (cells["e16k2"].experts, cells["e16k2"].top_k, cells["e64k8"].experts, cells["e64k8"].top_k) == (
        8,
        2,
        16,
        4,
    )
    for cell in cells.values():  # same routed expert FLOPs per token in every shape
        assert cell.top_k * cell.intermediate == cells["e16k2"].top_k * cells["e16k2"].intermediate
    full = step_time["parse_args"](["--experts", "32", "--layers", "1"])
    assert full.profile is True
    cell = step_time["make_cell"](full, "e64k8", "fp32")
    assert (cell.experts, cell.top_k, cell.intermediate, cell.layers) == (32, 8, 128, 1)
    with pytest.raises(SystemExit):
        step_time["parse_args"](["--top-k", "10", "--experts", "8"])


@pytest.mark.slow
def test_ep_dispatch_quick_run_moves_exactly_the_routed_rows(tmp_path):
    import subprocess
    import sys

    out = tmp_path / "ep.json"  # a subprocess: spawned ranks must import the script as a module
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "ep_dispatch.py"), "--quick", "--output", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["ours"]["bytes_ratio_to_minimum"] == 1.0  # dropless, no padding
    assert result["expert_memory_ratio_ep2_over_ep1"] == 0.5
    assert [d["capacity_factor"] for d in result["deepspeed_native_per_layer"]] == [1.0, 2.0]


@pytest.mark.slow
def test_mixlora_quick_run_writes_results(tmp_path):
    main = runpy.run_path(str(ROOT / "benchmarks" / "mixlora.py"), run_name="not_main")["main"]
    out = tmp_path / "mixlora.json"
    assert main(["--quick", "--output", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["latency"]["max_abs_logit_difference"] < 1e-4  # the two paths compute the same model
    assert set(result["targets"]) == {
        "latency model fast/reference",
        "latency ffn fast/reference",
        "peak memory multi/separate",
        "peak memory multi/separate, activation checkpointing",
    }
    assert all(result["memory"][v]["peak_rss_above_imports_bytes"] > 0 for v in ("multi", "separate", "multi+ckpt"))
    assert "| ratio |" in out.with_suffix(".md").read_text()


@pytest.mark.slow
def test_sieve_study_quick_run_writes_results(tmp_path):
    main = runpy.run_path(str(ROOT / "benchmarks" / "sieve_study.py"), run_name="not_main")["main"]
    out = tmp_path / "sieve_study.json"
    assert main(["--quick", "--output", str(out)]) == 0
    result = json.loads(out.read_text())
    row = result["table"]["parity"]
    assert (
        set(row) == {"all", "top25"}
        and row["all"]["experts_per_layer"] == 16
        and row["top25"]["experts_per_layer"] == 4
    )
    assert result["claims"]["1 - params top25/all"] == pytest.approx(0.75)
    assert 0 <= row["top25"]["accuracy"]["mean"] <= 1 and len(result["runs"]) == 2
    assert [list(r["accuracy_by_step"]) for r in result["runs"]] == [
        ["2", "4"]
    ] * 2  # evaluated every 2 steps and at the end
    assert result["settings"]["seeds"] == [0] and result["date"] and result["machine"]
    assert "| claim (paper) |" in out.with_suffix(".md").read_text()


@pytest.mark.slow
def test_mixlora_study_quick_run_compares_methods_at_matched_budgets(tmp_path):
    main = runpy.run_path(str(ROOT / "benchmarks" / "mixlora_study.py"), run_name="not_main")["main"]
    out = tmp_path / "mixlora_study.json"
    assert main(["--quick", "--output", str(out)]) == 0
    result = json.loads(out.read_text())
    table = result["table"]
    assert set(table) == {"lora", "dora", "mixlora", "mixdora"} and table["mixlora"]["rank"] == 4
    for plain, mixture in (("lora", "mixlora"), ("dora", "mixdora")):  # budgets matched to within one rank step
        one_rank = table[plain]["trainable_params"] / table[plain]["rank"]
        assert abs(table[plain]["trainable_params"] - table[mixture]["trainable_params"]) <= one_rank, (plain, mixture)
    if Path("/proc/self/clear_refs").exists():  # Linux: the peak memory of a step is measured
        assert all(row["peak_step_memory_bytes"] > 0 for row in table.values())
    assert all(0 <= r["accuracy"]["parity"] <= 1 and len(r["losses"]) == 4 for r in result["runs"])
    assert {"mixlora - lora (pp)", "step time mixlora/lora"} <= set(result["claims"])
    assert "| comparison |" in out.with_suffix(".md").read_text()
    module = runpy.run_path(str(ROOT / "benchmarks" / "mixlora_study.py"), run_name="not_main")
    configs = {
        m: module["method_config"](m, 4, module["parse_args"](["--quick"]))
        for m in [*module["METHODS"], *module["SWEEP"]]
    }
    assert [m for m, c in configs.items() if c.use_dora] == ["dora", "mixdora"]
    assert (
        configs["mixlora[dynamic,aux=0]"].routing == "dynamic"
        and configs["mixlora[dynamic,aux=0]"].router_aux_loss_coef == 0
    )
    # the router sweep: each cell trains MixLoRA with its routing and balancing coefficient
    assert main(["--quick", "--sweep", "--methods", "mixlora", "--output", str(out)]) == 0
    result = json.loads(out.read_text())
    assert set(result["table"]) == {
        "mixlora",
        "mixlora[topk,aux=0]",
        "mixlora[topk,aux=0.001]",
        "mixlora[dynamic,aux=0]",
        "mixlora[dynamic,aux=0.001]",
        "mixlora[dynamic,aux=0.01]",
    }
    assert "| dynamic |" in out.with_suffix(".md").read_text()


def test_testbed_splits_are_disjoint_and_balanced():
    import sys

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from testbed import TASK_NAMES, task_pairs

    for task in TASK_NAMES:
        train, items = task_pairs(task, seed=0, n_train=300, n_eval=100)
        assert not {p["prompt"] for p in train} & {i.options[0][0] for i in items}, task
        answers = [i.answer for i in items]
        assert len(set(answers)) == len(items[0].choices), f"{task}: every answer occurs"
        assert all(f" {i.choices[i.answer]}" == i.options[i.answer][1] for i in items)


@pytest.mark.slow
def test_run_all_quick_writes_a_well_formed_report(tmp_path):
    """benchmarks/run_all.py --quick: every benchmark runs at smoke size and REPORT.md holds each
    one's table, the machine and date, and plots that exist."""
    import subprocess
    import sys

    results = tmp_path / "results"
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "run_all.py"), "--quick", "--results-dir", str(results)],
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = (tmp_path / "REPORT.md").read_text()
    for name in (
        "step_time",
        "ep_dispatch",
        "mixlora",
        "demo_routing",
        "demo_train",
        "sieve_study",
        "mixlora_study",
        "continual_study",
        "load_memory",
        "plans",
        "mixed_batch",
        "placement",
        "drift_study",
    ):
        assert f"## {name}" in report and (results / f"{name}.json").exists(), name
        json.loads((results / f"{name}.json").read_text())
    assert "|---|" in report and "Written by `benchmarks/run_all.py --quick`" in report
    images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", report)
    assert {
        "results/sieve_study_loss.png",
        "results/sieve_study_accuracy.png",
        "results/mixlora_study.png",
        "results/continual_study.png",
    } <= set(images)
    assert all((tmp_path / image).stat().st_size > 0 for image in images)


def _run_all():
    return runpy.run_path(str(ROOT / "benchmarks" / "run_all.py"), run_name="not_main")


def test_every_result_the_readme_quotes_was_written_by_run_all():
    """Each benchmark's block in docs/results.md is exactly what its results file and run_all.json give (run
    `python benchmarks/run_all.py --report-only` after a benchmark changes), from a full run."""
    run_all = _run_all()
    results, readme = ROOT / "benchmarks" / "results", (ROOT / "docs" / "results.md").read_text()
    record = json.loads((results / "run_all.json").read_text())["benchmarks"]
    for name in run_all["BENCHMARKS"]:
        block = re.search(rf"<!-- results:{name} -->\n(.*?)<!-- /results:{name} -->", readme, re.S)
        assert block, f"docs/results.md has no results block for {name}"
        assert block.group(1) == run_all["readme_block"](results, name), f"docs/results.md block {name} is stale"
        assert not record[name]["quick"] and record[name]["date"] and record[name]["machine"], name


def test_update_readme_rewrites_only_the_result_blocks(tmp_path):
    run_all = _run_all()
    results = tmp_path / "results"
    results.mkdir()
    (results / "demo.md").write_text("# title\n\n| a | b |\n|---|---|\n| 1 | 2 |\n")
    run_all["record_runs"](results, {"demo": {"seconds": 3.0, "command": "benchmarks/demo.py"}}, False)
    readme = tmp_path / "README.md"
    readme.write_text("intro 0.5\n<!-- results:demo -->\nold | 9 |\n<!-- /results:demo -->\noutro\n")
    assert run_all["update_readme"](readme, results) == ["demo"]
    text = readme.read_text()
    assert text.startswith("intro 0.5\n<!-- results:demo -->\nFrom `benchmarks/results/demo.json`, written by")
    assert "| 1 | 2 |\n<!-- /results:demo -->\noutro\n" in text and "old" not in text and "# title" not in text
    run_all["update_readme"](readme, results)
    assert readme.read_text() == text  # idempotent

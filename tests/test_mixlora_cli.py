"""launch/train.py --method mixlora|mixdora: one process, and 2 data-parallel ranks under deepspeed."""

import json
import runpy
from pathlib import Path

import pytest
import torch
from distributed import run_deepspeed
from safetensors.torch import load_file
from tiny_models import save_tiny_llama

from moe_peft_ds import MixLoRAConfig, load_adapter
from moe_peft_ds.mixlora import mixlora_layers
from moe_peft_ds.models import load_model

ROOT = Path(__file__).resolve().parents[1]
train_main = runpy.run_path(str(ROOT / "launch" / "train.py"), run_name="not_main")["main"]
FLAGS = ["--data", "demo:arithmetic", "--no-progress", "--max-steps", "8", "--num-experts", "4", "--top-k", "2"]


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("llama") / "tiny-llama")


def test_mixdora_run_trains_and_saves_every_option(llama, tmp_path):
    out = tmp_path / "run"
    rc = train_main(
        [
            "--model",
            llama,
            *FLAGS,
            "--method",
            "mixdora",
            "--routing",
            "dynamic",
            "--top-p",
            "0.6",
            "--expert-r",
            "0:4",
            "--router-z-loss-coef",
            "0.001",
            "--activation-checkpointing",
            "non-reentrant",
            "--max-steps",
            "30",
            "--batch-size",
            "8",
            "--output-dir",
            str(out),
        ]
    )
    assert rc == 0
    cfg = MixLoRAConfig.from_json(out / "adapter_config.json")
    assert (cfg.method, cfg.routing, cfg.top_p, cfg.expert_r, cfg.num_experts) == (
        "mixdora",
        "dynamic",
        0.6,
        {0: 4},
        4,
    )
    assert cfg.use_dora and cfg.attention_targets == ["q_proj", "k_proj", "v_proj", "o_proj"]
    state = load_file(str(out / "adapter_model.safetensors"))
    assert state["layers.1.mixlora.experts.0.down_proj.lora_B"].shape[1] == 4
    assert any(k.endswith("magnitude") for k in state) and "layers.0.mixlora.router.weight" in state
    losses = json.loads((out / "train_log.json").read_text())["losses"]
    assert sum(losses[-5:]) < sum(losses[:5])
    model, _ = load_model(llama)
    load_adapter(model, out)
    assert len(mixlora_layers(model)) == 2


def test_bad_mixlora_flags_fail_before_any_work(llama, tmp_path, capsys):
    for extra, match in (
        (["--expert-r", "0=4"], "EXPERT:VALUE"),
        (["--top-k", "5"], "top_k"),
        (["--model", "tiny-mixtral"], "not a supported dense family"),
    ):
        rc = train_main(
            ["--model", llama, *FLAGS, "--method", "mixlora", "--output-dir", str(tmp_path / "out"), *extra]
        )
        assert rc == 2 and match in capsys.readouterr().err, extra
        assert not (tmp_path / "out" / "adapter_config.json").exists()


@pytest.mark.slow
def test_two_ranks_data_and_expert_parallel_train_the_mixlora_of_one_process(llama, tmp_path):
    """ZeRO-2 on 2 ranks x 4 samples == one process x 8, data parallel and with the LoRA experts
    split over the 2 ranks (EP=2), evaluations during training included. The load-balancing
    loss is per rank (a nonlinear function of the batch), so it is off here; the z-loss is per
    token and stays."""
    flags = [
        "--model",
        llama,
        *FLAGS,
        "--method",
        "mixlora",
        "--router-aux-loss-coef",
        "0",
        "--router-z-loss-coef",
        "1e-3",
        "--max-grad-norm",
        "1e-3",
        "--eval-every",
        "4",
        "--eval-samples",
        "8",
        "--eval-tasks",
        "piqa",
        "--eval-task-source",
        "fixtures",
    ]
    single = tmp_path / "single"
    assert train_main([*flags, "--batch-size", "8", "--output-dir", str(single)]) == 0
    a = load_file(str(single / "adapter_model.safetensors"))
    la = json.loads((single / "train_log.json").read_text())["losses"]
    evals = json.loads((single / "train_log.json").read_text())["evaluations"]
    assert [e["step"] for e in evals] == [4, 8]
    for ep, port in ((1, 29601), (2, 29602)):
        out = tmp_path / f"ep{ep}"
        cmd = [
            "deepspeed",
            "--num_gpus",
            "2",
            "--master_port",
            str(port),
            str(ROOT / "launch" / "train.py"),
            *flags,
            "--batch-size",
            "4",
            "--deepspeed_config",
            str(ROOT / "ds_configs" / "zero2_fp32.json"),
            "--ep-size",
            str(ep),
            *(["--expert-placement", "balanced"] if ep == 2 else []),  # the LoRA experts placed by the routers' loads
            "--output-dir",
            str(out),
        ]
        proc = run_deepspeed(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        b = load_file(str(out / "adapter_model.safetensors"))
        assert a.keys() == b.keys()
        for key in a:
            torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-5, msg=f"EP={ep} {key}")
        log = json.loads((out / "train_log.json").read_text())
        assert log["losses"] == pytest.approx(la, rel=1e-4)
        placement = json.loads((out / "adapter_config.json").read_text())["expert_placement"]
        assert (len(placement) == 2 and all(sorted(p[0] + p[1]) == list(range(4)) for p in placement.values())) == (
            ep == 2
        )
        for got, expected in zip(log["evaluations"], evals, strict=True):  # evaluation is collective, and exact
            assert got == pytest.approx(expected, rel=1e-4)


@pytest.mark.slow
def test_mixlora_trains_under_a_bf16_deepspeed_preset(llama, tmp_path):
    """DeepSpeed's bf16 config casts every module, the fp32 router included; the router must still
    take the (fp32) router input and compute in fp32 (it crashed with a dtype mismatch before)."""
    import subprocess
    import sys

    out = tmp_path / "run"
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "launch" / "train.py"),
            "--model",
            llama,
            *FLAGS,
            "--method",
            "mixlora",
            "--max-steps",
            "3",
            "--batch-size",
            "4",
            "--output-dir",
            str(out),
            "--deepspeed_config",
            str(ROOT / "ds_configs" / "zero2_bf16.json"),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env={**__import__("os").environ, "MASTER_PORT": "29633"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    losses = json.loads((out / "train_log.json").read_text())["losses"]
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    state = load_file(str(out / "adapter_model.safetensors"))
    assert all(torch.isfinite(t.float()).all() for t in state.values())

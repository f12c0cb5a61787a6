"""`deepspeed --num_gpus 2 launch/train.py` end to end on 2 CPU ranks (gloo): data parallel
with ZeRO-0 and expert parallel (EP=2) with ZeRO-2 train the same adapter."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
COMMON = ["--model", "tiny-mixtral", "--data", "demo:arithmetic", "--max-steps", "8", "--batch-size", "8",
          "--calibration-samples", "64", "--no-progress"]


def launch(out: Path, preset: str, ep_size: int) -> subprocess.CompletedProcess:
    cmd = ["deepspeed", "--num_gpus", "2", "--master_port", str(29500 + ep_size + 10 * len(preset)),
           str(ROOT / "launch" / "train.py"), *COMMON, "--output-dir", str(out),
           "--deepspeed_config", str(ROOT / "ds_configs" / preset), "--ep-size", str(ep_size)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)


@pytest.mark.slow
def test_ep2_zero2_trains_the_same_adapter_as_data_parallel_zero0(tmp_path):
    runs = {}
    for preset, ep in (("zero0_fp32.json", 1), ("zero2_fp32.json", 2)):
        out = tmp_path / f"{preset}-ep{ep}"
        proc = launch(out, preset, ep)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        runs[ep] = (json.loads((out / "adapter_config.json").read_text()), load_file(str(out / "adapter_model.safetensors")),
                    json.loads((out / "train_log.json").read_text()))
    (cfg1, w1, log1), (cfg2, w2, log2) = runs[1], runs[2]
    assert cfg1["selection"] == cfg2["selection"]  # all-reduced profile: every rank selected the same experts
    assert w1.keys() == w2.keys() and len(w1) == 4 * 4 * 2 * 2  # layers x experts x tensors x (A, B)
    for key in w1:
        torch.testing.assert_close(w2[key], w1[key], rtol=1e-4, atol=1e-5)
    assert log1["losses"] == pytest.approx(log2["losses"], rel=1e-4)


def test_invalid_combinations_are_rejected_before_any_work(tmp_path):
    zero3 = tmp_path / "zero3.json"
    zero3.write_text(json.dumps({"train_micro_batch_size_per_gpu": 1, "gradient_clipping": 1.0,
                                 "zero_optimization": {"stage": 3}}))
    for extra, match in ((["--deepspeed_config", str(zero3), "--ep-size", "2"], "ZeRO-3"),
                         (["--ep-size", "2"], "needs --deepspeed_config"),
                         (["--deepspeed_config", str(tmp_path / "missing.json")], "does not exist"),
                         (["--ep-size", "0"], "ep-size")):
        proc = subprocess.run([sys.executable, str(ROOT / "launch" / "train.py"), *COMMON,
                               "--output-dir", str(tmp_path / "out"), *extra], capture_output=True, text=True, cwd=ROOT)
        assert proc.returncode == 2 and match in proc.stderr, (extra, proc.stderr[-2000:])
        assert not (tmp_path / "out").exists()

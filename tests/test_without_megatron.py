"""megatron-core is an optional extra: without it the package imports and the transformers path
works (megatron is blocked from import in a fresh interpreter)."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CODE = """
import sys
sys.modules["megatron"] = None  # any import of megatron now fails
sys.path.insert(0, "tests")
import torch
from tiny_models import tiny_model
from moe_peft_ds import AdapterConfig, apply_sieve_lora, load_adapter, profile_routing, save_adapter, select_experts
model = tiny_model("mixtral")
ids = torch.randint(1, 97, (2, 8))
profile = profile_routing(model, [{"input_ids": ids}], progress=False)
apply_sieve_lora(model, select_experts(profile, k=2), AdapterConfig(r=4))
save_adapter(model, sys.argv[1])
load_adapter(tiny_model("mixtral"), sys.argv[1])
try:
    import megatron.core
except ImportError:
    print("ok without megatron")
"""


def test_the_package_works_without_megatron(tmp_path):
    done = subprocess.run(
        [sys.executable, "-c", CODE, str(tmp_path / "a")], capture_output=True, text=True, cwd=ROOT, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "ok without megatron" in done.stdout

"""Run launch/megatron_sieve.py on CPU with the test-only shims of megatron_cpu (a script, so that
torchrun can start it on several ranks): ``python tests/megatron_example_on_cpu.py <flags>``."""

import runpy
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from megatron_cpu import cpu_shims  # noqa: E402

sys.argv = [str(ROOT / "launch" / "megatron_sieve.py")] + sys.argv[1:]
with cpu_shims():
    runpy.run_path(sys.argv[0], run_name="__main__")

#!/usr/bin/env bash
# The one command a GPU session runs: bash benchmarks/gpu_check.sh   (from any directory)
#
# What it runs, in order:
#   1. nvidia-smi -L, and the torch / CUDA versions torch sees.
#   2. The GPU tests (at most 420 s): tests/gpu (sieve and MixLoRA numerics CPU vs CUDA and in
#      bf16, the training loop, host syncs, launch/train.py plain and under deepspeed; the
#      2-GPU expert-parallel tests skip on one GPU) and the CUDA-only tests of the CPU suite:
#      tests/test_megatron.py::test_te_grouped_mlp_equals_sequential_mlp (skips without
#      Transformer Engine) and tests/test_megatron_example.py::test_megatron_example_on_gpus_without_shims.
#      A test failure does not stop the script.
#   3. benchmarks/step_time.py on CUDA, fp32 and bf16, shapes e16k2 and e64k8 (at most 240 s,
#      less if the tests used up more of the 10 minutes; skipped if under 30 s remain).
# How long: about 3-6 minutes on one H200; never more than about 10 (the timeouts above).
# What it writes:
#   benchmarks/results/gpu_tests.json      passed / failed / skipped test ids, pytest's exit
#                                          status, date, device name, torch and CUDA versions
#   benchmarks/results/gpu_step_time.json  the step-time benchmark (and whatever step_time.py
#                                          writes next to it)
#   gpu_tests.xml, gpu_tests.log, step_time.log in a temporary directory (printed), and, if the
#   environment variable OUT is set, copies of all of the above in $OUT.
# Exit status: pytest's when the tests fail (124 when they time out); otherwise the benchmark's
# (124 on its timeout, 0 when all went well).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PYTHON="${PYTHON:-python}"
RESULTS="${RESULTS:-$ROOT/benchmarks/results}"  # overridable (a dry run elsewhere)
LOGS="$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")"
mkdir -p "$RESULTS"
DEADLINE=570  # seconds since start by which everything must be done (a 10-minute device call)

save_out() {  # copy results and logs to $OUT, if set
    if [[ -n "${OUT:-}" ]]; then
        mkdir -p "$OUT"
        cp -f "$LOGS"/* "$OUT"/ 2>/dev/null || true
        cp -f "$RESULTS"/gpu_tests.json "$RESULTS"/gpu_step_time.* "$OUT"/ 2>/dev/null || true
    fi
}

echo "== device"
nvidia-smi -L || echo "nvidia-smi failed or is missing"
"$PYTHON" -c "import torch; print('torch', torch.__version__, '| cuda', torch.version.cuda, '| available', torch.cuda.is_available(), '| devices', torch.cuda.device_count())"
echo "logs: $LOGS"

echo "== GPU tests (timeout 420 s)"
set +e
timeout -k 15 420 "$PYTHON" -m pytest -q -rs -p no:cacheprovider \
    tests/gpu \
    tests/test_megatron.py::test_te_grouped_mlp_equals_sequential_mlp \
    tests/test_megatron_example.py::test_megatron_example_on_gpus_without_shims \
    --junitxml="$LOGS/gpu_tests.xml" 2>&1 | tee "$LOGS/gpu_tests.log"
TEST_RC=${PIPESTATUS[0]}
set -e
echo "pytest exit status: $TEST_RC"

# junit XML -> benchmarks/results/gpu_tests.json (test ids as pytest prints them: path::name)
"$PYTHON" - "$LOGS/gpu_tests.xml" "$TEST_RC" "$RESULTS/gpu_tests.json" <<'PY'
import datetime
import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

xml_path, rc, out = Path(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3])
result = {"rc": rc, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
          "passed": [], "failed": [], "skipped": [], "skip_reasons": {}, "seconds": None}
try:
    import torch

    result["torch"], result["cuda"] = torch.__version__, torch.version.cuda
    result["device"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
except Exception as err:  # the record is still written
    result["torch"] = result["device"] = f"unavailable: {err}"
if xml_path.is_file():
    suites = ET.parse(xml_path).getroot()
    suites = [suites] if suites.tag == "testsuite" else list(suites.iter("testsuite"))
    result["seconds"] = sum(float(s.get("time", 0)) for s in suites)
    for case in (c for s in suites for c in s.iter("testcase")):
        path = (case.get("classname") or "").replace(".", "/")
        test_id = f"{path}.py::{case.get('name')}" if path else case.get("name")
        kinds = {child.tag for child in case}
        if kinds & {"failure", "error"}:
            result["failed"].append(test_id)
        elif "skipped" in kinds:
            result["skipped"].append(test_id)
            result["skip_reasons"][test_id] = case.find("skipped").get("message", "")
        else:
            result["passed"].append(test_id)
else:
    result["note"] = f"no junit XML at {xml_path} (pytest timed out or did not start)"
out.write_text(json.dumps(result, indent=1) + "\n")
print(f"{out}: {len(result['passed'])} passed, {len(result['failed'])} failed, {len(result['skipped'])} skipped, rc {rc}")
for test_id in result["failed"]:
    print(f"FAILED {test_id}")
PY
save_out

BENCH_T=$(( DEADLINE - SECONDS ))
if (( BENCH_T > 240 )); then
    BENCH_T=240
fi
if (( BENCH_T >= 30 )); then
    echo "== step time on CUDA (timeout $BENCH_T s)"
    set +e
    timeout -k 15 "$BENCH_T" "$PYTHON" benchmarks/step_time.py --device cuda --dtypes fp32 bf16 --shapes e16k2 e64k8 \
        --output "$RESULTS/gpu_step_time.json" 2>&1 | tee "$LOGS/step_time.log"
    BENCH_RC=${PIPESTATUS[0]}
    set -e
else
    echo "== step time skipped: only $BENCH_T s left" | tee "$LOGS/step_time.log"
    BENCH_RC=124
fi
echo "step_time.py exit status: $BENCH_RC"
save_out

echo "== done in $SECONDS s: tests rc $TEST_RC, benchmark rc $BENCH_RC; results in $RESULTS/gpu_tests.json, $RESULTS/gpu_step_time.json"
if (( TEST_RC != 0 )); then
    exit "$TEST_RC"
fi
exit "$BENCH_RC"

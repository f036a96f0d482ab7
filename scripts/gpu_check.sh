#!/usr/bin/env bash
# One GPU loan's worth of checks (issues 14, 16): the GPU equivalence tests of the trainer's fast paths, the
# throughput benchmark on the Llama-3.2-1B shape, then the FSDP/DeepSpeed strategies against DDP. Run from the repository root on a CUDA machine with the
# project installed (pip install -e '.[test]'; flash-attn and liger-kernel when their paths are to be checked):
#     scripts/gpu_check.sh [OUTDIR]
# Figures land in OUTDIR (default ./gpu-check): pytest's report and the benchmark's output.
set -uo pipefail
out=${1:-gpu-check}
mkdir -p "$out"
python - <<'PY' | tee "$out/device.txt"
import importlib.util, torch
print("cuda", torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else "-")
for pkg in ("flash_attn", "liger_kernel", "triton"):
    print(pkg, importlib.util.find_spec(pkg) is not None)
PY
# The tests that skip without a GPU (with their reason) run here; -rs lists any that still skip, and why.
python -m pytest -q -rs -p no:cacheprovider tests/trainer/test_fastpath.py tests/trainer/test_padding_free.py \
    2>&1 | tee "$out/tests.txt"
tests=${PIPESTATUS[0]}
python -m bench.train_throughput --preset gpu 2>&1 | tee "$out/train_throughput.txt"
bench=${PIPESTATUS[0]}
# FSDP (LoRA, full, CPU offload) and DeepSpeed ZeRO 2/3 against DDP's losses (issue 16).
python -m bench strategies 2>&1 | tee "$out/strategies.txt"
strategies=${PIPESTATUS[0]}
echo "tests exit $tests, bench exit $bench, strategies exit $strategies" | tee "$out/summary.txt"
exit $(( tests || bench || strategies ))

#!/usr/bin/env bash
# The GPU checks in one command, for a machine with a CUDA GPU (CI has none and never runs this):
#
#   bash tests/gpu_check.sh        # logs and bench JSON under $OUT, else ./gpu_check_out
#
# 1. builds the CUDA kernels (TORCH_CUDA_ARCH_LIST defaults to 9.0, Hopper);
# 2. runs every gpu-marked test: the CUDA kernels against the torch reference, a default step() of every
#    optimizer under torch.cuda.set_sync_debug_mode("error"), CUDA-graph replay of the device scalars,
#    the Triton kernels compiled (fp32/bf16 and int8/bf16 state), Triton Newton-Schulz;
# 3. runs `shardopt bench --device cuda` (its defaults fit an 80 GB GPU).
# Each phase has its own time limit (GPU_BUILD_S, GPU_TESTS_S, GPU_BENCH_S seconds), so a slow phase still
# leaves the others' output; the exit status is 0 only when every phase passed. The default limits (150, 240
# and 150 s) keep the whole script inside one 10-minute command.
# It runs from the source tree (PYTHONPATH), so nothing needs installing beside torch and pytest.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-gpu_check_out}
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-/tmp/shardopt_gpu_check_ext}
unset TRITON_INTERPRET

python - <<'EOF' 2>&1 | tee "$out/env.txt" || exit 2
import sys, torch
print("torch", torch.__version__, "CUDA", torch.version.cuda)
if not torch.cuda.is_available():
    sys.exit("gpu_check: torch sees no CUDA device; this script is for a GPU machine")
print(torch.cuda.get_device_name(0), f"{torch.cuda.mem_get_info()[1] / 2**30:.0f} GiB")
EOF

rc=0
phase() {  # phase NAME SECONDS COMMAND...: one phase, its log in $out/NAME.log
  local name=$1 secs=$2
  shift 2
  echo "== gpu_check: $name (at most ${secs} s)"
  local t0=$SECONDS
  timeout "$secs" "$@" 2>&1 | tee "$out/$name.log"
  local st=$?
  echo "== gpu_check: $name exit $st after $((SECONDS - t0)) s" | tee -a "$out/summary.txt"
  [ "$st" -eq 0 ] || rc=1
}

phase build "${GPU_BUILD_S:-150}" python -c "
from shardopt.kernels import cuda
ok = cuda.available()
print('cuda kernels available:', ok, cuda.build_error() or '')
raise SystemExit(0 if ok else 1)"
phase tests "${GPU_TESTS_S:-240}" python -m pytest -q -m gpu -rs -p no:cacheprovider \
  tests/test_kernels_cuda.py tests/test_kernels_triton.py tests/test_kernels_triton_state.py tests/test_triton_ns.py
phase bench "${GPU_BENCH_S:-150}" python -m shardopt bench --device cuda --iters "${GPU_BENCH_ITERS:-11}" \
  --json "$out/bench_cuda.json"
exit $rc

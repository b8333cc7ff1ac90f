#!/usr/bin/env bash
# Every check and figure of the GPU path in one command, for a machine with one CUDA GPU, torch, triton and
# transformers installed. Logs and result files end up in one archive, $OUT/gpu_check.tar.gz, beside a summary
# (summary.txt) of every part's last lines (OUT defaults to benchmarks/results/gpu-<date>); each part has
# its own time limit (26 minutes in all at most), so one that hangs does not take the others, and the archive is
# rewritten after every part, so a run stopped from outside keeps what the finished parts wrote. Name parts to run
# some of them (build first on a fresh machine), e.g. in three calls of under 10 minutes each:
#
#     bash benchmarks/gpu_check.sh build kernel_tests attention
#     bash benchmarks/gpu_check.sh decode codec
#     bash benchmarks/gpu_check.sh musicgen
#
# 1. build vivace._C for this machine's Python (setuptools, wheel and pybind11 must be installed: no build isolation)
# 2. the Triton kernel tests at full shapes on the GPU (tests/kernel_device.py)
# 3. decode-attention bandwidth against the measured copy bandwidth (benchmarks/gpu_attention.py)
# 4. a paper-size MusicLM pipeline in bf16: per step / device loop / CUDA graphs, graph tokens checked against the
#    eager loop (benchmarks/gpu_decode.py)
# 5. codec decoders on the GPU: torch eager, torch.compile, CUDA graphs (benchmarks/codec_speed.py)
# 6. MusicGen-small-shaped decoding against transformers' generate on the same GPU (python -m benchmarks musicgen)
# 7. the paper-size MusicLM suite on the GPU: per-stage steps, time to first audio, throughput by batch (musiclm)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/gpu-$(date +%F)}
mkdir -p "$OUT"
LOGS=$(mktemp -d)
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
status=0

part() {  # part NAME SECONDS COMMAND...: runs COMMAND with a time limit, its output in the archive's NAME.log
    local name=$1 limit=$2
    shift 2
    echo "== $name (limit ${limit} s)"
    local start=$SECONDS
    timeout "$limit" "$@" >"$LOGS/$name.log" 2>&1
    local rc=$?
    tail -n 25 "$LOGS/$name.log"
    echo "== $name: exit $rc after $((SECONDS - start)) s"
    [ $rc -eq 0 ] || status=1
    archive
}

archive() {  # this run's result files and every log so far, in one archive
    find benchmarks/results -maxdepth 1 -name '*.json' -newer "$LOGS/.start" -exec cp {} "$LOGS/" \;
    tar -czf "$OUT/gpu_check.tar.gz" -C "$LOGS" .
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >"$LOGS/gpu.txt" 2>&1
touch "$LOGS/.start"  # result files newer than this are this run's
exec > >(tee "$OUT/summary.txt") 2>&1
export NPY_NUM_BUILD_JOBS=$(nproc)  # setup.py compiles csrc/*.cpp in parallel
for name in "${@:-build kernel_tests attention decode codec musicgen musiclm}"; do for name in $name; do case $name in
  build) part build 240 $PY -m pip install -q --no-build-isolation --no-deps -e . ;;
  kernel_tests) part kernel_tests 240 env VIVACE_TEST_DEVICE=cuda $PY -m pytest -q -x -p no:cacheprovider \
      tests/test_triton_attention.py tests/test_triton_fused.py tests/test_triton_sampling.py ;;
  attention) part attention 90 $PY benchmarks/gpu_attention.py ;;
  decode) part decode 240 $PY -m benchmarks.gpu_decode --preset paper --dtype bfloat16 --seconds 2 \
      --steps-per-sync 64 --repeats 1 --out "$LOGS/gpu_decode.json" ;;
  codec) part codec 150 $PY -m benchmarks.codec_speed --device cuda --compile --presets paper encodec32 --repeats 3 ;;
  musicgen) part musicgen 300 $PY -m benchmarks musicgen --device cuda --work-dir /tmp/vivace-bench ;;
  musiclm) part musiclm 300 $PY -m benchmarks musiclm --device cuda --work-dir /tmp/vivace-bench ;;
  *) echo "unknown part $name (build kernel_tests attention decode codec musicgen musiclm)"; exit 2 ;;
esac; done; done
exit $status

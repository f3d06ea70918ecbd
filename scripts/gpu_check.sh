#!/usr/bin/env bash
# What a CUDA machine is for, in parts that each fit one 10-minute command:
#
#   scripts/gpu_check.sh tests [OUT]   # the default job, then the gpu-marked tests (FSDP for
#                                      # every method, compiled kernels' parity on CUDA) (~3 min)
#   scripts/gpu_check.sh bench [OUT] [bench_gpu.py args]  # the packed-conv timings, then
#                                      # bench_gpu.py's full plan (< 8 min) by default
#   scripts/gpu_check.sh all [OUT]     # tests, then as much of the bench plan as fits, then the
#                                      # default job, inside GPU_CHECK_SECONDS (570) in all
#
# Logs and tables go to OUT (default: $OUT when set, else ./gpu_check_out). Wheels the GPU image
# lacks (hydra-core, omegaconf, datasets, trl and their needs) are installed from ./.whl when
# that folder exists (see docs/performance.md, "Measuring on a GPU").
set -uo pipefail
part="${1:?usage: scripts/gpu_check.sh tests|bench|all [OUT] [bench_gpu.py args]}"
out="${2:-${OUT:-gpu_check_out}}"
shift $(( $# < 2 ? $# : 2 ))
deadline=$(( $(date +%s) + ${GPU_CHECK_SECONDS:-570} ))
mkdir -p "$out"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
# ptlight itself, editable: its plugins (objectives, rewards, tasks) are entry points
python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . || exit 1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv >"$out/gpu.txt" 2>&1
python3 -c "import torch, transformers, lightning; print(torch.__version__, transformers.__version__, lightning.__version__)" >>"$out/gpu.txt" 2>&1
gpu_tests() {  # the tests are correctness checks: 6 workers share the card
    timeout "$1" python3 -m pytest -q -n 6 -m gpu -p no:cacheprovider tests/test_fsdp.py \
        tests/test_compile.py tests/test_fastpath.py tests/test_masks.py tests/test_norms.py \
        tests/test_flex.py tests/test_train.py tests/test_fused_proj.py \
        >"$out/gpu_tests.log" 2>&1
    echo "gpu tests: rc=$?" | tee -a "$out/gpu_tests.log"
    tail -25 "$out/gpu_tests.log"
}
default_job() {  # whole process, shipped defaults; its run dir stays out of OUT (files back are few)
    start=$(date +%s)
    timeout "$1" python3 -m ptlight hydra.run.dir=/tmp/gpu_check_default_job \
        >"$out/default_job.log" 2>&1
    echo "default job: rc=$? $(( $(date +%s) - start )) s wall" | tee -a "$out/default_job.log"
    grep -E -A7 "gold metric|Error" "$out/default_job.log" | tail -24
}
bench() {  # fixtures and per-run files stay in /tmp; the tables and the log come back in OUT
    if [ "${GPU_CHECK_PACKED_CONV:-1}" = 1 ]; then  # 0: skip (measured on earlier runs)
        timeout 60 python3 scripts/bench_packed_conv.py --device cuda \
            --shapes 3x2048x1024,3x2048x2048 >"$out/packed_conv.txt" 2>&1
        cat "$out/packed_conv.txt"
    fi
    python3 scripts/bench_gpu.py --out /tmp/gpu_check_bench "$@" 2>&1 | tee "$out/bench.log"
    cp /tmp/gpu_check_bench/bench_gpu.json /tmp/gpu_check_bench/bench_gpu.md \
        /tmp/gpu_check_bench/profile_*.txt "$out/" 2>/dev/null
}
case "$part" in
    tests)  # the default job first: its wall time is the headline whole-process figure
        default_job 120
        gpu_tests $(( deadline - $(date +%s) ))
        ;;
    bench)
        bench "$@"
        ;;
    all)
        gpu_tests 150
        left=$(( deadline - $(date +%s) - 50 ))  # 50 s kept for the default job
        timeout "$left" python3 scripts/bench_gpu.py --out /tmp/gpu_check_bench \
            --budget $(( left - 115 )) --run-timeout 110 >"$out/bench.log" 2>&1
        echo "bench: rc=$?" | tee -a "$out/bench.log"
        cp /tmp/gpu_check_bench/bench_gpu.json /tmp/gpu_check_bench/bench_gpu.md "$out/" 2>/dev/null
        grep -E "pairs/s|failed|skipped|^==|^total|peak" "$out/bench.log"
        default_job $(( deadline - $(date +%s) ))
        ;;
    *)
        echo "unknown part $part: use tests, bench or all" >&2
        exit 2
        ;;
esac

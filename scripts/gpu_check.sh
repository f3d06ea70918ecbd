#!/usr/bin/env bash
# What a CUDA machine is for, in two parts that each fit one 10-minute command:
#
#   scripts/gpu_check.sh tests [OUT]   # gpu-marked tests (FSDP for every method, compiled
#                                      # kernels' parity on CUDA), then the default job (~3 min)
#   scripts/gpu_check.sh bench [OUT]   # scripts/bench_gpu.py's full plan (< 8 min)
#
# Logs and tables go to OUT (default: $OUT when set, else ./gpu_check_out). Wheels the GPU image
# lacks (hydra-core, omegaconf, datasets, trl and their needs) are installed from ./.whl when
# that folder exists (see docs/performance.md, "Measuring on a GPU").
set -uo pipefail
part="${1:?usage: scripts/gpu_check.sh tests|bench [OUT]}"
out="${2:-${OUT:-gpu_check_out}}"
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
case "$part" in
    tests)
        python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_fsdp.py tests/test_compile.py \
            tests/test_fastpath.py tests/test_masks.py \
            2>&1 | tee "$out/gpu_tests.log"
        timer=(); [ -x /usr/bin/time ] && timer=(/usr/bin/time -v)
        start=$(date +%s)
        "${timer[@]}" python3 -m ptlight hydra.run.dir="$out/default_job" \
            2>&1 | tail -60 | tee "$out/default_job.log"
        echo "default job: $(( $(date +%s) - start )) s wall" | tee -a "$out/default_job.log"
        ;;
    bench)
        python3 scripts/bench_gpu.py --out "$out" 2>&1 | tee "$out/bench.log"
        ;;
    *)
        echo "unknown part $part: use tests or bench" >&2
        exit 2
        ;;
esac

#!/usr/bin/env bash
# Wheels the lent GPU machines' image lacks (it has torch, transformers, lightning, peft, pyarrow,
# pandas, xxhash, ...; not hydra-core, omegaconf, datasets or trl), for Python 3.12 on x86-64,
# into ./.whl (git-ignored through .git/info/exclude), where scripts/gpu_check.sh installs them
# from. Run here, where the package registry is reachable; ~2 MB.
set -euo pipefail
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >>.git/info/exclude
mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d .whl \
    hydra-core==1.3.8 omegaconf==2.3.1 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 \
    trl==1.16.0
python3 -m pip wheel -q --no-deps -w .whl antlr4-python3-runtime==4.9.3  # an sdist only
ls .whl

"""ptlight.engine.memory: glibc's mmap threshold is pinned so that freed activation memory goes back
to the OS (peak RSS of a training step), unless the user set glibc's own variable."""

import os
import subprocess
import sys

import pytest

from helpers import REPO

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")

PROBE = """
import torch
from ptlight.engine.memory import pin_mmap_threshold
pinned = pin_mmap_threshold() if {pin} else None
def rss():
    return int(next(l for l in open('/proc/self/status') if l.startswith('VmRSS')).split()[1])
big = torch.ones(4 << 20); del big         # a 16 MiB free: glibc's dynamic threshold rises
base = rss()
# 40 x 4 MiB, like a step's activations, each followed by a small tensor that stays alive
# (optimiser state, logged metrics): no freed block is at the heap's top to be trimmed
pairs = [(torch.ones(1 << 20), torch.ones(1 << 12)) for _ in range(40)]
keep = [small for _, small in pairs]
del pairs
print(pinned, (rss() - base) // 1024)     # MB still resident after they were freed
"""


def _run(pin: bool, env_extra: dict | None = None) -> tuple[str, int]:
    env = {k: v for k, v in os.environ.items() if k != "MALLOC_MMAP_THRESHOLD_"}
    env.update(env_extra or {}, PYTHONPATH=str(REPO))
    out = subprocess.run([sys.executable, "-c", PROBE.format(pin=pin)], capture_output=True,
                         text=True, env=env, timeout=120, check=True)
    pinned, kept = out.stdout.split()
    return pinned, int(kept)


@pytest.mark.slow
def test_pinned_threshold_returns_freed_tensors_to_the_os():
    pinned, kept = _run(pin=True)
    assert pinned == str(128 * 1024)
    assert kept < 40  # of 160 MB allocated and freed
    _, kept_unpinned = _run(pin=False)  # glibc's default keeps them in the heap
    assert kept_unpinned > 120


def test_glibc_variable_set_by_the_user_is_left_alone():
    pinned, _ = _run(pin=True, env_extra={"MALLOC_MMAP_THRESHOLD_": "33554432"})
    assert pinned == "None"

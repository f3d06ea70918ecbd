"""optimizer_offload: AdamW's moments on disk update exactly as torch's fused AdamW."""

from __future__ import annotations

import os

import pytest
import torch

from ptlight.errors import ConfigError
from ptlight.engine.offload import DiskAdamW


def _params(seed: int = 0, dtype: torch.dtype = torch.float32) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    shapes = [(37, 29), (1000,), (3, 5, 7), (1,)]  # 1073, 1000, 105, 1 elements
    return [torch.nn.Parameter(torch.randn(s, generator=g).to(dtype)) for s in shapes]


def _groups(params: list[torch.nn.Parameter]) -> list[dict]:
    return [{"params": params[:2], "weight_decay": 0.1}, {"params": params[2:], "weight_decay": 0.0}]


def _steps(opt: torch.optim.Optimizer, params: list, start: int, n: int, sched=None) -> None:
    for k in range(start, start + n):
        g = torch.Generator().manual_seed(100 + k)
        for i, p in enumerate(params):
            # param 3 gets no gradient on odd steps: AdamW skips it, its step count too
            p.grad = None if (i == 3 and k % 2) else torch.randn(p.shape, generator=g).to(p.dtype)
        opt.step()
        if sched is not None:
            sched.step()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_disk_adamw_equals_fused_adamw_bitwise(tmp_path, dtype):
    ref_p, off_p = _params(dtype=dtype), _params(dtype=dtype)
    kw = dict(lr=1e-2, betas=(0.9, 0.95), eps=1e-8)
    ref = torch.optim.AdamW(_groups(ref_p), fused=True, **kw)
    # 256-byte chunks: every tensor but the scalar is streamed in several chunks
    off = DiskAdamW(_groups(off_p), offload_dir=str(tmp_path), chunk_bytes=256, **kw)
    lam = lambda s: 1.0 / (1 + s)  # noqa: E731  (the lr changes every step, as a schedule does)
    rs = torch.optim.lr_scheduler.LambdaLR(ref, lam)
    os_ = torch.optim.lr_scheduler.LambdaLR(off, lam)
    _steps(ref, ref_p, 0, 5, rs)
    _steps(off, off_p, 0, 5, os_)
    for a, b in zip(ref_p, off_p):
        assert torch.equal(a, b)
    for p in off_p:  # the moments are not in memory
        assert set(off.state[p]) == {"step"}
    assert os.fstat(off._fd).st_size == 2 * sum(p.numel() * p.element_size() for p in off_p)
    assert not list(tmp_path.iterdir())  # the file is unlinked: nothing is left behind


def test_state_dict_round_trip_and_plain_adamw_checkpoints(tmp_path):
    kw = dict(lr=1e-2, betas=(0.9, 0.95))
    ref_p, off_p = _params(), _params()
    ref = torch.optim.AdamW(_groups(ref_p), fused=True, **kw)
    off = DiskAdamW(_groups(off_p), offload_dir=str(tmp_path), chunk_bytes=512, **kw)
    _steps(ref, ref_p, 0, 3)
    _steps(off, off_p, 0, 3)

    sd_ref, sd_off = ref.state_dict(), off.state_dict()
    assert sd_ref["param_groups"] == sd_off["param_groups"]
    assert sd_ref["state"].keys() == sd_off["state"].keys()
    for i, st in sd_ref["state"].items():
        assert st.keys() == sd_off["state"][i].keys()
        for k in st:
            assert torch.equal(st[k], sd_off["state"][i][k]), (i, k)
    for p in off_p:  # saving read the moments for the state dict only
        assert set(off.state[p]) == {"step"}

    # a checkpoint of plain fused AdamW resumes in DiskAdamW, and vice versa
    resumed_p = [torch.nn.Parameter(p.detach().clone()) for p in ref_p]
    resumed = DiskAdamW(_groups(resumed_p), offload_dir=str(tmp_path), **kw)
    resumed.load_state_dict(torch.load(_save(sd_ref, tmp_path), weights_only=True))
    back_p = [torch.nn.Parameter(p.detach().clone()) for p in off_p]
    back = torch.optim.AdamW(_groups(back_p), fused=True, **kw)
    back.load_state_dict(torch.load(_save(sd_off, tmp_path), weights_only=True))
    for opt, params in ((ref, ref_p), (resumed, resumed_p), (back, back_p)):
        _steps(opt, params, 3, 3)
    for a, b, c in zip(ref_p, resumed_p, back_p):
        assert torch.equal(a, b) and torch.equal(a, c)


def _save(sd: dict, tmp_path) -> str:
    path = str(tmp_path / "opt.pt")
    torch.save(sd, path)
    return path


def test_bad_offload_dir_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="optimizer_offload=.*not a directory"):
        DiskAdamW(_params(), offload_dir=str(tmp_path / "missing"))
    with pytest.raises(ConfigError, match="amsgrad"):
        DiskAdamW(_params(), offload_dir=str(tmp_path), amsgrad=True)


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_dpo_run_with_optimizer_offload_equals_the_run_without(compose_cfg, tmp_path, precision):
    """Through ``train_stage`` and Lightning (gradient clipping on; bf16-mixed goes through
    the mixed-precision plugin): the same weights after 4 steps, and the last checkpoint holds
    a standard AdamW state equal to the in-RAM run's."""
    from safetensors.torch import load_file

    from ptlight.train import train_stage
    from tests.helpers import TINY

    offload = tmp_path / "moments"
    offload.mkdir()
    runs = {}
    for name, extra in (("ram", []), ("disk", [f"optimizer_offload={offload}"])):
        cfg = compose_cfg("method=dpo", "eval.before=false", "eval.val_samples=0", *TINY,
                          "trainer.max_steps=4", f"trainer.precision={precision}",
                          "trainer.gradient_clip_val=1.0", *extra)
        train_stage(cfg, tmp_path / name)
        runs[name] = tmp_path / name
    a, b = (load_file(str(runs[n] / "export" / "model.safetensors")) for n in ("ram", "disk"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    ckpt = {n: torch.load(runs[n] / "checkpoints" / "last.ckpt", weights_only=False)
            ["optimizer_states"][0] for n in runs}
    assert ckpt["ram"]["state"].keys() == ckpt["disk"]["state"].keys()
    for i, st in ckpt["ram"]["state"].items():
        for k in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(st[k], ckpt["disk"]["state"][i][k]), (i, k)
    assert not list(offload.iterdir())  # the moments file is gone with the run

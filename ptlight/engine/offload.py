"""AdamW with its moments on disk (root key ``optimizer_offload``).

Full fine-tuning in fp32 holds 16 bytes a parameter: weights, gradients and AdamW's two
moments. The moments are half of it, and the optimiser step is the only code that reads them.
:class:`DiskAdamW` keeps them in one file instead (unlinked at creation, so nothing is left
behind, even after a crash) and streams them through two small buffers during the step:
read a chunk of ``exp_avg``/``exp_avg_sq``, run torch's fused AdamW kernel on the matching
slice of the parameter and gradient, write the chunk back. A background thread reads the
next chunk and writes the previous one while the kernel runs. This is DeepSpeed
ZeRO-Infinity's optimiser offload to NVMe, for a CPU run; DeepSpeed itself does not offload
a CPU-only run, and torchao's offload optimiser moves GPU state to the CPU, not to disk.

Exactness: the fused kernel is elementwise, so chunks of a tensor update exactly as the whole
tensor does: every value equals ``torch.optim.AdamW(fused=True)``'s bit for bit
(``tests/test_offload.py``), including after a checkpoint round trip.

Costs: the process's resident memory loses 8 bytes a parameter (plus ~64 MB of buffers); each
step reads and writes the moments once (2 × 8 bytes a parameter). The file goes through the
page cache, which the kernel reclaims under pressure and which is not the process's RSS.
``state_dict()`` (a checkpoint) reads the moments back into memory for the time of the save,
as a standard AdamW state dict, so checkpoints load into plain AdamW and back.
"""

from __future__ import annotations

import os
import tempfile
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch

from ptlight.errors import ConfigError

CHUNK_BYTES = 16 << 20  # per moment and buffer: 4 buffers of 16 MiB in flight


def _bytes(t: torch.Tensor) -> memoryview:
    """The tensor's storage as a writable byte view (contiguous CPU tensors only)."""
    return memoryview(t.view(torch.uint8).numpy()).cast("B")


def _pread(fd: int, t: torch.Tensor, offset: int) -> None:
    buf, done = _bytes(t), 0
    while done < len(buf):
        n = os.preadv(fd, [buf[done:]], offset + done)
        if n <= 0:
            raise OSError(f"optimizer_offload: short read at byte {offset + done} of the "
                          "moments file (was it truncated?)")
        done += n


def _pwrite(fd: int, t: torch.Tensor, offset: int) -> None:
    buf, done = _bytes(t), 0
    while done < len(buf):
        done += os.pwrite(fd, buf[done:], offset + done)


def offload_directory(value: Any) -> str:
    """The ``optimizer_offload`` directory, user-expanded; a :class:`ConfigError` unless it
    exists (``train_stage`` checks it before any weights load, :class:`DiskAdamW` again)."""
    directory = os.path.expanduser(str(value))
    if not os.path.isdir(directory):
        raise ConfigError(f"optimizer_offload={value!r} is not a directory: create it, or set "
                          "optimizer_offload=null to keep AdamW's moments in RAM")
    return directory


class DiskAdamW(torch.optim.AdamW):
    """``torch.optim.AdamW`` (fused kernel, decoupled weight decay) whose ``exp_avg`` and
    ``exp_avg_sq`` live in a file under ``offload_dir``; see the module docstring.

    ``step`` is kept in ``self.state[p]`` as usual (a float32 scalar tensor, as fused AdamW
    keeps it); the moments are not, except inside :meth:`state_dict`'s result.
    """

    def __init__(self, params: Any, *, offload_dir: str, chunk_bytes: int = CHUNK_BYTES,
                 **kwargs: Any) -> None:
        if kwargs.get("amsgrad"):
            raise ConfigError("optimizer_offload does not support amsgrad")
        kwargs.pop("fused", None), kwargs.pop("foreach", None)
        super().__init__(params, fused=True, **kwargs)  # the kernel step() runs per chunk
        # fused=True flags the optimiser as unscaling AMP gradients itself, and Lightning then
        # refuses gradient clipping under mixed precision. step() passes no grad_scale: the
        # precision plugin unscales (fp16) and clips before it, as for unfused AdamW.
        self._step_supports_amp_scaling = False
        for group in self.param_groups:
            for p in group["params"]:
                if type(p) is not torch.nn.Parameter or p.device.type != "cpu":
                    raise ConfigError(
                        "optimizer_offload streams AdamW's moments through CPU memory: it "
                        f"takes plain CPU parameters, got a {type(p).__name__} on "
                        f"{p.device} (FSDP and GPU runs: set optimizer_offload=null)")
        try:
            self._file = tempfile.TemporaryFile(dir=offload_directory(offload_dir),
                                                prefix="ptlight-adamw-")
        except OSError as e:
            raise ConfigError(f"optimizer_offload={offload_dir!r}: cannot create the moments "
                              f"file there ({e}); point it at a writable directory") from e
        # No __del__ here: Lightning's LightningOptimizer subclasses the optimizer's class and
        # shares its __dict__, so a __del__ would run when that wrapper goes and close the
        # file under the live optimiser. The file and the I/O thread go with their last user.
        self._fd = self._file.fileno()
        self._offsets: dict[torch.Tensor, int] = {}  # param -> byte offset of its exp_avg
        self._end = 0
        self._chunk_bytes = int(chunk_bytes)
        self._io = ThreadPoolExecutor(1, thread_name_prefix="ptlight-adamw-io")
        self._buffers: list[tuple[torch.Tensor, torch.Tensor]] = []  # 2 × (exp_avg, exp_avg_sq)

    # ---- the moments file ----------------------------------------------------------------
    def _slot(self, p: torch.Tensor) -> int:
        """Byte offset of ``p``'s moments (``exp_avg`` then ``exp_avg_sq``); a new slot is
        sparse zeros, which is what AdamW initialises the moments to."""
        if p not in self._offsets:
            self._offsets[p] = self._end
            self._end += 2 * p.numel() * p.element_size()
            os.ftruncate(self._fd, self._end)
        return self._offsets[p]

    def _transfer(self, io: Any, p: torch.Tensor, a: int, m: torch.Tensor,
                  v: torch.Tensor) -> None:
        """``io`` (:func:`_pread`: file -> ``m``/``v``, or :func:`_pwrite`) the moments of
        ``p`` from its element ``a`` on, as many elements as ``m`` holds."""
        off, es = self._slot(p), p.element_size()
        io(self._fd, m, off + a * es)
        io(self._fd, v, off + (p.numel() + a) * es)

    # ---- the step ------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        work = []  # (group, param, gradient, first element, end element), chunked
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("AdamW does not support sparse gradients")
                if not p.is_contiguous():
                    raise RuntimeError("optimizer_offload needs contiguous parameters")
                state = self.state[p]
                if "step" not in state:
                    state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
                state["step"] += 1  # once per step, as fused AdamW's _foreach_add_
                grad = p.grad.contiguous()
                self._slot(p)  # here, not in the I/O thread
                per_chunk = max(1, self._chunk_bytes // p.element_size())
                for a in range(0, p.numel(), per_chunk):
                    work.append((group, p, grad, a, min(p.numel(), a + per_chunk)))
        if not work:
            return loss

        need = max((b - a) * p.element_size() for _, p, _, a, b in work)
        if not self._buffers or self._buffers[0][0].numel() < need:  # main thread only
            self._buffers = [(torch.empty(need, dtype=torch.uint8),
                              torch.empty(need, dtype=torch.uint8)) for _ in range(2)]

        def moments(i: int) -> tuple[torch.Tensor, torch.Tensor]:
            _, p, _, a, b = work[i]
            nbytes = (b - a) * p.element_size()
            bm, bv = self._buffers[i % 2]
            return bm[:nbytes].view(p.dtype), bv[:nbytes].view(p.dtype)

        def transfer(i: int, io: Any) -> None:  # io: _pread (file -> buffers) or _pwrite
            self._transfer(io, work[i][1], work[i][3], *moments(i))

        pending: Future = self._io.submit(transfer, 0, _pread)
        writes: list[Future] = []
        for i, (group, p, grad, a, b) in enumerate(work):
            pending.result()
            if i + 1 < len(work):  # FIFO: chunk i-1's write (same buffer) finishes first
                pending = self._io.submit(transfer, i + 1, _pread)
            m, v = moments(i)
            beta1, beta2 = group["betas"]
            torch._fused_adamw_(
                [p.view(-1)[a:b]], [grad.view(-1)[a:b]], [m], [v], [], [self.state[p]["step"]],
                amsgrad=False, lr=group["lr"], beta1=beta1, beta2=beta2,
                weight_decay=group["weight_decay"], eps=group["eps"],
                maximize=group["maximize"], grad_scale=None, found_inf=None,
            )
            writes.append(self._io.submit(transfer, i, _pwrite))
        for f in writes:
            f.result()
        return loss

    # ---- checkpoints ---------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """A standard AdamW state dict: the moments are read back for it (memory for the
        time of a checkpoint save)."""
        sd = super().state_dict()
        index = 0
        for group in self.param_groups:
            for p in group["params"]:
                if p in self._offsets and index in sd["state"]:
                    m, v = (torch.empty_like(p, memory_format=torch.contiguous_format)
                            for _ in range(2))
                    self._transfer(_pread, p, 0, m, v)
                    sd["state"][index] = {**sd["state"][index], "exp_avg": m, "exp_avg_sq": v}
                index += 1
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        for p, state in self.state.items():
            if "exp_avg" in state:
                m, v = (state.pop(k).detach().to(p.dtype).contiguous()
                        for k in ("exp_avg", "exp_avg_sq"))
                self._transfer(_pwrite, p, 0, m, v)
                state["step"] = state["step"].to(torch.float32)  # as fused AdamW keeps it

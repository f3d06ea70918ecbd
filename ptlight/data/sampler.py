"""Data order that is a function of ``(seed, epoch)`` only, so a killed run resumes exactly.

:class:`ResumableSampler` is torch's :class:`~torch.utils.data.DistributedSampler` (epoch ``e``
draws a permutation that is a function of ``(seed, e)``, see :meth:`ResumableSampler.order`; rank ``r`` of ``W`` takes
positions ``r, r + W, ...``) that can start part-way into an epoch. Being a
``DistributedSampler``, Lightning leaves it in place under DDP/FSDP and calls ``set_epoch``
on it; one process is simply ``W = 1``. With ``W`` ranks of per-device batch ``b``, global
batch ``i`` holds the same examples as batch ``i`` of one process with batch ``W·b``.

:class:`ResumableLoader` is a ``DataLoader`` that counts the batches it has handed out in the
current epoch. Lightning stores ``state_dict()`` in every checkpoint (``loops.fit_loop.
combined_loader``) and hands it back through ``load_state_dict`` on resume, so the resumed
epoch skips exactly the batches the killed run had consumed. Lightning does not prefetch from
a loader with a length, so "handed out" equals "trained on" when the checkpoint is written.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, DistributedSampler


class ResumableSampler(DistributedSampler):
    """``DistributedSampler`` whose next iteration can skip its first ``skip`` indices."""

    def __init__(self, dataset: Any, *, num_replicas: int = 1, rank: int = 0,
                 shuffle: bool = True, seed: int = 0, drop_last: bool = False) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle,
                         seed=seed, drop_last=drop_last)
        self.skip = 0

    def order(self) -> list[int]:
        """The epoch's permutation of the whole data set (before rank subsampling).

        ``Generator().manual_seed(seed)`` replayed once per epoch up to this one, each time one
        int64 draw then ``randperm(N)``: epoch 0 is exactly the order of a plain
        ``DataLoader(shuffle=True, generator=Generator().manual_seed(seed))`` (which draws its
        workers' base seed first), so runs and figures made before resumable sampling keep
        their data order. Still a function of ``(seed, epoch)`` only.
        """
        n = len(self.dataset)  # type: ignore[arg-type]
        if not self.shuffle:
            return list(range(n))
        g = torch.Generator().manual_seed(self.seed)
        for _ in range(self.epoch + 1):
            torch.empty((), dtype=torch.int64).random_(generator=g)
            perm = torch.randperm(n, generator=g)
        return perm.tolist()

    def __iter__(self) -> Iterator[int]:
        skip, self.skip = self.skip, 0  # applies to one iteration only
        indices = self.order()
        if not self.drop_last:  # pad to a multiple of the ranks, as DistributedSampler does
            pad = self.total_size - len(indices)
            indices += (indices * math.ceil(pad / len(indices)))[:pad] if pad > 0 else []
        else:
            indices = indices[: self.total_size]
        mine = indices[self.rank : self.total_size : self.num_replicas]
        return itertools.islice(iter(mine), skip, None)


class ResumableLoader(DataLoader):
    """A ``DataLoader`` over a :class:`ResumableSampler` with Lightning's stateful-loader API."""

    sampler: ResumableSampler

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if not isinstance(self.sampler, ResumableSampler):
            raise TypeError("ResumableLoader needs sampler=ResumableSampler(...)")
        self._epoch, self._served = self.sampler.epoch, 0
        self._resume: dict[str, int] | None = None

    def __iter__(self) -> Iterator[Any]:
        sampler, epoch = self.sampler, self.sampler.epoch
        served = 0
        if self._resume is not None and self._resume["epoch"] == epoch:
            served = self._resume["batches"]
            sampler.skip = served * self.batch_size  # type: ignore[operator]
        self._resume = None
        self._epoch, self._served = epoch, served
        for batch in super().__iter__():
            self._served += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self._epoch, "batches": self._served}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self._resume = {"epoch": int(state["epoch"]), "batches": int(state["batches"])}

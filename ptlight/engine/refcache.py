"""Precomputed reference log-probs, cached on disk and keyed by what they depend on.

``method.reference=precompute`` scores the train and val sets once under the frozen reference.
Those numbers depend on the reference weights, the token ids of every row (which carry the
tokenizer, the chat template, the data, ``data.max_length`` and ``data.truncation``), the row
layout, the precision and the device type — not on ``beta``, the objective, the learning rate
or the step count. So the key is a hash of exactly the former, and a Hydra sweep over the
latter computes the reference once: every other job finds the file and skips the reference
forward entirely (``method.reference_cache``, default ``$PTLIGHT_CACHE`` or
``~/.cache/ptlight/reference``; null turns the cache off).

Files are ``<dir>/<key>.pt`` holding ``{"key", "meta", "train": [N, K], "val": [N, K]}``,
written to a temporary name in the same directory and renamed into place, so concurrent jobs
of a sweep never read a half-written file (two jobs that miss at once both compute; the second
rename wins with identical contents).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path

import torch

FORMAT = 1  # bump when the file layout or the meaning of the numbers changes


def _update_tensor(h: "hashlib._Hash", t: torch.Tensor) -> None:
    t = t.detach().to("cpu").contiguous()
    h.update(f"{t.dtype}{tuple(t.shape)}".encode())
    if t.numel():
        h.update(t.reshape(-1).view(torch.uint8).numpy())


def weights_fingerprint(named_tensors: Iterable[tuple[str, torch.Tensor]]) -> str:
    """blake2b of every (name, dtype, shape, bytes), in name order."""
    h = hashlib.blake2b(digest_size=20)
    for name, t in sorted(named_tensors, key=lambda kv: kv[0]):
        h.update(name.encode())
        _update_tensor(h, t)
    return h.hexdigest()


def batches_fingerprint(batches: Iterable[dict[str, torch.Tensor]]) -> str:
    """blake2b of the token ids, masks and example indices of every batch, in order."""
    h = hashlib.blake2b(digest_size=20)
    for batch in batches:
        for k in ("input_ids", "attention_mask", "loss_mask", "index"):
            _update_tensor(h, batch[k])
    return h.hexdigest()


def cache_key(**parts: str) -> str:
    """One hex key from named string parts (order-independent)."""
    blob = json.dumps({"format": FORMAT, **parts}, sort_keys=True)
    return hashlib.blake2b(blob.encode(), digest_size=20).hexdigest()


def cache_path(directory: str | os.PathLike, key: str) -> Path:
    return Path(directory).expanduser() / f"{key}.pt"


def load(directory: str | os.PathLike, key: str) -> dict[str, torch.Tensor] | None:
    """The cached ``{split: [N, K]}`` for ``key``, or None (missing or unreadable file)."""
    path = cache_path(directory, key)
    if not path.is_file():
        return None
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # a corrupt file is a miss; the next save replaces it
        return None
    if blob.get("key") != key:
        return None
    return {k: v for k, v in blob.items() if isinstance(v, torch.Tensor)}


def save(directory: str | os.PathLike, key: str, splits: dict[str, torch.Tensor],
         meta: dict[str, str]) -> Path:
    """Write atomically (temporary file in the same directory, then ``os.replace``)."""
    path = cache_path(directory, key)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{key}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save({"key": key, "meta": meta,
                        **{k: v.detach().cpu() for k, v in splits.items()}}, f)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path

"""Prefix sharing + padding-free packing of preference batches, exact for LFM2.

A pairwise batch holds every prompt twice (chosen block, rejected block) and pads every row to
the longest one. Here each example becomes one *group*: the token trie of its K rows — the
prompt once, then its K completions as branches, and where completions start with the same
tokens (a near-miss rejected answer often repeats the chosen one's first words) that common
start once too — laid out in depth-first preorder, and groups are packed back to back into
rows of at most ``max_tokens`` tokens (arXiv 2410.20305). Nothing any token
sees changes:

- attention: token i attends token j iff j is i itself or one of its ancestors (the prompt
  tokens before it, and the earlier tokens of its own branch) — never another branch, another
  group or padding (a 4-D boolean mask, one ``[N, N]`` block per row, built on the device from
  ``end``; in preorder, j is an ancestor of i iff ``j <= i < end(j)``, the end of j's
  subtree; with ``model.packed_attention=flex`` the same rule as a block-sparse FlexAttention
  ``BlockMask``, :mod:`ptlight.engine.flex`);
- positions: a token's depth in the trie, so each branch starts at ``|x|`` as it would after
  its prompt in its own row;
- LFM2's short convolutions (``conv_L_cache`` = 3 taps) read the *predecessor chain* of each
  token instead of the previous slots of the row: the first token of ``y_2`` sees the last
  prompt tokens, not the end of ``y_1``, and a group's first token sees zeros, not the group
  before it (:func:`tree_conv`);
- a completion token t is scored from the hidden state of its predecessor (the last prompt
  token for a branch's first token), exactly as the plain path scores it from position t−1.

So per-row log-probs equal the plain padded path within fp tolerance (tested in
``tests/test_fastpath.py``), while the prompt is run once per example and no padding is
computed except the tail of each packed row.

Supported: ``Lfm2ForCausalLM`` with ``sdpa`` or ``eager`` attention (also under LoRA, whose
layers are called as usual). :func:`supports_packing` says False for anything else and the
caller takes the plain path.
"""

from __future__ import annotations

import dataclasses
import types
from dataclasses import dataclass
from typing import Any

import torch

from ptlight.engine.compile import PACKED_CALL, is_compiled
from ptlight.engine.flex import tree_block_mask, uses_flex


def supports_packing(model) -> bool:
    """True for models whose forward this module can run packed (LFM2, sdpa/eager attention)."""
    cfg = getattr(model, "config", None)
    return (getattr(cfg, "model_type", None) == "lfm2"
            and getattr(cfg, "_attn_implementation", "sdpa") in ("sdpa", "eager"))


def base_forward(model, **kwargs):
    """``model``'s backbone output (``last_hidden_state`` and the rest) for ``kwargs``.

    The backbone (``model.<base_model_prefix>``) is called directly, skipping the LM head,
    except when ``model`` is an FSDP2 unit itself (``trainer=fsdp``): its parameters outside
    the decoder layers (embeddings, final norm, LM head) are gathered by hooks on *its*
    forward, so that forward runs, with ``logits_to_keep=1`` (one position through the head),
    and the backbone's output is taken from a forward hook. FSDP keeps the root unit's
    parameters gathered until the backward, so the caller's own head matmul can use them.
    """
    base = getattr(model, model.base_model_prefix)
    if base is model or not _is_fsdp_unit(model):
        return base(**kwargs)
    captured = []
    handle = base.register_forward_hook(lambda _m, _args, out: captured.append(out))
    try:
        model(**kwargs, logits_to_keep=1)
    finally:
        handle.remove()
    return captured[0]


def _is_fsdp_unit(model) -> bool:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # torch < 2.6 has no FSDP2 in this place; ptlight's FSDP needs it
        return False
    return isinstance(model, FSDPModule)


@dataclass
class PackedBatch:
    """Packed rows ``[R', N]`` plus the map back to the plain batch's completion tokens.

    input_ids, position_ids: ``[R', N]``. prev: ``[R', N]`` column of each token's predecessor
    in its own sequence (−1 at a group start and on padding). end: ``[R', N]`` the column after
    each token's subtree (padding: its own column + 1), from which :meth:`attention_mask` builds
    the ``[R', 1, N, N]`` boolean mask where it is used. src: ``[M]`` flat index (row·N + col) of the hidden
    state that predicts each target; targets ``[M]``; rows ``[M]`` the plain batch row of each
    target. Targets are in the plain path's order (row-major over ``loss_mask[:, 1:]``).
    positions: ``[U]`` the distinct values of ``src`` (a shared trie node predicts the next
    token of every row through it, so the LM head runs once per node), sorted; inverse:
    ``[M]`` where each target's ``src`` sits in ``positions``.

    Built on the host (:func:`pack`, in the collate when the method asks for it: see
    :attr:`ptlight.data.module.PtlDataModule.pack_rows`), it reaches the device with the batch
    and the packed forward needs no host round trip.
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    prev: torch.Tensor
    end: torch.Tensor
    src: torch.Tensor
    targets: torch.Tensor
    rows: torch.Tensor
    positions: torch.Tensor
    inverse: torch.Tensor
    num_tokens: int  # real (non-padding) tokens the packed forward runs
    # most tokens that have one token as their d-th predecessor, for any d: 1 where no trie
    # node branches, else K (a node's descendants at one depth lie on distinct completions)
    fanout: int = 1

    def attention_mask(self) -> torch.Tensor:
        """``[R', 1, N, N]`` bool: i may attend j iff j is i or an ancestor of i, i.e.
        ``j <= i < end(j)`` in preorder."""
        col = torch.arange(self.end.shape[1], device=self.end.device)
        return ((col[None, :, None] >= col[None, None, :])
                & (col[None, :, None] < self.end[:, None, :]))[:, None]

    def _tensors(self) -> list[str]:
        return [f.name for f in dataclasses.fields(self)
                if isinstance(getattr(self, f.name), torch.Tensor)]

    def to(self, device: torch.device | str, non_blocking: bool | None = None) -> PackedBatch:
        """The same layout with every tensor on ``device``. Copies to a CUDA device are
        non-blocking unless told otherwise, as Lightning makes them for the batch's tensors
        (it calls this ``to`` without the argument): a blocking copy would hold the host until
        the previous step's kernels had run, with nothing of the next step queued."""
        if non_blocking is None:
            non_blocking = torch.device(device).type == "cuda"
        return dataclasses.replace(self, **{
            name: getattr(self, name).to(device, non_blocking=non_blocking)
            for name in self._tensors()})

    def pin_memory(self) -> PackedBatch:
        """The same layout in page-locked host memory (``data.pin_memory``: the DataLoader
        pins what it yields, and a pinned copy to the GPU never waits on it)."""
        return dataclasses.replace(self, **{name: getattr(self, name).pin_memory()
                                            for name in self._tensors()})


def _groups(input_ids: torch.Tensor, attention_mask: torch.Tensor, loss_mask: torch.Tensor,
            k: int) -> list[tuple[list[int], list[tuple[int, list[int]]]]]:
    """Plain rows ``[K·B, T]`` -> per example ``(prompt, [(row, completion), ...])``.

    Rows b, B+b, ..., (K−1)B+b form example b (the collate's block layout). When their prompts
    differ (e.g. KTO's mismatched block) each row becomes its own group: packed, not shared.
    """
    ids, attn, lm = input_ids.tolist(), attention_mask.bool().tolist(), loss_mask.bool().tolist()
    n_rows = len(ids)
    b = n_rows // k
    rows = []
    for r in range(n_rows):
        prompt = [t for t, a, m in zip(ids[r], attn[r], lm[r]) if a and not m]
        completion = [t for t, a, m in zip(ids[r], attn[r], lm[r]) if a and m]
        n_prompt = next((i for i, m in enumerate(lm[r]) if m), len(lm[r]))
        if prompt != [t for t, a in zip(ids[r][:n_prompt], attn[r][:n_prompt]) if a]:
            raise ValueError("packing needs each row to be its prompt followed by its completion")
        rows.append((prompt, completion))
    groups = []
    for e in range(b):
        members = [e + j * b for j in range(k)]
        if all(rows[r][0] == rows[members[0]][0] for r in members):
            groups.append((rows[members[0]][0], [(r, rows[r][1]) for r in members]))
        else:
            groups.extend((rows[r][0], [(r, rows[r][1])]) for r in members)
    return groups


def _trie(prompt: list[int], branches: list[tuple[int, list[int]]]
          ) -> tuple[list[int], list[int], list[int], list[int], list[tuple[int, int, int]]]:
    """One group as a token trie laid out in depth-first preorder.

    Returns per node: token, parent (−1: root), depth (= position id), subtree end (exclusive,
    in preorder indices); and per scored token, in branch then token order:
    ``(plain row, predicting node, target)``. Rows that start alike (the prompt, and any
    common start of the completions) share their nodes.
    """
    tokens, parent, children = [], [], []

    def child(node: int, token: int) -> int:
        kids = children[node] if node >= 0 else root
        if token not in kids:
            kids[token] = len(tokens)
            tokens.append(token)
            parent.append(node)
            children.append({})
        return kids[token]

    root: dict[int, int] = {}
    node = -1
    for t in prompt:
        node = child(node, t)
    last_prompt = node
    paths = []
    for row, completion in branches:
        node, path = last_prompt, []
        for t in completion:
            node = child(node, t)
            path.append(node)
        paths.append((row, path))
    # depth-first preorder: ancestors come first and every subtree is one interval
    order, stack = [], list(reversed(root.values()))
    while stack:
        n = stack.pop()
        order.append(n)
        stack.extend(reversed(children[n].values()))
    new = {old: i for i, old in enumerate(order)}
    depth, end = [0] * len(order), [0] * len(order)
    for i, old in enumerate(order):
        depth[i] = depth[new[parent[old]]] + 1 if parent[old] >= 0 else 0
    for i in range(len(order) - 1, -1, -1):  # subtree end: after the last descendant
        end[i] = max([i + 1] + [end[new[c]] for c in children[order[i]].values()])
    scored = []
    for row, path in paths:
        before = new[last_prompt] if last_prompt >= 0 else -1
        for old in path:
            if before >= 0:
                scored.append((row, before, tokens[old]))
            before = new[old]
    return ([tokens[o] for o in order], [new[parent[o]] if parent[o] >= 0 else -1 for o in order],
            depth, end, scored)


def pack(input_ids: torch.Tensor, attention_mask: torch.Tensor, loss_mask: torch.Tensor,
         k: int, max_tokens: int = 2048, pad_id: int = 0, multiple_of: int = 1) -> PackedBatch:
    """Pack a plain batch (rows ``[K·B, T]``, right padding, K completions per example).

    ``multiple_of``: the packed row width is rounded up to a multiple of it (padding that sees
    only itself), so that batches repeat a few shapes: compiled kernels and attention plans are
    reused instead of built for every new width.
    """
    if multiple_of < 1:
        raise ValueError(f"multiple_of={multiple_of} must be >= 1")
    groups = [_trie(prompt, branches)
              for prompt, branches in _groups(input_ids, attention_mask, loss_mask, k)]
    # first fit, in order: a group longer than max_tokens gets a row of its own
    bins: list[list[int]] = []
    lengths: list[int] = []
    for g, group in enumerate(groups):
        n = len(group[0])
        for i in range(len(bins)):
            if lengths[i] + n <= max_tokens:
                bins[i].append(g)
                lengths[i] += n
                break
        else:
            bins.append([g])
            lengths.append(n)
    width = -(-max(lengths) // multiple_of) * multiple_of
    n_rows = len(bins)
    ids = [[pad_id] * width for _ in range(n_rows)]
    pos = [[0] * width for _ in range(n_rows)]
    prev = [[-1] * width for _ in range(n_rows)]
    end = [list(range(1, width + 1)) for _ in range(n_rows)]  # padding: sees only itself
    scored = []  # (plain row, flat src, target)
    for row, members in enumerate(bins):
        off = 0
        for g in members:
            tokens, parent, depth, stop, group_scored = groups[g]
            n = len(tokens)
            ids[row][off : off + n] = tokens
            pos[row][off : off + n] = depth
            prev[row][off : off + n] = [p + off if p >= 0 else -1 for p in parent]
            end[row][off : off + n] = [e + off for e in stop]
            scored += [(r, row * width + off + src, t) for r, src, t in group_scored]
            off += n
    scored.sort(key=lambda x: x[0])  # stable: plain row order, then token order
    device = input_ids.device
    as_long = lambda x: torch.tensor(x, dtype=torch.long, device=device)  # noqa: E731
    src = as_long([s for _, s, _ in scored])
    positions, inverse = torch.unique(src, return_inverse=True)
    parents = [p for group in groups for p in group[1] if p >= 0]
    branching = len(set(parents)) < len(parents)  # some node has two children
    return PackedBatch(
        input_ids=as_long(ids), position_ids=as_long(pos), prev=as_long(prev),
        end=as_long(end), src=src,
        targets=as_long([t for _, _, t in scored]), rows=as_long([r for r, _, _ in scored]),
        positions=positions, inverse=inverse, num_tokens=sum(lengths),
        fanout=k if branching else 1,
    )


def pack_checked(input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 loss_mask: torch.Tensor, k: int, max_tokens: int = 2048,
                 multiple_of: int = 1) -> PackedBatch:
    """:func:`pack`, refusing a layout whose targets are not the plain batch's completion
    tokens in the plain order (a batch the packer does not understand)."""
    packed = pack(input_ids, attention_mask, loss_mask, k, max_tokens, multiple_of=multiple_of)
    if not torch.equal(packed.targets, input_ids[:, 1:][loss_mask[:, 1:].bool()]):
        raise ValueError("packed targets differ from the plain batch's completion tokens")
    return packed


@dataclass
class RolloutLayout:
    """A rollout batch packed for scoring (:func:`rollout_layout`): each prompt once with its
    ``group`` completions as branches, nothing after a completion's EOS."""

    packed: PackedBatch
    mask: torch.Tensor  # [n, N] the completion tokens up to each EOS, rows in block order
    group: int

    def dense(self, values: torch.Tensor) -> torch.Tensor:
        """``[M]`` per-token values (the packed targets' order) as ``[n, N]`` in the
        rollout's row order, 0 after each completion's EOS."""
        n = self.mask.shape[0]
        blocks = torch.zeros(self.mask.shape, dtype=values.dtype, device=values.device)
        blocks = blocks.masked_scatter(self.mask, values)
        return blocks.view(self.group, n // self.group, -1).transpose(0, 1).reshape(n, -1)


def rollout_layout(input_ids: torch.Tensor, attention_mask: torch.Tensor, n_prompt: int,
                   group: int, max_tokens: int = 2048) -> RolloutLayout:
    """Pack rollout rows (``[n, P + N]``: ``group`` contiguous completions of each left-padded
    prompt, the attention mask ending at each completion's EOS) as :func:`pack` reads K
    blocks (row g·B + p: completion g of prompt p)."""
    n = input_ids.shape[0]
    to_blocks = torch.arange(n, device=input_ids.device).view(n // group, group).t().reshape(-1)
    ids, attn = input_ids[to_blocks], attention_mask[to_blocks]
    loss_mask = attn.clone()
    loss_mask[:, :n_prompt] = 0  # the completion tokens up to each row's EOS
    packed = pack_checked(ids, attn, loss_mask, group, max_tokens)
    return RolloutLayout(packed, loss_mask[:, n_prompt:].bool(), group)


def chain_taps(prev: torch.Tensor, k: int) -> torch.Tensor:
    """``[K−1, R·N]`` flat source row of each token's 1st … (K−1)-th predecessor along its chain
    (``prev``: ``[R, N]``, −1: none), farthest first, for :func:`tree_conv`; a missing
    predecessor points at row ``R·N``, the zero row :func:`tree_conv` appends. Index work
    only, done once per packed forward and shared by every convolution layer."""
    r, n = prev.shape
    base = torch.arange(r, device=prev.device)[:, None] * n
    near = torch.where(prev >= 0, prev + base, r * n).reshape(-1)
    if k < 2:  # a one-tap kernel reads the token alone
        return near.new_empty(0, r * n)
    step = torch.cat([near, near.new_full((1,), r * n)])  # the zero row's predecessor: itself
    taps = [near]
    for _ in range(k - 2):
        taps.append(step.index_select(0, taps[-1]))
    return torch.stack(taps[::-1])


def tap_readers(taps: torch.Tensor, fanout: int) -> torch.Tensor:
    """``[K−1, R·N + 1, fanout]``: for each tap of :func:`chain_taps` and each row of
    :func:`tree_conv`'s flat input (the zero row last), the positions that read that row
    through the tap, ascending, padded with ``R·N`` (a zero gradient row). ``fanout``: at most
    this many positions read one token through one tap (:attr:`PackedBatch.fanout`); checked
    on the device, without a host read. Index work only, once per packed forward."""
    t = taps.shape[1]
    pos = torch.arange(t, device=taps.device)
    tables = []
    for index in taps:
        order = torch.argsort(index, stable=True)
        src = index[order]
        rank = pos - torch.searchsorted(src, src)  # place among the readers of the same row
        # the zero row's readers (tokens without that predecessor) are any number: its
        # gradient is dropped, so the ones past ``fanout`` go to a spare row
        torch._assert_async(((rank < fanout) | (src == t)).all(),
                            "a token is read through one tap more than fanout times")
        table = torch.full((t + 2, fanout), t, dtype=torch.long, device=taps.device)
        table[torch.where(rank < fanout, src, t + 1), rank.clamp(max=fanout - 1)] = order
        tables.append(table[: t + 1])
    return torch.stack(tables) if tables else taps.new_empty(0, t + 1, fanout)


# Devices whose packed convolutions take the gathering backward (:class:`_TapGather`). None
# yet: on the CPU it is the slower one (``scripts/bench_packed_conv.py``: 159 vs 107 ms fp32 at
# 4×2048×1024, 57 vs 34 ms bf16, 2026-11-27, 2-core AMD EPYC), and on a GPU, where it would
# replace bf16 atomic adds, it is not yet measured (that script's ``--device cuda`` run, the
# first part of ``scripts/gpu_check.sh bench``, times both).
GATHER_BACKWARD_DEVICES: tuple[str, ...] = ()


class _TapGather(torch.autograd.Function):
    """``flat.index_select(0, index)`` whose backward gathers instead of scattering: each
    row's gradient is the sum of the gradients of the positions that read it (``readers``,
    :func:`tap_readers`), added in ascending position order as ``index_add`` adds them, so
    the result is bitwise the same. ``index_add`` would scatter with atomic adds on a GPU,
    which for bf16 are compare-and-swap loops (≈60 µs a call at the LFM2-350M shape,
    20 calls a step, in the H200 profile), and whose order varies from run to run."""

    @staticmethod
    def forward(ctx, flat: torch.Tensor, index: torch.Tensor, readers: torch.Tensor
                ) -> torch.Tensor:
        ctx.save_for_backward(readers)
        return flat.index_select(0, index)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (readers,) = ctx.saved_tensors
        padded = torch.cat([grad, grad.new_zeros(1, grad.shape[1])])  # row R·N: no reader
        out = padded.index_select(0, readers[:, 0])
        for m in range(1, readers.shape[1]):
            out = out + padded.index_select(0, readers[:, m])
        return out, None, None


def tree_conv(x: torch.Tensor, taps: torch.Tensor, weight: torch.Tensor,
              bias: torch.Tensor | None, readers: torch.Tensor | None = None) -> torch.Tensor:
    """Causal depthwise convolution along each token's predecessor chain.

    x: ``[R, N, D]`` (tokens in rows, channels last, as the layer's projections produce and
    consume them); taps: :func:`chain_taps` of the rows' ``prev``; weight: ``[D, K]``
    (``nn.Conv1d`` taps, the last one on the token itself). Equals
    ``F.conv1d(x.mT, w, padding=K−1)[..., :N].mT`` when ``prev[t] = t−1`` with −1 at sequence
    starts, i.e. zero padding before each sequence. Each tap is one row gather
    (``index_select`` of whole channel vectors) and one fused multiply-add. ``readers``
    (:func:`tap_readers` of ``taps``): the gathers' backward gathers too (:class:`_TapGather`,
    bitwise the same gradients); without it, it scatters (``index_add``).
    """
    r, n, d = x.shape
    k = weight.shape[-1]
    flat = torch.cat([x.reshape(r * n, d), x.new_zeros(1, d)])  # row r·n: "no token"
    w = weight.to(x.dtype)
    out = (x * w[:, k - 1] if bias is None
           else torch.addcmul(bias.to(x.dtype), x, w[:, k - 1]))
    for j in range(k - 1):
        tap = (flat.index_select(0, taps[j]) if readers is None
               else _TapGather.apply(flat, taps[j], readers[j]))
        out = torch.addcmul(out, tap.view(r, n, d), w[:, j])
    return out


@dataclass(frozen=True)
class ConvChain:
    """What a packed forward hands LFM2's conv layers in place of their padding mask: the
    :func:`chain_taps` of the rows' predecessor columns for the model's kernel size. Passed
    as the ``"conv"`` entry of the model's per-layer-type mask mapping, it travels with the
    layer's arguments, so a recomputation under gradient checkpointing (which replays those
    arguments in the backward) convolves along the same chains as the forward did."""

    taps: torch.Tensor
    readers: torch.Tensor | None = None  # tap_readers(taps, fanout): a gathering backward


def _short_conv_forward(self, hidden_states, *args, attention_mask=None, **kwargs):
    """``Lfm2ShortConv.forward``, convolving along the predecessor chains of a
    :class:`ConvChain` mask (no cache: packed rows are scored, not generated); any other
    mask takes the stock forward."""
    if not isinstance(attention_mask, ConvChain):
        return type(self).forward(self, hidden_states, *args, attention_mask=attention_mask,
                                  **kwargs)
    weight = self.conv.weight.squeeze(1)
    if attention_mask.taps.shape[0] != weight.shape[-1] - 1:
        raise ValueError(f"ConvChain has {attention_mask.taps.shape[0]} taps for a kernel of "
                         f"{weight.shape[-1]}")
    b, c, x = self.in_proj(hidden_states).chunk(3, dim=-1)
    conv = tree_conv(b * x, attention_mask.taps, weight, self.conv.bias,
                     attention_mask.readers)
    return self.out_proj(c * conv.to(c.dtype))


def install_tree_convs(model) -> None:
    """Let every ``Lfm2ShortConv`` of ``model`` take a :class:`ConvChain` mask (idempotent;
    with any other mask the layers behave exactly as before). Installed on the instances,
    not the class, so other models in the process are untouched; ``copy.deepcopy`` carries it
    to copies. Walks the modules once per model, not on every packed forward."""
    if getattr(model, "_ptl_tree_convs", False):
        return
    for m in model.modules():
        if type(m).__name__ == "Lfm2ShortConv":
            m.forward = types.MethodType(_short_conv_forward, m)
    model._ptl_tree_convs = True


def packed_hidden(model, packed: PackedBatch, positions: torch.Tensor | None = None
                  ) -> torch.Tensor:
    """Last hidden states at flat ``positions`` (default ``packed.src``: ``[M, H]``, the one
    that predicts each target)."""
    base = getattr(model, model.base_model_prefix)
    allowed: Any
    if uses_flex(base):  # model.packed_attention=flex: block-sparse, never dense
        allowed = tree_block_mask(packed.end)
    else:
        allowed = packed.attention_mask()
        if model.config._attn_implementation == "eager":
            dtype = next(model.parameters()).dtype
            allowed = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device
                                  ).masked_fill(~allowed, torch.finfo(dtype).min)
    install_tree_convs(base)
    taps = chain_taps(packed.prev, base.config.conv_L_cache)
    chain = ConvChain(taps, tap_readers(taps, packed.fanout)
                      if taps.device.type in GATHER_BACKWARD_DEVICES else None)
    masks = {"full_attention": allowed, "conv": chain}
    # a compiled model (model.compile) runs its layers compiled whole for this call
    extra = {PACKED_CALL: True} if is_compiled(model) else {}
    out = base_forward(model, input_ids=packed.input_ids, attention_mask=masks,
                       position_ids=packed.position_ids, use_cache=False, **extra)
    h = out.last_hidden_state
    return h.reshape(-1, h.shape[-1]).index_select(
        0, packed.src if positions is None else positions)

"""A third-party ``flex_attention`` call on simulated ranks: per-rank block masks and a dense
stand-in for torch's flex kernel.

Part of dtensor_attn._compat, the one home of private torch imports; import names from the
package, not from here.

Legend: B batch, L seq, N heads (q or kv: the name says which), H head_dim, D model dim,
T packed tokens (B*L). The flex call's layout is BNLH.

torch's flex has no rule for LocalTensorMode ("no rule registered for HigherOrderOperator
flex_attention") and no CPU backward. A module the kit checks (torchtitan's FlexAttention)
calls ``flex_attention`` itself, often through ``torch.compile``; inside ``flex_on_simulated_ranks()``:

- compiled callables run eagerly (``torch.compiler.set_stance("force_eager")``);
- the public ``flex_attention`` keeps every check it makes of its arguments (shapes, GQA, the
  block mask's lengths and device), and where it would call torch's flex operator it calls
  ``dense_flex`` instead: each rank's mask is the block mask made dense (the partial blocks
  through ``mask_mod``, the full blocks whole), then attention in the inputs' dtype with the
  math formula, on every rank's tensors at once, with autograd (so backward runs, on CPU too).

A mask built per rank (one ``BlockMask`` per simulated rank) is fused into one with
``fuse_block_masks``: its block tensors hold every rank's values (LocalTensor) and its
``mask_mod`` is a ``PerRankMaskMod``, which ``dense_flex`` resolves rank by rank.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Mapping

import torch

from dtensor_attn._compat.simulation import LocalTensor, maybe_disable_local_tensor_mode

# The module globals of torch.nn.attention.flex_attention that the stand-in replaces, each read
# at call time by the public flex_attention (torch 2.11 and 2.13).
_PATCHED = ("flex_attention_hop", "_validate_device", "_FLEX_ATTENTION_DISABLE_COMPILE_DEBUG")


class PerRankMaskMod:
    """A ``mask_mod`` per simulated rank, for a block mask fused from per-rank block masks."""

    def __init__(self, mask_mods: Mapping[int, Callable]) -> None:
        self.mask_mods = dict(mask_mods)

    def __call__(self, b, h, q_idx, kv_idx):
        raise RuntimeError(
            "flex_ranks: a per-rank mask_mod was called outside flex_on_simulated_ranks(); expected "
            "the kit's dense flex to resolve it per rank. Fix: call the subject inside check_attention"
        )


def _rank_value(value, rank: int):
    return value._local_tensors[rank] if isinstance(value, LocalTensor) else value


def fuse_block_masks(masks: Mapping[int, object]):
    """One BlockMask holding each simulated rank's block mask (the same lengths and block size)."""
    from torch.nn.attention.flex_attention import BlockMask

    ranks = sorted(masks)
    first = masks[ranks[0]]
    for rank in ranks[1:]:
        other = masks[rank]
        if tuple(other.seq_lengths) != tuple(first.seq_lengths) or tuple(other.BLOCK_SIZE) != tuple(first.BLOCK_SIZE):
            raise ValueError(
                f"flex_ranks: rank {rank}'s block mask has seq_lengths {tuple(other.seq_lengths)} and block size "
                f"{tuple(other.BLOCK_SIZE)}, rank {ranks[0]}'s {tuple(first.seq_lengths)} and {tuple(first.BLOCK_SIZE)}; "
                "expected the same on every rank. Fix: build every rank's mask for its local query length"
            )

    def fused(name: str):
        values = {rank: getattr(masks[rank], name) for rank in ranks}
        if any(v is None for v in values.values()):
            return None
        if any(v.shape != values[ranks[0]].shape for v in values.values()):
            width = max(v.shape[-1] for v in values.values())  # block index lists: pad to one width
            values = {r: torch.nn.functional.pad(v, (0, width - v.shape[-1])) for r, v in values.items()}
        return LocalTensor({rank: v.detach() for rank, v in values.items()})

    return BlockMask.from_kv_blocks(
        fused("kv_num_blocks"), fused("kv_indices"), fused("full_kv_num_blocks"), fused("full_kv_indices"),
        BLOCK_SIZE=tuple(first.BLOCK_SIZE), mask_mod=PerRankMaskMod({r: masks[r].mask_mod for r in ranks}),
        seq_lengths=tuple(first.seq_lengths),
    )


def _dense_blocks(num_blocks, indices, num_kv_blocks: int) -> torch.Tensor:
    """(B, N, q blocks, kv blocks) bool from flex's ordered form (a count and indices per row)."""
    columns = torch.arange(indices.shape[-1], device=indices.device)
    valid = columns < num_blocks.unsqueeze(-1)
    dense = torch.zeros(*indices.shape[:-1], num_kv_blocks + 1, dtype=torch.bool, device=indices.device)
    dense.scatter_(-1, torch.where(valid, indices.long(), num_kv_blocks), True)
    return dense[..., :num_kv_blocks]


def _index_grids(batch: int, heads: int, num_q: int, num_kv: int, device):
    return (torch.arange(batch, device=device).view(batch, 1, 1, 1), torch.arange(heads, device=device).view(1, heads, 1, 1),
            torch.arange(num_q, device=device).view(1, 1, num_q, 1), torch.arange(num_kv, device=device).view(1, 1, 1, num_kv))


def _rank_mask(block_mask: tuple, rank: int, batch: int, heads: int, device) -> torch.Tensor:
    """Rank ``rank``'s (B, N, Lq, Lkv) allowed-mask from flex's block-mask tuple: (Q_LEN, KV_LEN,
    kv_num_blocks, kv_indices, full_kv_num_blocks, full_kv_indices, ..., Q_BLOCK, KV_BLOCK, mask_mod)."""
    num_q, num_kv = int(block_mask[0]), int(block_mask[1])
    q_block, kv_block, mask_mod = int(block_mask[-3]), int(block_mask[-2]), block_mask[-1]
    if isinstance(mask_mod, PerRankMaskMod):
        mask_mod = mask_mod.mask_mods[rank]
    kv_num, kv_indices, full_num, full_indices = (None if t is None else _rank_value(t, rank) for t in block_mask[2:6])
    num_kv_blocks = -(-num_kv // kv_block)

    def elements(blocks):
        return blocks.repeat_interleave(q_block, -2).repeat_interleave(kv_block, -1)[..., :num_q, :num_kv].to(device)

    allowed = mask_mod(*_index_grids(batch, heads, num_q, num_kv, device))
    allowed = elements(_dense_blocks(kv_num, kv_indices, num_kv_blocks)) & _rank_value(allowed, rank).to(device)
    if full_num is not None:
        allowed = allowed | elements(_dense_blocks(full_num, full_indices, num_kv_blocks))
    return allowed.expand(batch, heads, num_q, num_kv)


def dense_flex(query, key, value, score_mod, block_mask, scale, kernel_options, *buffers):
    """torch's flex operator's contract, densely: (out_BNLH, lse_BNL, max_BNL), the statistics in
    log2 units as the operator returns them; computed in float32 (float64 for float64 inputs)."""
    from torch.distributed._local_tensor import local_tensor_mode

    batch, heads = query.shape[0], query.shape[1]
    mode = local_tensor_mode()
    ranks = sorted(mode.ranks) if mode is not None else [0]
    with maybe_disable_local_tensor_mode():
        masks = {rank: _rank_mask(block_mask, rank, batch, heads, query.device) for rank in ranks}
        same = all(torch.equal(masks[ranks[0]], m) for m in masks.values())
    allowed_BNLL = masks[ranks[0]] if same else LocalTensor(masks)
    if key.shape[1] != heads:  # GQA: neighbouring q heads share a k/v head
        groups = heads // key.shape[1]
        key, value = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
    work = torch.float64 if query.dtype == torch.float64 else torch.float32  # as flex: fp32 softmax
    scores_BNLL = (query.to(work) @ key.to(work).transpose(-2, -1)) * scale
    if score_mod is not None and getattr(score_mod, "__name__", "") != "_identity":
        scores_BNLL = score_mod(scores_BNLL, *_index_grids(batch, heads, *scores_BNLL.shape[-2:], query.device))
    scores_BNLL = scores_BNLL.masked_fill(~allowed_BNLL, float("-inf"))
    lse_BNL = torch.logsumexp(scores_BNLL, dim=-1)
    max_BNL = scores_BNLL.amax(dim=-1)
    no_keys_BNL = torch.isinf(lse_BNL)  # a row that sees no key: output 0, lse -inf (as flex)
    probs_BNLL = torch.exp(scores_BNLL - lse_BNL.masked_fill(no_keys_BNL, 0.0).unsqueeze(-1))
    out_BNLH = (probs_BNLL.masked_fill(no_keys_BNL.unsqueeze(-1), 0.0) @ value.to(work)).to(query.dtype)
    log2 = math.log(2.0)
    return out_BNLH, lse_BNL / log2, max_BNL / log2


def _skip_device_check(query, key, value) -> None:
    """flex refuses inputs that need gradients on CPU (its kernel has no CPU backward); the dense
    stand-in has one."""


@contextlib.contextmanager
def flex_on_simulated_ranks() -> Iterator[None]:
    """Inside: every ``flex_attention`` call runs ``dense_flex``, and compiled callables run eagerly."""
    import torch.nn.attention.flex_attention as flex_module

    missing = [name for name in _PATCHED if not hasattr(flex_module, name)]
    if missing:
        raise RuntimeError(
            f"flex_ranks: torch.nn.attention.flex_attention has no {missing} in torch {torch.__version__}; "
            "expected the names torch 2.11 and 2.13 read at call time. Fix: run flex subjects under torchrun "
            "(real ranks) on this torch, or update dtensor_attn/_compat/flex_ranks.py"
        )
    saved = {name: getattr(flex_module, name) for name in _PATCHED}
    flex_module.flex_attention_hop = dense_flex
    flex_module._validate_device = _skip_device_check
    flex_module._FLEX_ATTENTION_DISABLE_COMPILE_DEBUG = True  # call the operator directly, not through compile
    try:
        with torch.compiler.set_stance("force_eager"):
            yield
    finally:
        for name, value in saved.items():
            setattr(flex_module, name, value)

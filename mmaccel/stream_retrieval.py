"""ReKV-style retrieval of frame blocks for :class:`~mmaccel.stream.StreamSession`.

ReKV (Di et al., ICLR 2025; the official STC stream runs on it) keeps every frame's KV cache
as a block (one block = one frame's tokens) and, when a question comes, lets each decoder layer
attend only to the prompt prefix and the ``topk`` blocks most relevant to the question at that
layer. Relevance, as in the official ``ContextManager._calc_block_topk``: the raw dot product
(no norms, no softmax) of the mean *pre-RoPE* query of the question's tokens with the block's
mean *pre-RoPE* key, heads concatenated (grouped KV heads expanded to the query heads). Each layer
chooses from hidden states that already attended to the blocks the layers before it chose; the
chosen blocks stay in temporal order, and the choice is fixed for the whole answer.

Here the blocks' keys are the cached (rotated) keys; their pre-RoPE means come from undoing the
rotation at the positions they were encoded at. ``position_policy`` "compact" re-rotates the
retrieved blocks to consecutive positions after the prefix, as the official code does; the
default "preserve" leaves each block at the positions it had in the full video (see
``StreamSession``), so the question also comes where it would after the whole video.
"""
from __future__ import annotations

import functools
import threading
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Rotary:
    """A decoder's rotary embedding: ``inv_freq`` (F,) and, for M-RoPE (Qwen2-VL, Qwen2.5-VL),
    the ``sections`` of the F frequencies that turn with the temporal, height and width rows of
    the positions (in turn, as the library's ``recomposition_frequencies`` lays them out)."""
    inv_freq: torch.Tensor
    sections: tuple[int, ...] | None = None

    @classmethod
    def of(cls, lm) -> "Rotary":
        emb = lm.rotary_emb
        sections = getattr(emb, "mrope_section", None)
        return cls(emb.inv_freq, tuple(sections) if sections else None)

    @functools.cached_property
    def rows(self) -> torch.Tensor:
        """(F,) the position row each frequency turns with (all 0 without sections); built once,
        since every block and layer a question touches rotates with it."""
        if self.sections is None:
            return torch.zeros(self.inv_freq.numel(), dtype=torch.long)
        return torch.cat([torch.full((size,), j % 3) for j, size in enumerate(self.sections)])

    def angles(self, positions: torch.Tensor, device) -> torch.Tensor:
        """(n, 2F) rotation angles at ``positions`` (n,) or (R, n) (one row: the same in all)."""
        pos = (positions[None] if positions.dim() == 1 else positions).to(device, torch.float32)
        angles = pos[self.rows.clamp(max=pos.shape[0] - 1).to(device)].T * self.inv_freq.to(device, torch.float32)[None]
        return torch.cat([angles, angles], -1)


def rotate(x: torch.Tensor, positions: torch.Tensor, rotary: Rotary) -> torch.Tensor:
    """Rotary rotation of ``x`` (..., n, Dh) by ``positions`` ((n,), or (3, n) for M-RoPE;
    negative undoes it), in the half-split convention of Llama / Qwen2 (``rotate_half``)."""
    angles = rotary.angles(positions, x.device)
    cos, sin = angles.cos(), angles.sin()
    half = x.shape[-1] // 2
    rotated_half = torch.cat([-x[..., half:], x[..., :half]], -1)
    return (x.float() * cos + rotated_half.float() * sin).to(x.dtype)


def block_scores(block_keys: torch.Tensor, queries: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Relevance of each block to a question, at one layer.

    block_keys: (F, Hkv, Dh) mean pre-RoPE key of each block; queries: (n, H * Dh) pre-RoPE
    queries of the question's n tokens. Returns (F,): the mean query dotted with each block's key,
    the Hkv key heads repeated to the H query heads (grouped-query attention)."""
    groups = num_heads // block_keys.shape[1]
    keys = block_keys.repeat_interleave(groups, dim=1).flatten(1).float()
    return keys @ queries.float().mean(0)


def select_blocks(scores: torch.Tensor, topk: int) -> torch.Tensor:
    """The ``topk`` best blocks (all of them when there are no more), in temporal order."""
    if scores.numel() <= topk:
        return torch.arange(scores.numel())
    return scores.topk(topk).indices.sort().values.cpu()


@dataclass
class FrameBlock:
    """One frame for retrieval: its tokens' ``positions`` (R, n) (absolute, as cached), the mean
    pre-RoPE key per layer (Hkv, Dh), and, once the frame has left the session's cache, copies
    of its keys/values (1, Hkv, n, Dh) per layer (rotated at ``positions``). While the frame is
    still in the cache its KV is read from there (:meth:`view`), so it is never held twice."""
    positions: torch.Tensor
    mean_keys: list[torch.Tensor]
    keys: list[torch.Tensor] | None = None
    values: list[torch.Tensor] | None = None

    @classmethod
    def summarize(cls, cache, positions: torch.Tensor, rotary: Rotary) -> "FrameBlock":
        """The frame made of the newest ``n`` tokens of ``cache``, at ``positions`` (R, n)."""
        n = positions.shape[-1]
        return cls(positions, [rotate(layer.keys[0, :, -n:, :], -positions, rotary).float().mean(1)
                               for layer in cache.layers])

    def view(self, cache, start: int) -> "FrameBlock":
        """This frame with its KV: its copies, or a view of ``cache`` from token ``start``."""
        if self.keys is not None:
            return self
        end = start + self.size
        return FrameBlock(self.positions, self.mean_keys, [layer.keys[..., start:end, :] for layer in cache.layers],
                          [layer.values[..., start:end, :] for layer in cache.layers])

    def archive(self, cache, start: int) -> None:
        """Copy the frame's KV out of ``cache`` (before the cache drops it)."""
        held = self.view(cache, start)
        self.keys, self.values = [k.clone() for k in held.keys], [v.clone() for v in held.values]

    @property
    def size(self) -> int:
        """The frame's token count."""
        return self.positions.shape[-1]

    def at(self, layer: int, positions: torch.Tensor | None, rotary: Rotary) -> tuple[torch.Tensor, torch.Tensor]:
        """This block's (keys, values) at ``layer``, re-rotated to ``positions`` ((n,): the same in
        every M-RoPE row; None: as cached). Rotations compose, so turning by the difference
        moves every frequency from its old row's position to the new one."""
        keys = self.keys[layer]
        if positions is not None:
            keys = rotate(keys, positions - self.positions, rotary)
        return keys, self.values[layer]


class Retriever:
    """One question's retrieval pass: while installed, every decoder layer's attention first picks
    its ``topk`` blocks from the question's queries and fills its layer of ``cache`` with the
    prefix's KV and those blocks. Only the installing thread's calls retrieve (the model may be
    shared by sessions in other threads); the hooks are always removed.

    ``cache`` must already be as long, at every layer, as the prefix and ``topk`` blocks (the
    attention mask is built from its length before the first layer runs); its content is
    overwritten."""

    def __init__(self, lm, cache, prefix_kv, blocks: list[FrameBlock], topk: int, compact_from: int | None):
        self.lm, self.cache, self.prefix_kv, self.blocks, self.topk = lm, cache, prefix_kv, blocks, topk
        self.compact_from = compact_from  # first position of the retrieved blocks under "compact"
        self.rotary = Rotary.of(lm)
        self.chosen: list[list[int]] = [[] for _ in lm.layers]
        self._thread, self._handles = threading.get_ident(), []

    def __enter__(self) -> "Retriever":
        for idx, layer in enumerate(self.lm.layers):
            hook = self._hook(idx, layer.self_attn)
            self._handles.append(layer.self_attn.register_forward_pre_hook(hook, with_kwargs=True))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()

    def _hook(self, idx: int, attn):
        def pre(module, args, kwargs):
            if threading.get_ident() == self._thread:
                hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
                self._fill(idx, attn.q_proj(hidden[0]), attn.config.num_attention_heads)
        return pre

    def _fill(self, idx: int, queries: torch.Tensor, num_heads: int) -> None:
        scores = block_scores(torch.stack([b.mean_keys[idx] for b in self.blocks]), queries, num_heads)
        chosen = select_blocks(scores, self.topk).tolist()
        self.chosen[idx] = chosen
        keys, values = [self.prefix_kv[0][idx]], [self.prefix_kv[1][idx]]
        start = self.compact_from  # None: every frame stays at its own positions
        for b in chosen:
            block = self.blocks[b]
            n = block.size
            k, v = block.at(idx, None if start is None else start + torch.arange(n), self.rotary)
            keys.append(k)
            values.append(v)
            if start is not None:
                start += n
        layer = self.cache.layers[idx]
        layer.keys, layer.values = torch.cat(keys, -2), torch.cat(values, -2)

"""Blockwise FlashAttention in pure JAX: runs on any backend (CPU, older GPUs, TPU).

The same loops as the Pallas kernels (loops.py), with tiles cut out of arrays by
dynamic slicing: a sequential map over query (or key) blocks, vmapped over batch
and heads, with an inner loop over the other side's blocks. Memory is
O(B·N·block_q·block_k) for scores, never O(T·S).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax import lax

from pallas_attention import loops, tiles
from pallas_attention.problem import Problem, pad_axis, pad_extra, round_up


def _block_size() -> int:
  # Small tiles keep CPU tests quick with several blocks; accelerators want
  # fewer, larger steps (each loop step is a separate kernel launch there).
  return 128 if jax.default_backend() == "cpu" else 512


def unavailable() -> str | None:
  """Pure JAX runs wherever JAX does."""
  return None


def supports(problem: Problem, q, k, bias, mask) -> str | None:
  """None: this implementation serves the call; otherwise why not."""
  del problem, q, k, bias, mask
  return None


def _blocks(t: int, s: int) -> tuple[int, int]:
  block = _block_size()
  return min(block, t), min(block, s)


class _Extra:
  """A bias or mask ``[Bb, Nb, Tb, Sb]`` with its broadcast head/batch axes dropped.

  ``array`` keeps a leading axis for each of batch, kv head and group only where
  that axis is really there, so vmap maps it (axis 0) or passes it whole (None).
  """

  def __init__(self, x, num_kv_heads: int, num_groups: int):
    self.present = None if x is None else (x.shape[0] > 1, x.shape[1] > 1, x.shape[1] > 1)
    if x is None:
      self.array = None
      return
    bb, nb, tb, sb = x.shape
    x = x.reshape(bb, num_kv_heads, num_groups, tb, sb) if nb > 1 else x.reshape(bb, 1, 1, tb, sb)
    keep = [axis for axis, here in enumerate(self.present) if here]
    drop = tuple(axis for axis in range(3) if axis not in keep)
    self.array = jnp.squeeze(x, drop)

  def axis(self, level: int):
    """vmap in_axes at batch (0), kv head (1) or group (2) level."""
    if self.array is None or not self.present[level]:
      return None
    return 0


def _tile(x, rows, cols, row_start, col_start):
  """Cut a ``[rows, cols]`` tile out of a ``[Tb, Sb]`` bias or mask (broadcast axes stay 1)."""
  if x is None:
    return None
  if x.shape[0] > 1:
    x = lax.dynamic_slice_in_dim(x, row_start, rows, 0)
  if x.shape[1] > 1:
    x = lax.dynamic_slice_in_dim(x, col_start, cols, 1)
  return x


def _geometry(problem: Problem, block_q: int, block_k: int, mask) -> loops.Geometry:
  return loops.Geometry(block_q, block_k, problem.scale, problem.spec, mask is not None)


@dataclasses.dataclass(frozen=True)
class _Layout:
  """Sizes of one call, and the moves between the user's layout and head-first.

  Head-first: queries ``[B, K, G, T_pad, H]``, keys and values ``[B, K, S_pad, H]``,
  per-row vectors ``[B, K, G, T_pad]``; sequences zero-padded to whole blocks.
  """

  batch: int
  t: int
  s: int
  heads: int
  kv_heads: int
  head_dim: int
  block_q: int
  block_k: int

  @classmethod
  def of(cls, q, k, block_q: int, block_k: int) -> _Layout:
    b, t, n, h = q.shape
    return cls(b, t, k.shape[1], n, k.shape[2], h, block_q, block_k)

  @property
  def groups(self) -> int:
    return self.heads // self.kv_heads

  @property
  def t_pad(self) -> int:
    return round_up(self.t, self.block_q)

  @property
  def s_pad(self) -> int:
    return round_up(self.s, self.block_k)

  def queries(self, x):
    """``[B, T, N, H] -> [B, K, G, T_pad, H]``."""
    x = pad_axis(x, 1, self.t_pad)
    x = x.reshape(self.batch, self.t_pad, self.kv_heads, self.groups, self.head_dim)
    return x.transpose(0, 2, 3, 1, 4)

  def keys(self, x):
    """``[B, S, K, H] -> [B, K, S_pad, H]``."""
    return pad_axis(x, 1, self.s_pad).transpose(0, 2, 1, 3)

  def rows(self, x):
    """``[B, N, T] -> [B, K, G, T_pad]``."""
    return pad_axis(x, 2, self.t_pad).reshape(self.batch, self.kv_heads, self.groups, self.t_pad)

  def extras(self, bias, mask) -> list[_Extra]:
    return [
      _Extra(pad_extra(x, self.t_pad, self.s_pad), self.kv_heads, self.groups) for x in (bias, mask)
    ]

  def queries_back(self, x):
    """``[B, K, G, T_pad, H] -> [B, T, N, H]``."""
    x = x.transpose(0, 3, 1, 2, 4).reshape(self.batch, self.t_pad, self.heads, self.head_dim)
    return x[:, : self.t]

  def keys_back(self, x):
    """``[B, K, S_pad, H] -> [B, S, K, H]``."""
    return x.transpose(0, 2, 1, 3)[:, : self.s]


def _slice(x, start, size: int):
  return lax.dynamic_slice_in_dim(x, start, size, 0)


def _kv_loader(layout: _Layout, k1, v1, bias1, mask1, q_start):
  """``load(j)`` for query block ``q_start`` of one head: key block ``j`` and its extras."""

  def load(j):
    k_start = j * layout.block_k
    return loops.KVTile(
      _slice(k1, k_start, layout.block_k),
      _slice(v1, k_start, layout.block_k),
      _tile(bias1, layout.block_q, layout.block_k, q_start, k_start),
      _tile(mask1, layout.block_q, layout.block_k, q_start, k_start),
    )

  return load


def _vmap_bkg(fn, mapped_in_axes, extras, levels=3):
  """vmap ``fn`` over batch, kv head and (for levels=3) group.

  ``mapped_in_axes[level]`` gives the axes of the regular arguments at that level;
  the extras (bias, mask) follow with their own axes.
  """
  for level in reversed(range(levels)):
    fn = jax.vmap(fn, in_axes=(*mapped_in_axes[level], *(e.axis(level) for e in extras)))
  return fn


def _block_ids(length: int, block: int):
  return jnp.arange(length // block, dtype=jnp.int32)


def forward(problem: Problem, q, k, v, bias, mask, q_len, kv_len):
  """``out [B, T, N, H]`` (q's dtype) and base-2 LSE ``[B, N, T]`` (f32)."""
  layout = _Layout.of(q, k, *_blocks(q.shape[1], k.shape[1]))
  block_q = layout.block_q
  geo = _geometry(problem, block_q, layout.block_k, mask)
  extras = layout.extras(bias, mask)

  def one_head(q1, k1, v1, ql, kl, bias1, mask1):
    def q_block(i):
      q_start = i * block_q
      load = _kv_loader(layout, k1, v1, bias1, mask1, q_start)
      out, lse2 = loops.forward_rows(geo, _slice(q1, q_start, block_q), q_start, load, ql, kl)
      return out.astype(q1.dtype), lse2

    out, lse2 = lax.map(q_block, _block_ids(layout.t_pad, block_q))
    return out.reshape(layout.t_pad, layout.head_dim), lse2.reshape(layout.t_pad)

  axes = [(0, 0, 0, 0, 0), (0, 0, 0, None, None), (0, None, None, None, None)]
  out, lse2 = _vmap_bkg(one_head, axes, extras)(
    layout.queries(q), layout.keys(k), layout.keys(v), q_len, kv_len, *(e.array for e in extras)
  )
  lse2 = lse2.reshape(layout.batch, layout.heads, layout.t_pad)[:, :, : layout.t]
  return layout.queries_back(out), lse2


def backward(problem: Problem, q, k, v, bias, mask, q_len, kv_len, do, lse2, delta):
  """``dq, dk, dv`` in the dtypes of q, k, v.

  ``lse2`` is tiles.backward_lse of the forward's LSE and ``delta`` is
  ``rowsum(do ⊙ o) − dlse``, both ``[B, N, T]`` f32.
  """
  layout = _Layout.of(q, k, *_blocks(q.shape[1], k.shape[1]))
  block_q, block_k = layout.block_q, layout.block_k
  geo = _geometry(problem, block_q, block_k, mask)
  extras = layout.extras(bias, mask)
  q_heads, do_heads = layout.queries(q), layout.queries(do)
  k_heads, v_heads = layout.keys(k), layout.keys(v)
  lse2, delta = layout.rows(lse2), layout.rows(delta)

  def dq_head(q1, do1, lse1, delta1, k1, v1, ql, kl, bias1, mask1):
    def q_block(i):
      q_start = i * block_q
      load = _kv_loader(layout, k1, v1, bias1, mask1, q_start)
      rows = lambda x: _slice(x, q_start, block_q)
      return loops.dq_rows(
        geo, rows(q1), rows(do1), rows(lse1), rows(delta1), q_start, load, ql, kl
      )

    dq = lax.map(q_block, _block_ids(layout.t_pad, block_q))
    return dq.reshape(layout.t_pad, layout.head_dim)

  axes = [(0,) * 8, (0, 0, 0, 0, 0, 0, None, None), (0, 0, 0, 0, None, None, None, None)]
  dq = _vmap_bkg(dq_head, axes, extras)(
    q_heads, do_heads, lse2, delta, k_heads, v_heads, q_len, kv_len, *(e.array for e in extras)
  )

  def dkv_head(k1, v1, q1, do1, lse1, delta1, ql, kl, bias1, mask1):
    # q1, do1: [G, T, H]; lse1, delta1: [G, T]; bias1, mask1: [G?, Tb, Sb].
    def per_group(x, extra, g):
      return x[g] if x is not None and extra.present[2] else x

    def k_block(j):
      k_start = j * block_k

      def load(g, i):
        q_start = i * block_q
        rows = lambda x: _slice(x[g], q_start, block_q)
        return loops.QTile(
          rows(q1),
          rows(do1),
          rows(lse1),
          rows(delta1),
          _tile(per_group(bias1, extras[0], g), block_q, block_k, q_start, k_start),
          _tile(per_group(mask1, extras[1], g), block_q, block_k, q_start, k_start),
        )

      k_tile, v_tile = _slice(k1, k_start, block_k), _slice(v1, k_start, block_k)
      return loops.dkv_cols(geo, k_tile, v_tile, k_start, layout.groups, load, ql, kl)

    dk, dv = lax.map(k_block, _block_ids(layout.s_pad, block_k))
    return dk.reshape(layout.s_pad, layout.head_dim), dv.reshape(layout.s_pad, layout.head_dim)

  axes = [(0,) * 8, (0, 0, 0, 0, 0, 0, None, None)]
  dk, dv = _vmap_bkg(dkv_head, axes, extras, levels=2)(
    k_heads, v_heads, q_heads, do_heads, lse2, delta, q_len, kv_len, *(e.array for e in extras)
  )
  return (
    layout.queries_back(dq).astype(q.dtype),
    layout.keys_back(dk).astype(k.dtype),
    layout.keys_back(dv).astype(v.dtype),
  )


def bias_grad(problem: Problem, q, k, v, bias, mask, q_len, kv_len, do, lse2, delta):
  """Gradient of the bias, in its own (possibly broadcast) shape ``[Bb, Nb, Tb, Sb]``.

  It is ``ds`` summed over the bias's broadcast axes. One query block at a time
  (the whole key length at once), so peak memory is O(B·N·block_q·S) beyond the
  result itself. Every implementation uses this; under jit XLA drops it when
  nobody asks for the bias's gradient.
  """
  s = k.shape[1]
  layout = _Layout.of(q, k, _blocks(q.shape[1], s)[0], s)  # one key block: all of S
  block_q = layout.block_q
  geo = _geometry(problem, block_q, s, mask)
  extras = layout.extras(bias, mask)
  cols = jnp.arange(s, dtype=jnp.int32)

  def ds_rows(q_start, q1, do1, lse1, delta1, k1, v1, ql, kl, bias1, mask1):
    rows = lambda x: _slice(x, q_start, block_q)
    row_ids = q_start + jnp.arange(block_q, dtype=jnp.int32)
    tile = _kv_loader(layout, k1, v1, bias1, mask1, q_start)(0)
    scores = loops.tile_scores(geo, rows(q1), k1, tile.bias, tile.keep, row_ids, cols, True, ql, kl)
    _, ds = tiles.score_grad(scores, v1, rows(do1), rows(lse1), rows(delta1))
    return ds

  axes = [(None,) + (0,) * 8, (None,) + (0,) * 6 + (None, None), (None,) + (0,) * 4 + (None,) * 4]
  ds_all = _vmap_bkg(ds_rows, axes, extras)
  arrays = (
    layout.queries(q),
    layout.queries(do),
    layout.rows(lse2),
    layout.rows(delta),
    layout.keys(k),
    layout.keys(v),
    q_len,
    kv_len,
    *(e.array for e in extras),
  )
  bb, nb, tb, sb = bias.shape
  broadcast_axes = tuple(axis for axis, size in enumerate((bb, nb, tb, sb)) if size == 1)

  def q_block(i):
    ds = ds_all(i * block_q, *arrays)  # [B, K, G, bq, S]
    ds = ds.reshape(layout.batch, layout.heads, block_q, s)
    return jnp.sum(ds, axis=broadcast_axes, keepdims=True)

  blocks = lax.map(q_block, _block_ids(layout.t_pad, block_q))
  if tb == 1:
    return jnp.sum(blocks, axis=0)
  return blocks.transpose(1, 2, 0, 3, 4).reshape(bb, nb, layout.t_pad, sb)[:, :, : layout.t]

"""Blockwise FlashAttention in pure JAX: runs on any backend (CPU, older GPUs, TPU).

The same loops as the Pallas kernels (loops.py), with tiles cut out of arrays by
dynamic slicing: a sequential map over query (or key) blocks, vmapped over batch
and heads, with an inner loop over the other side's blocks. Memory is
O(B·N·block_q·block_k) for scores, never O(T·S).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from pallas_attention import loops, tiles
from pallas_attention.problem import Problem, pad_axis, pad_extra, round_up

NAME = "xla"


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


def _q_heads_first(x, num_kv_heads):
  """``[B, T, N, H] -> [B, K, G, T, H]``."""
  b, t, n, h = x.shape
  return x.reshape(b, t, num_kv_heads, n // num_kv_heads, h).transpose(0, 2, 3, 1, 4)


def _kv_heads_first(x):
  """``[B, S, K, H] -> [B, K, S, H]``."""
  return x.transpose(0, 2, 1, 3)


def _vmap_bkg(fn, mapped_in_axes, extras, levels=3):
  """vmap ``fn`` over batch, kv head and (for levels=3) group.

  ``mapped_in_axes[level]`` gives the axes of the regular arguments at that level;
  the extras (bias, mask) follow with their own axes.
  """
  for level in reversed(range(levels)):
    fn = jax.vmap(fn, in_axes=(*mapped_in_axes[level], *(e.axis(level) for e in extras)))
  return fn


def forward(problem: Problem, q, k, v, bias, mask, q_len, kv_len):
  """``out [B, T, N, H]`` (q's dtype) and base-2 LSE ``[B, N, T]`` (f32)."""
  b, t, n, h = q.shape
  s, kh = k.shape[1], k.shape[2]
  groups = n // kh
  block_q, block_k = _blocks(t, s)
  t_pad, s_pad = round_up(t, block_q), round_up(s, block_k)
  geo = _geometry(problem, block_q, block_k, mask)
  qh = _q_heads_first(pad_axis(q, 1, t_pad), kh)
  kh_, vh = (_kv_heads_first(pad_axis(x, 1, s_pad)) for x in (k, v))
  extras = [_Extra(pad_extra(x, t_pad, s_pad), kh, groups) for x in (bias, mask)]

  def one_head(q1, k1, v1, ql, kl, bias1, mask1):
    def load_kv(q_start):
      def load(j):
        start = j * block_k
        return loops.KVTile(
            lax.dynamic_slice_in_dim(k1, start, block_k, 0),
            lax.dynamic_slice_in_dim(v1, start, block_k, 0),
            _tile(bias1, block_q, block_k, q_start, start),
            _tile(mask1, block_q, block_k, q_start, start),
        )

      return load

    def q_block(i):
      q_start = i * block_q
      q_tile = lax.dynamic_slice_in_dim(q1, q_start, block_q, 0)
      out, lse2 = loops.forward_rows(geo, q_tile, q_start, load_kv(q_start), ql, kl)
      return out.astype(q1.dtype), lse2

    out, lse2 = lax.map(q_block, jnp.arange(t_pad // block_q, dtype=jnp.int32))
    return out.reshape(t_pad, h), lse2.reshape(t_pad)

  axes = [(0, 0, 0, 0, 0), (0, 0, 0, None, None), (0, None, None, None, None)]
  out, lse2 = _vmap_bkg(one_head, axes, extras)(qh, kh_, vh, q_len, kv_len, *(e.array for e in extras))
  out = out.transpose(0, 3, 1, 2, 4).reshape(b, t_pad, n, h)[:, :t]
  return out, lse2.reshape(b, n, t_pad)[:, :, :t]


def backward(problem: Problem, q, k, v, bias, mask, q_len, kv_len, do, lse2, delta):
  """``dq, dk, dv`` in the dtypes of q, k, v.

  ``lse2`` is tiles.backward_lse of the forward's LSE and ``delta`` is
  ``rowsum(do ⊙ o) − dlse``, both ``[B, N, T]`` f32.
  """
  b, t, n, h = q.shape
  s, kh = k.shape[1], k.shape[2]
  groups = n // kh
  block_q, block_k = _blocks(t, s)
  t_pad, s_pad = round_up(t, block_q), round_up(s, block_k)
  geo = _geometry(problem, block_q, block_k, mask)
  qh, doh = (_q_heads_first(pad_axis(x, 1, t_pad), kh) for x in (q, do))
  kh_, vh = (_kv_heads_first(pad_axis(x, 1, s_pad)) for x in (k, v))
  lse2 = pad_axis(lse2, 2, t_pad).reshape(b, kh, groups, t_pad)
  delta = pad_axis(delta, 2, t_pad).reshape(b, kh, groups, t_pad)
  extras = [_Extra(pad_extra(x, t_pad, s_pad), kh, groups) for x in (bias, mask)]

  def dq_head(q1, do1, lse1, delta1, k1, v1, ql, kl, bias1, mask1):
    def q_block(i):
      q_start = i * block_q

      def load(j):
        start = j * block_k
        return loops.KVTile(
            lax.dynamic_slice_in_dim(k1, start, block_k, 0),
            lax.dynamic_slice_in_dim(v1, start, block_k, 0),
            _tile(bias1, block_q, block_k, q_start, start),
            _tile(mask1, block_q, block_k, q_start, start),
        )

      rows = lambda x: lax.dynamic_slice_in_dim(x, q_start, block_q, 0)  # noqa: E731
      return loops.dq_rows(
          geo, rows(q1), rows(do1), rows(lse1), rows(delta1), q_start, load, ql, kl
      )

    dq = lax.map(q_block, jnp.arange(t_pad // block_q, dtype=jnp.int32))
    return dq.reshape(t_pad, h)

  axes = [(0,) * 8, (0, 0, 0, 0, 0, 0, None, None), (0, 0, 0, 0, None, None, None, None)]
  dq = _vmap_bkg(dq_head, axes, extras)(
      qh, doh, lse2, delta, kh_, vh, q_len, kv_len, *(e.array for e in extras)
  )
  dq = dq.transpose(0, 3, 1, 2, 4).reshape(b, t_pad, n, h)[:, :t].astype(q.dtype)

  def dkv_head(k1, v1, q1, do1, lse1, delta1, ql, kl, bias1, mask1):
    # q1, do1: [G, T, H]; lse1, delta1: [G, T]; bias1, mask1: [G?, Tb, Sb].
    def k_block(j):
      k_start = j * block_k

      def load(g, i):
        q_start = i * block_q
        rows = lambda x: lax.dynamic_slice_in_dim(x[g], q_start, block_q, 0)  # noqa: E731
        per_group = lambda x, e: None if x is None else (x[g] if e.present[2] else x)  # noqa: E731
        return loops.QTile(
            rows(q1),
            rows(do1),
            rows(lse1),
            rows(delta1),
            _tile(per_group(bias1, extras[0]), block_q, block_k, q_start, k_start),
            _tile(per_group(mask1, extras[1]), block_q, block_k, q_start, k_start),
        )

      cols = lambda x: lax.dynamic_slice_in_dim(x, k_start, block_k, 0)  # noqa: E731
      return loops.dkv_cols(geo, cols(k1), cols(v1), k_start, groups, load, ql, kl)

    dk, dv = lax.map(k_block, jnp.arange(s_pad // block_k, dtype=jnp.int32))
    return dk.reshape(s_pad, h), dv.reshape(s_pad, h)

  axes = [(0,) * 8, (0, 0, 0, 0, 0, 0, None, None)]
  dk, dv = _vmap_bkg(dkv_head, axes, extras, levels=2)(
      kh_, vh, qh, doh, lse2, delta, q_len, kv_len, *(e.array for e in extras)
  )
  dk = dk.transpose(0, 2, 1, 3)[:, :s].astype(k.dtype)
  dv = dv.transpose(0, 2, 1, 3)[:, :s].astype(v.dtype)
  return dq, dk, dv


def bias_grad(problem: Problem, q, k, v, bias, mask, q_len, kv_len, do, lse2, delta):
  """Gradient of the bias, in its own (possibly broadcast) shape ``[Bb, Nb, Tb, Sb]``.

  It is ``ds`` summed over the bias's broadcast axes. One query block at a time
  (the whole key length at once), so peak memory is O(B·N·block_q·S) beyond the
  result itself. Every implementation uses this; under jit XLA drops it when
  nobody asks for the bias's gradient.
  """
  b, t, n, h = q.shape
  s, kh = k.shape[1], k.shape[2]
  groups = n // kh
  block_q, _ = _blocks(t, s)
  t_pad = round_up(t, block_q)
  geo = _geometry(problem, block_q, s, mask)
  qh, doh = (_q_heads_first(pad_axis(x, 1, t_pad), kh) for x in (q, do))
  kh_, vh = _kv_heads_first(k), _kv_heads_first(v)
  lse2 = pad_axis(lse2, 2, t_pad).reshape(b, kh, groups, t_pad)
  delta = pad_axis(delta, 2, t_pad).reshape(b, kh, groups, t_pad)
  extras = [_Extra(pad_extra(x, t_pad, s), kh, groups) for x in (bias, mask)]
  cols = jnp.arange(s, dtype=jnp.int32)

  def ds_rows(q_start, q1, do1, lse1, delta1, k1, v1, ql, kl, bias1, mask1):
    rows = lambda x: lax.dynamic_slice_in_dim(x, q_start, block_q, 0)  # noqa: E731
    row_ids = q_start + jnp.arange(block_q, dtype=jnp.int32)
    tile = loops.KVTile(k1, v1, _tile(bias1, block_q, s, q_start, 0), _tile(mask1, block_q, s, q_start, 0))
    scores = loops.tile_scores(geo, rows(q1), k1, tile.bias, tile.keep, row_ids, cols, True, ql, kl)
    _, ds = tiles.score_grad(scores, v1, rows(do1), rows(lse1), rows(delta1))
    return ds

  axes = [(None,) + (0,) * 8, (None,) + (0,) * 6 + (None, None), (None,) + (0,) * 4 + (None,) * 4]
  ds_all = _vmap_bkg(ds_rows, axes, extras)
  bb, nb, tb, sb = bias.shape

  def q_block(i):
    ds = ds_all(i * block_q, qh, doh, lse2, delta, kh_, vh, q_len, kv_len, *(e.array for e in extras))
    ds = ds.reshape(b, n, block_q, s)  # [B, K, G, bq, S] -> [B, N, bq, S]
    axes = tuple(axis for axis, size in enumerate((bb, nb, tb, sb)) if size == 1)
    return jnp.sum(ds, axis=axes, keepdims=True)

  blocks = lax.map(q_block, jnp.arange(t_pad // block_q, dtype=jnp.int32))
  if tb == 1:
    return jnp.sum(blocks, axis=0)
  return blocks.transpose(1, 2, 0, 3, 4).reshape(bb, nb, t_pad, sb)[:, :, :t]

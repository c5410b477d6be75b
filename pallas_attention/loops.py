"""The FlashAttention loops over tiles, written once for every implementation.

A loop is given a function that loads one tile (from a Pallas ref inside a kernel,
or by slicing an array under XLA) and visits only the tiles that the structural
mask leaves visible: the tiles visible in every element without an element-wise
mask, the ones on an edge with it (masks.kv_block_range, masks.q_block_range).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax.numpy as jnp
from jax import lax

from pallas_attention import masks, tiles


@dataclasses.dataclass(frozen=True)
class KVTile:
  """What a query block needs of one key block: ``k, v [bk, H]``; ``bias`` and
  ``keep`` (the dense boolean mask) broadcastable to ``[bq, bk]``, or None."""

  k: Any
  v: Any
  bias: Any = None
  keep: Any = None


@dataclasses.dataclass(frozen=True)
class QTile:
  """What a key block needs of one query block of one query head."""

  q: Any
  do: Any
  lse2: Any  # [bq], from tiles.backward_lse
  delta: Any  # [bq]
  bias: Any = None
  keep: Any = None


@dataclasses.dataclass(frozen=True)
class Geometry:
  """Static facts every loop needs."""

  block_q: int
  block_k: int
  scale: float
  spec: masks.MaskSpec
  dense_mask: bool  # a dense mask forces the element-wise mask on every tile
  precision: Any = tiles.EXACT  # of every matrix product


def _three_ranges(lo, full_lo, full_hi, hi, dense_mask: bool):
  """(start, stop, masked) for the masked head, the unmasked middle, the masked tail."""
  if dense_mask:
    return ((lo, hi, True),)
  return ((lo, full_lo, True), (full_lo, full_hi, False), (full_hi, hi, True))


def tile_scores(geo: Geometry, q, k, bias, keep, rows, cols, masked: bool, q_len, kv_len):
  if masked:
    structural = masks.element_mask(rows, cols, geo.spec, q_len, kv_len)
    keep = structural if keep is None else structural & keep
  else:
    keep = None
  return tiles.scores(q, k, geo.scale, bias, keep, geo.precision)


def _visit_kv_blocks(geo: Geometry, q, q_start, load_kv, q_len, kv_len, update, carry):
  """Fold ``update(scores, tile, carry)`` over the key blocks query block ``q_start`` sees."""
  rows = q_start + jnp.arange(geo.block_q, dtype=jnp.int32)
  ranges = masks.kv_block_range(q_start, geo.block_q, geo.block_k, geo.spec, q_len, kv_len)

  def body(masked):
    def step(j, carry):
      tile = load_kv(j)
      cols = j * geo.block_k + jnp.arange(geo.block_k, dtype=jnp.int32)
      s = tile_scores(geo, q, tile.k, tile.bias, tile.keep, rows, cols, masked, q_len, kv_len)
      return update(s, tile, carry)

    return step

  for start, stop, masked in _three_ranges(*ranges, geo.dense_mask):
    carry = lax.fori_loop(start, stop, body(masked), carry)
  return carry


def forward_rows(
  geo: Geometry,
  q,
  q_start,
  load_kv: Callable[[Any], KVTile],
  q_len,
  kv_len,
):
  """Output ``[bq, H]`` (f32) and base-2 LSE ``[bq]`` of one query block."""

  def update(s, tile, carry):
    return tiles.softmax_step(s, tile.v, *carry, precision=geo.precision)

  carry = tiles.softmax_init(q)
  carry = _visit_kv_blocks(geo, q, q_start, load_kv, q_len, kv_len, update, carry)
  return tiles.softmax_finish(*carry)


def dq_rows(
  geo: Geometry,
  q,
  do,
  lse2,
  delta,
  q_start,
  load_kv: Callable[[Any], KVTile],
  q_len,
  kv_len,
):
  """``dq [bq, H]`` (f32, scale applied) of one query block."""

  def update(s, tile, dq):
    _, ds = tiles.score_grad(s, tile.v, do, lse2, delta, geo.precision)
    return dq + tiles.dot(ds.astype(tile.k.dtype), tile.k, precision=geo.precision)

  # Built from the inputs (here and below) so that inside shard_map the loop
  # carry varies over the same mesh axes as the loop body's result.
  dq = jnp.zeros_like(q, jnp.float32)
  dq = _visit_kv_blocks(geo, q, q_start, load_kv, q_len, kv_len, update, dq)
  return dq * geo.scale


def dkv_cols(
  geo: Geometry,
  k,
  v,
  k_start,
  num_groups: int,
  load_q: Callable[[Any, Any], QTile],
  q_len,
  kv_len,
):
  """``dk, dv [bk, H]`` (f32, scale applied to dk) of one key block.

  Sums over the ``num_groups`` query heads that share this key/value head;
  ``load_q(g, i)`` loads query block ``i`` of the group's head ``g``.
  """
  cols = k_start + jnp.arange(geo.block_k, dtype=jnp.int32)
  ranges = masks.q_block_range(k_start, geo.block_k, geo.block_q, geo.spec, q_len, kv_len)

  def body(g, masked):
    def step(i, carry):
      dk, dv = carry
      tile = load_q(g, i)
      rows = i * geo.block_q + jnp.arange(geo.block_q, dtype=jnp.int32)
      s = tile_scores(geo, tile.q, k, tile.bias, tile.keep, rows, cols, masked, q_len, kv_len)
      p, ds = tiles.score_grad(s, v, tile.do, tile.lse2, tile.delta, geo.precision)
      dv = dv + tiles.dot_tn(p.astype(tile.do.dtype), tile.do, geo.precision)
      dk = dk + tiles.dot_tn(ds.astype(tile.q.dtype), tile.q, geo.precision)
      return dk, dv

    return step

  def group(g, carry):
    for start, stop, masked in _three_ranges(*ranges, geo.dense_mask):
      carry = lax.fori_loop(start, stop, body(g, masked), carry)
    return carry

  zeros = jnp.zeros_like(k, jnp.float32)
  if num_groups == 1:
    dk, dv = group(0, (zeros, zeros))
  else:
    dk, dv = lax.fori_loop(0, num_groups, group, (zeros, zeros))
  return dk * geo.scale, dv

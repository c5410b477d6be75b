"""The Mosaic GPU backward kernels (dK/dV and dQ) against the float64 reference.

On CPU they run in the Mosaic GPU interpreter, which only takes wgmma's left
operand from shared memory (``p_in_registers=False``); the register path is
lowered for CUDA here and run on the GPU machine.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import ON_GPU, normal, reference_with_grads, rel_err

from pallas_attention import masks, tuning
from pallas_attention.mosaic import backward as mosaic_bwd
from pallas_attention.tiles import LN2

MB = tuning.MosaicBlocks
# Two consumer warpgroups per CTA in both kernels, a three-deep ring, mixed tiles.
# 64-row tiles everywhere: the shapes below are multiples of 64, not of the table's tiles.
SMALL = tuning.MosaicBlocks(128, 2, 64, 64, 64, 64, 2)
WIDE = MB(128, 2, 64, 128, 128, 64, 3)
TALL = MB(128, 2, 128, 128, 128, 128, 1)


def _inputs(rng, b, t, s, n, kv_heads, h, dtype, q_len):
  q, do = (normal(rng, (b, t, n, h), dtype) for _ in range(2))
  k, v = (normal(rng, (b, s, kv_heads, h), dtype) for _ in range(2))
  return q, k, v, do.at[:, q_len:].set(0)  # padded rows carry no cotangent


def _check(rng, b, t, s, n, kv_heads, h, spec, q_len=None, kv_len=None, blocks=None, **kw):
  dtype = kw.pop("dtype", jnp.bfloat16)
  q_len, kv_len = q_len or t, kv_len or s
  q, k, v, do = _inputs(rng, b, t, s, n, kv_heads, h, dtype, q_len)
  window = None
  if spec.window_left is not None or spec.window_right is not None:
    window = (spec.window_left, spec.window_right)
  out, lse, (dq, dk, dv) = reference_with_grads(
    q,
    k,
    v,
    do,
    is_causal=spec.causal,
    local_window_size=window,
    query_seq_lengths=jnp.full((b,), q_len),
    key_value_seq_lengths=jnp.full((b,), kv_len),
  )
  lse2 = np.where(lse == -np.inf, np.inf, lse / LN2).astype(np.float32)
  delta = np.einsum("btnh,btnh->bnt", np.asarray(do, np.float64), out).astype(np.float32)
  got = mosaic_bwd.backward_jit(
    q,
    k,
    v,
    do,
    jnp.asarray(lse2),
    jnp.asarray(delta),
    scale=1 / math.sqrt(h),
    spec=spec,
    q_len=q_len,
    kv_len=kv_len,
    blocks=blocks or SMALL,
    **kw,
  )
  for name, actual, expected, like in zip("qkv", got, (dq, dk, dv), (q, k, v), strict=True):
    assert actual.shape == like.shape and actual.dtype == like.dtype, name
    assert rel_err(actual, expected) < 2e-2, name


@pytest.mark.parametrize(
  "b,t,s,n,kv_heads,h,spec,lengths,blocks",
  [
    (2, 128, 128, 2, 2, 64, masks.MaskSpec(), None, None),
    (1, 256, 256, 2, 1, 64, masks.MaskSpec(True), None, None),
    (1, 128, 192, 4, 2, 64, masks.MaskSpec(True), None, None),  # GQA, S > T
    (1, 192, 256, 2, 1, 64, masks.MaskSpec(False, 40, 17), None, None),
    # A left window only: edge tiles after the full ones over queries, before them over
    # keys (causal has them the other way round); the other runs are not compiled.
    (1, 192, 256, 2, 1, 64, masks.MaskSpec(False, 40, None), None, None),
    # Padding: query tile 3 and key tiles 2, 3 see nothing (empty CTAs).
    (1, 256, 256, 2, 1, 64, masks.MaskSpec(True), (150, 100), None),
    (1, 128, 128, 2, 1, 128, masks.MaskSpec(True), None, None),
    (1, 256, 256, 4, 2, 64, masks.MaskSpec(True), (200, 230), WIDE),
    (1, 256, 256, 2, 1, 64, masks.MaskSpec(False, 40, 17), None, TALL),
  ],
  ids=["plain", "causal", "gqa", "window", "window_left", "lengths", "h128", "wide", "tall"],
)
def test_backward_matches_reference(b, t, s, n, kv_heads, h, spec, lengths, blocks, rng):
  q_len, kv_len = lengths or (None, None)
  _check(rng, b, t, s, n, kv_heads, h, spec, q_len, kv_len, blocks)


# dK/dV split over two warpgroups (one accumulates dV, the other dK), as head dim 256 uses.
SPLIT = tuning.MosaicBlocks(64, 2, 64, 64, 64, 64, 2, dkv_split=True)


@pytest.mark.parametrize(
  "b,t,s,n,kv_heads,h,spec,lengths",
  [
    (1, 192, 256, 4, 2, 64, masks.MaskSpec(True), (150, 230)),  # GQA, lengths, causal
    (1, 128, 192, 2, 1, 256, masks.MaskSpec(False, 40, 17), None),
  ],
  ids=["gqa_causal_lengths", "h256_window"],
)
def test_backward_split_dkv(b, t, s, n, kv_heads, h, spec, lengths, rng):
  q_len, kv_len = lengths or (None, None)
  _check(rng, b, t, s, n, kv_heads, h, spec, q_len, kv_len, SPLIT)


# The fused backward (dQ added by the dK/dV kernel): one consumer (the interpreter's
# blocks), two consumers sharing out dQ by query rows, and by columns (head dim 128).
FUSED_ONE = tuning.MosaicBlocks(128, 2, 64, 64, 64, 64, 2, bwd_fused=True)
FUSED_ROWS = tuning.MosaicBlocks(128, 2, 128, 128, 128, 64, 2, bwd_fused=True)
FUSED_COLS = tuning.MosaicBlocks(128, 2, 64, 128, 128, 64, 2, bwd_fused=True)
# In the interpreter a kernel with two consumers and a producer can hang on a 2-core
# machine (see tuning.MOSAIC_INTERPRETER): those run on the GPU and are lowered on CPU.
_ON_GPU_ONLY = pytest.mark.skipif(not ON_GPU, reason="two consumers: GPU (lowered on CPU)")


@pytest.mark.parametrize(
  "b,t,s,n,kv_heads,h,spec,lengths,blocks",
  [
    (2, 128, 256, 2, 2, 64, masks.MaskSpec(), None, FUSED_ONE),
    (1, 256, 256, 4, 2, 64, masks.MaskSpec(True), (200, 230), FUSED_ONE),  # GQA, padding
    (1, 192, 256, 2, 1, 128, masks.MaskSpec(False, 40, 17), None, FUSED_ONE),
    pytest.param(
      1, 256, 384, 4, 2, 64, masks.MaskSpec(True), (200, 330), FUSED_ROWS, marks=_ON_GPU_ONLY
    ),
    pytest.param(
      1, 256, 256, 4, 2, 128, masks.MaskSpec(True), (200, 230), FUSED_COLS, marks=_ON_GPU_ONLY
    ),
    pytest.param(
      2, 256, 128, 2, 1, 128, masks.MaskSpec(False, 40, 17), None, FUSED_COLS, marks=_ON_GPU_ONLY
    ),
  ],
  ids=["one", "one_gqa_causal_lengths", "one_h128_window", "rows", "cols", "cols_window"],
)
@pytest.mark.parametrize("deterministic", [True, False], ids=["ordered", "unordered"])
def test_backward_fused(b, t, s, n, kv_heads, h, spec, lengths, blocks, deterministic, rng):
  """Ordered: key blocks launched from the last down and, on the GPU, dQ added in
  decreasing key-block order under global semaphores; unordered: adds in any order."""
  q_len, kv_len = lengths or (None, None)
  kw = dict(deterministic=deterministic)
  _check(rng, b, t, s, n, kv_heads, h, spec, q_len, kv_len, blocks, **kw)


def test_backward_fused_ordered_in_chunks(rng, monkeypatch):
  """The ordered kernel's CTAs launched two key blocks of a pair at a time (four
  blocks, four (batch, kv head) pairs; non-causal only): every CTA still gets its own
  key block."""
  assert mosaic_bwd._ordered_chunks(16, 128) == (128, 1)  # many key blocks: no chunks
  assert mosaic_bwd._ordered_chunks(128, 16) == (8, 16)
  monkeypatch.setattr(tuning, "ORDERED_CHUNK", 2)
  assert mosaic_bwd._ordered_chunks(4, 4) == (2, 4)
  assert mosaic_bwd._ordered_chunks(4, 4, causal=True) == (4, 1)
  # jit caches key on shapes, not on the table: no other test uses these shapes, so
  # this call traces with the patched chunk.
  _check(rng, 2, 128, 256, 4, 2, 64, masks.MaskSpec(), None, 230, FUSED_ONE)


def _launch_axes(b, kv_heads, num_kv):
  """The ordered kernel's grid axes (batch, kv head, key block), one entry per CTA in
  launch order (the grid's last axis fastest)."""
  grid = np.meshgrid(np.arange(b), np.arange(kv_heads), np.arange(num_kv), indexing="ij")
  return [jnp.asarray(x.ravel(), jnp.int32) for x in grid]


@pytest.mark.parametrize("down", [False, True])
@pytest.mark.parametrize("edges", [(False, False), (True, False), (False, True), (True, True)])
def test_sweep_order(down, edges):
  """``_sweep`` (plain JAX loops, run here outside a kernel): every tile of [lo, hi) once,
  in order (from hi - 1 down where ``down``, traced), visited where the rows may see it
  and masked outside the fully seen run, skipped elsewhere."""
  ranges = lo, c_lo, f_lo, f_hi, c_hi, hi = 1, 3, 4, 6, 8, 10
  log0 = (jnp.zeros(16, jnp.int32) - 1, jnp.int32(0))

  def record(code, i, carry):
    log, n = carry
    return log.at[n].set(code * 100 + i), n + 1

  def visit(masked, i, carry):
    return record(1 if masked is False else jnp.where(masked, 2, 1), i, carry)

  def skip(i, carry):
    return record(3, i, carry)

  traced = jnp.asarray(down) if down else False
  log, n = mosaic_bwd._sweep(ranges, visit, skip, log0, edges, traced)
  got = np.asarray(log)[: int(n)].tolist()
  lead, trail = edges
  expected = []
  for i in range(lo, hi):
    if not any(edges):
      expected.append(100 + i)
    elif not c_lo <= i < c_hi:
      expected.append(300 + i)
    else:
      masked = (lead and i < f_lo) or (trail and i >= f_hi)
      expected.append((200 if masked else 100) + i)
  assert got == (expected[::-1] if down else expected)


def test_backward_fused_ordered_pairs_in_turn(rng):
  """head_dim 128 non-causal: two pairs' key blocks launched in turn from 64 key blocks,
  four pairs' below (tuning.ORDERED_CHUNK_BY_HEAD_DIM); other head dims and causal
  calls keep the general rule. Through the interpreter against the reference."""
  assert tuning.ORDERED_CHUNK_BY_HEAD_DIM[128] == ((64, (1, 2)), (0, (1, 4)))
  assert mosaic_bwd._ordered_chunks(16, 128, head_dim=128) == (1, 2)
  assert mosaic_bwd._ordered_chunks(16, 64, head_dim=128) == (1, 2)
  assert mosaic_bwd._ordered_chunks(16, 32, head_dim=128) == (1, 4)
  assert mosaic_bwd._ordered_chunks(6, 32, head_dim=128) == (1, 3)  # a divisor of the pairs
  assert mosaic_bwd._ordered_chunks(3, 128, head_dim=128) == (1, 1)  # odd: one pair
  assert mosaic_bwd._ordered_chunks(16, 128, causal=True, head_dim=128) == (128, 1)
  assert mosaic_bwd._ordered_chunks(16, 128, head_dim=64) == (128, 1)
  b, t, s, kv_heads, num_kv = 2, 128, 256, 1, 4
  axes = _launch_axes(b, kv_heads, num_kv)
  *cta, _ = mosaic_bwd._ordered_cta(*axes, b, kv_heads, num_kv, head_dim=128)
  batch, _, block = (np.asarray(x) for x in cta)
  assert batch.tolist() == [0, 1] * num_kv  # the two pairs in turn
  assert block.tolist() == [3, 3, 2, 2, 1, 1, 0, 0]  # each from its last key block down
  _check(rng, b, t, s, 2, kv_heads, 128, masks.MaskSpec(), None, 250, FUSED_ONE, deterministic=True)


@pytest.mark.parametrize("down_blocks", [4, 1 << 20], ids=["last_pair", "every_pair"])
def test_backward_fused_ordered_heaviest_first(down_blocks, rng, monkeypatch):
  """Causal, the ordered kernel's last pair (or every pair) launched heaviest key block
  first, visiting the query tiles from the last down and adding from the lowest block
  up (tuning.ORDERED_DOWN_BLOCKS): GQA, padded lengths, the reference's gradients."""
  assert mosaic_bwd._ordered_down_pairs(4, 4, causal=False) == 0
  monkeypatch.setattr(tuning, "ORDERED_DOWN_BLOCKS", down_blocks)
  assert mosaic_bwd._ordered_down_pairs(4, 4, causal=True) == (1 if down_blocks == 4 else 4)
  # Shapes no other test uses (jit caches key on shapes, not on the table).
  t = 256 if down_blocks == 4 else 320
  spec = masks.MaskSpec(True)
  _check(rng, 2, t, 256, 4, 2, 64, spec, t - 30, 250, FUSED_ONE, deterministic=True)


@pytest.mark.parametrize(
  "b,kv_heads,num_kv,chunk,wave",
  [
    (1, 16, 128, 8, 128),
    (8, 16, 16, 8, 128),
    (3, 5, 24, 8, 128),
    (2, 2, 8, 8, 128),
    (4, 16, 32, 0, 128),
    (1, 1, 64, 16, 32),
    (2, 3, 12, 4, 128),
    (2, 3, 20, 8, 128),  # key blocks not a multiple of the chunk: one pair at a time
    (1, 17, 16, 8, 128),  # a prime number of pairs, more than fit a wave: groups of one
  ],
)
def test_ordered_launch_order(b, kv_heads, num_kv, chunk, wave, monkeypatch):
  """The ordered fused kernel's grid: one CTA per (batch, kv head, key block), and each
  pair's key blocks launched from the last down (a block waits only for higher blocks,
  so it never waits for a CTA launched after it)."""
  monkeypatch.setattr(tuning, "ORDERED_CHUNK", chunk)
  monkeypatch.setattr(tuning, "ORDERED_WAVE", wave)
  monkeypatch.setattr(tuning, "ORDERED_CHUNK_MAX_KV", 1024)  # chunks at any count here
  axes = _launch_axes(b, kv_heads, num_kv)
  *cta, down = mosaic_bwd._ordered_cta(*axes, b, kv_heads, num_kv)
  assert down is False  # not causal
  batch, head, block = (np.asarray(x) for x in cta)
  seen = sorted(zip(batch.tolist(), head.tolist(), block.tolist(), strict=True))
  assert seen == sorted(np.ndindex(b, kv_heads, num_kv))  # each CTA once
  for pair in range(b * kv_heads):
    launched = block[(batch * kv_heads + head) == pair]
    assert np.array_equal(launched, np.arange(num_kv)[::-1]), pair
  chunk_size, group = mosaic_bwd._ordered_chunks(b * kv_heads, num_kv)
  assert chunk_size * group <= max(wave, num_kv) and (b * kv_heads) % group == 0
  if chunk and num_kv > chunk and num_kv % chunk == 0:
    assert chunk_size == chunk  # the first chunk of `group` pairs starts together
    first = np.stack([batch, head], 1)[: chunk * group]
    assert len({tuple(x) for x in first.tolist()}) == group


@pytest.mark.parametrize("down_blocks,down_pairs", [(0, 0), (1, 1), (16, 1), (17, 2), (1000, 6)])
def test_ordered_launch_order_heaviest_first(down_blocks, down_pairs, monkeypatch):
  """Causal: the last pairs (enough for tuning.ORDERED_DOWN_BLOCKS key blocks) launch
  their key blocks from the first up, the others from the last down; every CTA once."""
  monkeypatch.setattr(tuning, "ORDERED_DOWN_BLOCKS", down_blocks)
  b, kv_heads, num_kv = 2, 3, 16
  axes = _launch_axes(b, kv_heads, num_kv)
  *cta, down = mosaic_bwd._ordered_cta(*axes, b, kv_heads, num_kv, causal=True)
  batch, head, block = (np.asarray(x) for x in cta)
  down = np.zeros(block.shape, bool) if down is False else np.asarray(down)
  seen = sorted(zip(batch.tolist(), head.tolist(), block.tolist(), strict=True))
  assert seen == sorted(np.ndindex(b, kv_heads, num_kv))
  pairs = batch * kv_heads + head
  assert np.array_equal(np.unique(pairs[down]), np.arange(b * kv_heads - down_pairs, b * kv_heads))
  for pair in range(b * kv_heads):
    launched = block[pairs == pair]
    ascending = pair >= b * kv_heads - down_pairs
    expected = np.arange(num_kv) if ascending else np.arange(num_kv)[::-1]
    assert np.array_equal(launched, expected), pair


@pytest.mark.parametrize(
  "spec,t,s,q_len,kv_len,bq,bk",
  [
    (masks.MaskSpec(), 512, 384, 512, 384, 64, 128),
    (masks.MaskSpec(True), 1024, 1024, 1024, 1024, 64, 128),
    (masks.MaskSpec(True), 1024, 1024, 1000, 900, 128, 128),
    (masks.MaskSpec(True), 512, 1024, 512, 1024, 64, 128),  # S > T
    (masks.MaskSpec(True), 1024, 512, 1024, 512, 64, 128),  # T > S: rows that see nothing
    (masks.MaskSpec(False, 200, 0), 1024, 1024, 1024, 1024, 64, 128),
    (masks.MaskSpec(False, 40, 17), 768, 1024, 700, 1000, 64, 64),
    (masks.MaskSpec(True, 300, None), 1024, 1024, 1024, 1024, 128, 128),
    (masks.MaskSpec(False, -300, 500), 1024, 1024, 1024, 1024, 64, 128),  # ring: off-diagonal
    (masks.MaskSpec(False, 500, -300), 1024, 1024, 1024, 1024, 64, 128),
  ],
)
def test_dq_contributors_are_the_blocks_that_see_each_tile(spec, t, s, q_len, kv_len, bq, bk):
  """The ordered fused backward's schedule: tile i's dQ gets adds from key blocks
  [first, first + count), exactly those with a visible (row, column) pair in the tile."""
  first, count = mosaic_bwd.dq_contributors(spec, q_len, kv_len, t, s, bq, bk)
  seen = np.asarray(masks.element_mask(jnp.arange(t), jnp.arange(s), spec, q_len, kv_len))
  seen = seen.reshape(t // bq, bq, s // bk, bk).any(axis=(1, 3))
  for i in range(t // bq):
    blocks = np.flatnonzero(seen[i])
    if blocks.size:
      assert (first[i], count[i]) == (blocks[0], blocks.size), i
      assert np.array_equal(blocks, np.arange(blocks[0], blocks[-1] + 1)), i
      for down in (False, True):
        _check_dq_turns([int(j) for j in blocks], int(first[i]), int(first[i] + count[i]), down)
    else:
      assert count[i] == 0, i


def _check_dq_turns(blocks, first, stop, down=False):
  """The ordered kernel's semaphore protocol (``_dq_turn``) for one tile, simulated: the
  blocks add one at a time from the highest down (from the lowest up where ``down``),
  each when the count reads its turn, and the count is back at zero after the last add
  (the next call starts from zero). Traced ``down`` gives the same turns."""
  turns = {j: mosaic_bwd._dq_turn(j, first, stop, down) for j in blocks}
  traced = {j: mosaic_bwd._dq_turn(j, first, stop, jnp.asarray(down)) for j in blocks}
  assert {j: tuple(bool(x) if k else int(x) for k, x in enumerate(traced[j])) for j in blocks} == {
    j: (int(turn), bool(last), bool(more)) for j, (turn, last, more) in turns.items()
  }
  order = sorted(blocks, key=lambda j: turns[j][0])
  assert order == sorted(blocks, reverse=not down)
  assert [turns[j][0] for j in order] == list(range(len(blocks)))
  count = 0
  for j in order:
    turn, last, more = turns[j]
    assert count == turn  # the wait (count >= turn) passes now and not before
    assert last == (j == order[-1]) and more == (not last)
    if last:
      count -= turn  # the lowest block's wait takes the count back down
    if more:
      count += 1  # signal the next block
  assert count == 0


@pytest.mark.skipif(not ON_GPU, reason="global semaphores: the interpreter has none")
@pytest.mark.parametrize("parts", [1, 2, 4, "up", "down16", "other_poll"])
@pytest.mark.parametrize("h,blocks", [(64, FUSED_ROWS), (128, FUSED_COLS)], ids=["rows", "cols"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_gpu_ordered_fused_backward_is_deterministic(h, blocks, causal, parts, rng, monkeypatch):
  """Many key blocks add into each dQ tile (16 CTAs per head): five calls give the
  same bits (the semaphores also come back to zero after each call, or the next call
  would wait forever or add out of order), close to the unordered kernel's dQ; with
  the adds counted per tile, per consumer slab or per half slab. Causal, by default
  every pair of these shapes is launched heaviest key block first
  (tuning.ORDERED_DOWN_BLOCKS); ``up`` / ``down16``: one count a tile, none / the last
  of the four pairs (16 key blocks) is; ``other_poll``: the writer polls for its turn
  after the slabs are in, not before (tuning.ORDERED_POLL_FIRST)."""
  if parts == "other_poll":
    monkeypatch.setattr(tuning, "ORDERED_POLL_FIRST", not tuning.ORDERED_POLL_FIRST)
    parts = 1
  if isinstance(parts, str):
    if not causal:
      pytest.skip("heaviest first: causal calls only")
    monkeypatch.setattr(tuning, "ORDERED_DOWN_BLOCKS", 0 if parts == "up" else 16)
    parts = 1
  monkeypatch.setattr(tuning, "ORDERED_DQ_PARTS", parts)
  jax.clear_caches()  # backward_jit's cache keys on its arguments, not on the table
  b, t, n, kv_heads = 2, 2048, 4, 2
  q, k, v, do = _inputs(rng, b, t, t, n, kv_heads, h, jnp.bfloat16, t)
  lse2 = jnp.zeros((b, n, t), jnp.float32)  # any finite values: a fixed function of q, k, v
  delta = jnp.ones((b, n, t), jnp.float32) * 0.01
  call = functools.partial(
    mosaic_bwd.backward_jit,
    scale=0.1,
    spec=masks.MaskSpec(causal),
    q_len=t,
    kv_len=t,
    blocks=blocks,
  )
  runs = [call(q, k, v, do, lse2, delta) for _ in range(5)]
  for other in runs[1:]:
    for name, x, y in zip("qkv", runs[0], other, strict=True):
      assert np.array_equal(np.asarray(x), np.asarray(y)), name
  unordered = call(q, k, v, do, lse2, delta, deterministic=False)
  for name, x, y in zip("qkv", runs[0], unordered, strict=True):
    assert rel_err(x, y) < 1e-2, name
  jax.clear_caches()


@pytest.mark.skipif(not ON_GPU, reason="the default backward at these lengths: GPU only")
@pytest.mark.parametrize("t,causal", [(1024, True), (2048, False)])
def test_default_backward_head_dim_64_ordered_from_table(t, causal, rng):
  """head_dim 64 takes the ordered fused backward from 1k keys causal and 2k not
  (tuning._ORDERED_MIN_KV): through flash_attention, the reference's gradients, and
  the same bits from a second call."""
  from pallas_attention import flash_attention

  assert tuning.fused_backward(64, causal, t, deterministic=True)
  q, k, v, do = (normal(rng, (1, t, 2, 64), jnp.bfloat16) for _ in range(4))
  _, _, ref = reference_with_grads(q, k, v, do, is_causal=causal)

  def grads(q, k, v):
    call = lambda *a: flash_attention(*a, is_causal=causal, implementation="mosaic")  # noqa: E731
    return jax.vjp(call, q, k, v)[1](do)

  got = jax.jit(grads)(q, k, v)
  for name, x, want in zip("qkv", got, ref, strict=True):
    assert rel_err(x, want) < 2e-2, name
  again = jax.jit(grads)(q, k, v)
  for name, x, y in zip("qkv", got, again, strict=True):
    assert np.array_equal(np.asarray(x), np.asarray(y)), name


def test_backward_fused_rejects_blocks_it_cannot_share_out(rng):
  q = normal(rng, (1, 256, 1, 64), jnp.bfloat16)
  vec = jnp.zeros((1, 1, 256), jnp.float32)
  with pytest.raises(ValueError, match="bwd_fused"):  # 64-column halves need head dim 128
    mosaic_bwd.backward(
      q,
      q,
      q,
      q,
      vec,
      vec,
      scale=0.125,
      spec=masks.MaskSpec(),
      q_len=256,
      kv_len=256,
      blocks=FUSED_COLS,
    )


def test_backward_through_shared_memory(rng):
  """``p_in_registers=False`` explicitly (the only path the interpreter runs)."""
  spec = masks.MaskSpec(True, 70, None)
  _check(rng, 1, 128, 128, 4, 1, 64, spec, dtype=jnp.float16, p_in_registers=False)


@pytest.mark.skipif(ON_GPU, reason="on the GPU the tests above run this path")
@pytest.mark.parametrize(
  "h,blocks,deterministic,parts",
  [
    (64, None, True, 1),
    (128, TALL, True, 1),
    (256, None, True, 1),
    (256, "no_split", True, 1),
    (64, FUSED_ROWS, True, 1),
    (64, FUSED_ROWS, True, 4),
    (64, FUSED_ROWS, False, 1),
    (128, FUSED_COLS, True, 1),
    (128, FUSED_COLS, True, 2),
    (128, FUSED_COLS, False, 1),
    (128, FUSED_COLS, True, "up"),
  ],
)
def test_register_path_lowers_for_cuda(h, blocks, deterministic, parts, monkeypatch):
  """The GPU-only path (wgmma from registers) lowers: layouts and shared memory fit
  (the mask is causal: by default every pair of these shapes is launched heaviest key
  block first, tuning.ORDERED_DOWN_BLOCKS; "up": one count a tile, none is)."""
  if parts == "up":
    parts = 1
    monkeypatch.setattr(tuning, "ORDERED_DOWN_BLOCKS", 0)
  monkeypatch.setattr(tuning, "ORDERED_DQ_PARTS", parts)
  if blocks == "no_split":  # one warpgroup holding both dK and dV (it spills, but lowers)
    blocks = dataclasses.replace(tuning.mosaic_blocks(h), dkv_split=False)
  blocks = blocks or tuning.mosaic_blocks(h)
  b, t, n, kv_heads = 1, 256, 4, 2
  q = jax.ShapeDtypeStruct((b, t, n, h), jnp.bfloat16)
  k = jax.ShapeDtypeStruct((b, t, kv_heads, h), jnp.bfloat16)
  vec = jax.ShapeDtypeStruct((b, n, t), jnp.float32)
  static = dict(scale=0.1, spec=masks.MaskSpec(True, 100, None), q_len=200, kv_len=t)
  choices = dict(p_in_registers=True, interpret=False, deterministic=deterministic)
  call = functools.partial(mosaic_bwd.kernels, **static, blocks=blocks, **choices)
  lowered = jax.jit(call).trace(q, k, k, q, vec, vec).lower(lowering_platforms=("cuda",))
  text = lowered.as_text()
  assert "mosaic_gpu" in text
  # The ordered fused kernel counts adds with global semaphores (a release add).
  assert ("red.release.gpu.global.add" in text) == (blocks.bwd_fused and deterministic)


@pytest.mark.parametrize("ordered", [True, False], ids=["ordered", "unordered"])
def test_fused_timeline_lowers_for_cuda(ordered):
  """benchmarks/timeline_probe.py's hook: the fused kernel with its clock stamps lowers
  for CUDA with the stamps (CTAs × steps × events) and SMs (CTAs) as two more outputs;
  it needs the GPU's TMA adds (not the interpreter's path)."""
  h, b, t, n, kv_heads = 128, 1, 512, 2, 2
  blocks = dataclasses.replace(tuning.mosaic_blocks(h), **tuning._MOSAIC_FUSED[h])
  q = jax.ShapeDtypeStruct((b, t, n, h), jnp.bfloat16)
  k = jax.ShapeDtypeStruct((b, t, kv_heads, h), jnp.bfloat16)
  vec = jax.ShapeDtypeStruct((b, n, t), jnp.float32)
  spec = masks.MaskSpec()

  def call(*args, reduce=True):
    static = (0.1, spec, t, t, blocks, True)
    return mosaic_bwd._fused(*args, *static, reduce, ordered, timeline=True)

  traced = jax.jit(call).trace(q, k, k, q, vec, vec)
  ctas, steps = b * kv_heads * (t // blocks.dkv_kv), t // blocks.dkv_q
  events = len(mosaic_bwd.TIMELINE_EVENTS)
  assert [x.shape for x in traced.out_info[3:]] == [(ctas, steps, events), (ctas,)]
  text = traced.lower(lowering_platforms=("cuda",)).as_text()
  assert "mosaic_gpu" in text
  with pytest.raises(ValueError, match="timeline"):
    jax.jit(functools.partial(call, reduce=False)).trace(q, k, k, q, vec, vec)


def test_ordered_dq_parts():
  """The parts the ordered kernel counts apart cover each consumer's slab exactly."""
  assert mosaic_bwd._dq_parts(2, 64, 1) == (((0, 0, 64), (1, 0, 64)),)
  assert mosaic_bwd._dq_parts(2, 64, 2) == (((0, 0, 64),), ((1, 0, 64),))
  parts = mosaic_bwd._dq_parts(2, 64, 4)
  assert parts == (((0, 0, 32),), ((0, 32, 32),), ((1, 0, 32),), ((1, 32, 32),))
  for parts in (3, 8):
    with pytest.raises(ValueError, match="ORDERED_DQ_PARTS"):
      mosaic_bwd._dq_parts(2, 64, parts)


def test_unsupported_inputs_raise(rng):
  blocks = tuning.mosaic_blocks(64)
  q = normal(rng, (1, 100, 1, 64), jnp.bfloat16)
  vec = jnp.zeros((1, 1, 100), jnp.float32)
  call = functools.partial(
    mosaic_bwd.backward, scale=0.125, spec=masks.MaskSpec(), q_len=100, kv_len=100
  )
  with pytest.raises(ValueError, match="multiples"):
    call(q, q, q, q, vec, vec, blocks=blocks)
  q32 = normal(rng, (1, 128, 1, 64))
  with pytest.raises(NotImplementedError, match="dtype"):
    call(q32, q32, q32, q32, vec, vec, blocks=blocks)
  q96 = normal(rng, (1, 128, 1, 96), jnp.bfloat16)
  with pytest.raises(NotImplementedError, match="head dim"):
    call(q96, q96, q96, q96, vec, vec, blocks=blocks)

"""The Mosaic GPU forward kernel against the float64 reference, at the kernel level.

On CPU it runs in the Mosaic GPU interpreter (P staged through shared memory);
on the GPU machine compiled, with P in registers and, as a cross-check, through
shared memory. flash_attention-level tests (forward and backward) are in
test_attention.py, where ``mosaic`` is one of the implementations.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import ON_GPU, normal, reference_with_grads, rel_err

from pallas_attention import masks
from pallas_attention.mosaic import forward as mosaic_forward
from pallas_attention.tiles import LN2

P_PATHS = [True, False] if ON_GPU else [False]


def _check_forward(q, k, v, spec, q_len, kv_len, **options):
  """The forward kernel on padded inputs against the reference on the unpadded ones.

  Returns the kernel's output (float32) and natural-log LSE."""
  window = (spec.window_left, spec.window_right)
  ref_out, ref_lse, _ = reference_with_grads(
    q[:, :q_len],
    k[:, :kv_len],
    v[:, :kv_len],
    q[:, :q_len],
    is_causal=spec.causal,
    local_window_size=window,
  )
  run = jax.jit(
    lambda q, k, v: mosaic_forward.forward(
      q,
      k,
      v,
      scale=1 / math.sqrt(q.shape[-1]),
      spec=spec,
      q_len=q_len,
      kv_len=kv_len,
      **options,
    )
  )
  out, lse2 = run(q, k, v)
  assert out.shape == q.shape and out.dtype == q.dtype
  out, lse = np.asarray(out, np.float32), np.asarray(lse2) * LN2
  assert rel_err(out[:, :q_len], ref_out) < 2e-2
  empty = ~np.isfinite(ref_lse)
  np.testing.assert_array_equal(~np.isfinite(lse[:, :, :q_len]), empty)
  assert rel_err(lse[:, :, :q_len][~empty], ref_lse[~empty]) < 2e-2
  # Padded rows attend to nothing: zero output, -inf LSE.
  assert not out[:, q_len:].any()
  assert np.all(lse[:, :, q_len:] == -np.inf)
  return out, lse


@pytest.mark.parametrize("pipelined", [False, True], ids=["serial", "pipelined"])
@pytest.mark.parametrize("p_in_registers", P_PATHS)
@pytest.mark.parametrize(
  "t,s,heads,kv_heads,head_dim,spec,q_len,kv_len,block_kv,stages",
  [
    (256, 256, 2, 1, 64, masks.MaskSpec(), 256, 256, 128, 2),
    (256, 384, 2, 2, 64, masks.MaskSpec(True), 256, 384, 64, 3),
    (256, 256, 2, 1, 128, masks.MaskSpec(True, 40, 17), 200, 230, 128, 2),
    (128, 256, 1, 1, 256, masks.MaskSpec(False, None, 0), 128, 256, 64, 2),
  ],
)
def test_forward_kernel(
  t,
  s,
  heads,
  kv_heads,
  head_dim,
  spec,
  q_len,
  kv_len,
  block_kv,
  stages,
  p_in_registers,
  pipelined,
  rng,
):
  q = normal(rng, (1, t, heads, head_dim), jnp.bfloat16)
  k, v = (normal(rng, (1, s, kv_heads, head_dim), jnp.bfloat16) for _ in range(2))
  options = dict(block_kv=block_kv, stages=stages, p_in_registers=p_in_registers)
  _check_forward(q, k, v, spec, q_len, kv_len, pipelined=pipelined, **options)


@pytest.mark.parametrize("pipelined", [False, True], ids=["serial", "pipelined"])
@pytest.mark.parametrize(
  "spec,q_len,kv_len,rows_without_keys",
  [
    # Row i sees keys up to i - 384: the first 384 rows see nothing, so the first three
    # CTAs visit no key tile at all.
    (masks.MaskSpec(False, None, -384), 512, 256, 384),
    # Row i sees keys i - 150 ... i - 100: rows below 100 are empty inside a CTA that
    # still visits a tile for its other rows.
    (masks.MaskSpec(False, 150, -100), 256, 256, 100),
  ],
)
def test_forward_rows_without_keys(spec, q_len, kv_len, rows_without_keys, pipelined, rng):
  """Rows that see no key: zero output and -inf LSE, also for CTAs that visit no tile."""
  visible = masks.visible(
    np.arange(q_len)[:, None], np.arange(kv_len)[None, :], spec, q_len, kv_len
  )
  visible = np.asarray(visible)
  assert not visible[:rows_without_keys].any() and visible[rows_without_keys:].any(axis=1).all()
  q = normal(rng, (1, q_len, 2, 64), jnp.bfloat16)
  k, v = (normal(rng, (1, kv_len, 2, 64), jnp.bfloat16) for _ in range(2))
  out, lse = _check_forward(q, k, v, spec, q_len, kv_len, pipelined=pipelined)
  assert not out[:, :rows_without_keys].any()
  assert np.all(lse[:, :, :rows_without_keys] == -np.inf)
  assert out[:, rows_without_keys:].any(axis=-1).all()  # the other rows are not zeroed


@pytest.mark.parametrize("p_in_registers", P_PATHS)
@pytest.mark.parametrize(
  "batch,t,s,kv_heads,spec,q_len,kv_len,tiles,pipelined",
  [
    # Four tiles a CTA, in the order last, first, second-last, second (one CTA a head).
    (1, 512, 512, 2, masks.MaskSpec(True), 500, 480, 4, False),
    # The first three tiles see no key: CTAs whose first or second tile visits none.
    (2, 512, 256, 2, masks.MaskSpec(False, None, -384), 512, 256, 2, True),
    # Three asked, two taken (four tiles); GQA; a window.
    (1, 512, 512, 1, masks.MaskSpec(True, 40, 17), 512, 512, 3, False),
  ],
)
def test_forward_several_query_tiles_a_cta(
  batch, t, s, kv_heads, spec, q_len, kv_len, tiles, pipelined, p_in_registers, rng
):
  """A CTA running query tiles one after the other (the next one's Q and key/value tiles
  loading during the current one) gives the reference's answer for every tile."""
  q = normal(rng, (batch, t, 2, 64), jnp.bfloat16)
  k, v = (normal(rng, (batch, s, kv_heads, 64), jnp.bfloat16) for _ in range(2))
  options = dict(tiles_per_cta=tiles, pipelined=pipelined, p_in_registers=p_in_registers)
  _check_forward(q, k, v, spec, q_len, kv_len, block_kv=128, **options)


def test_forward_several_query_tiles_limits():
  """Two Q buffers at head dim 256 do not fit beside the key/value ring: a clear error,
  not a failed compile; nor do more tiles than the kernel unrolls."""
  q = jax.ShapeDtypeStruct((1, 256, 1, 256), jnp.bfloat16)
  run = functools.partial(
    mosaic_forward.forward,
    scale=0.1,
    spec=masks.MaskSpec(),
    q_len=256,
    kv_len=256,
    block_kv=64,
    tiles_per_cta=2,
    interpret=False,
  )
  with pytest.raises(ValueError, match="shared memory"):
    jax.eval_shape(run, q, q, q)
  # More tiles than the kernel unrolls: refused, not silently slow.
  q = jax.ShapeDtypeStruct((1, 1024, 1, 64), jnp.bfloat16)
  with pytest.raises(ValueError, match="tiles_per_cta=8"):
    jax.eval_shape(functools.partial(run, block_kv=128, tiles_per_cta=8), q, q, q)


def test_forward_kernel_rejects_ragged_shapes(rng):
  q = normal(rng, (1, 100, 1, 64), jnp.bfloat16)
  with pytest.raises(ValueError, match="T=100"):
    mosaic_forward.forward(q, q, q, scale=0.125, spec=masks.MaskSpec(), q_len=100, kv_len=100)


@pytest.mark.parametrize("pipelined", [False, True], ids=["serial", "pipelined"])
@pytest.mark.parametrize("p_in_registers", P_PATHS)
@pytest.mark.parametrize(
  "batch,t,s,heads,kv_heads,spec,q_len,kv_len,kv_split",
  [
    # Padded rows and columns; the last part holds the masked key tile.
    (1, 384, 512, 2, 2, masks.MaskSpec(), 300, 450, (1, 2)),
    # GQA, two batches, parts of unequal length (5 key tiles in 3 parts).
    (2, 512, 320, 2, 1, masks.MaskSpec(), 512, 320, (2, 3)),
    # Not planned for masks like these, but right for them too: a part may see no key
    # of some rows (its LSE -inf), a row may see none at all.
    (1, 512, 512, 2, 2, masks.MaskSpec(True, 100, 0), 512, 512, (3, 4)),
    (1, 512, 256, 2, 2, masks.MaskSpec(False, None, -384), 512, 256, (3, 2)),
  ],
)
def test_forward_kv_split(
  batch, t, s, heads, kv_heads, spec, q_len, kv_len, kv_split, p_in_registers, pipelined, rng
):
  """The first query tiles as key-range parts merged by LSE: the reference's answer; the
  whole tiles bit for bit the unsplit kernel's, the split ones within rounding of it."""
  q = normal(rng, (batch, t, heads, 64), jnp.bfloat16)
  k, v = (normal(rng, (batch, s, kv_heads, 64), jnp.bfloat16) for _ in range(2))
  options = dict(block_kv=64, pipelined=pipelined, p_in_registers=p_in_registers)
  out, lse = _check_forward(q, k, v, spec, q_len, kv_len, kv_split=kv_split, **options)
  plain_out, plain_lse = _check_forward(q, k, v, spec, q_len, kv_len, **options)
  _same_outside_split((out, lse), (plain_out, plain_lse), kv_split[0] * mosaic_forward.CTA_ROWS)


def _same_outside_split(split, plain, rows):
  """A split forward's output and LSE against the unsplit kernel's: bit for bit after the
  first ``rows`` query rows (the whole tiles), within rounding in them (the parts)."""
  (out, lse), (plain_out, plain_lse) = split, plain
  np.testing.assert_array_equal(out[:, rows:], plain_out[:, rows:])
  np.testing.assert_array_equal(lse[..., rows:], plain_lse[..., rows:])
  np.testing.assert_allclose(out[:, :rows], plain_out[:, :rows], rtol=1e-2, atol=1e-2)
  np.testing.assert_allclose(lse[..., :rows], plain_lse[..., :rows], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("p_in_registers", P_PATHS[:1])
def test_forward_kv_split_head_dim_256(p_in_registers, rng):
  """Head dim 256 (the pipelined loop, 64-row key tiles, its parts' output in 32-column
  slices): the reference's answer, whole tiles bit for bit the unsplit kernel's (output
  and LSE), the split ones within rounding of it. On the GPU with P in registers only:
  through shared memory the split does not fit there."""
  q, k, v = (normal(rng, (1, 256, 1, 256), jnp.bfloat16) for _ in range(3))
  spec = masks.MaskSpec()
  options = dict(block_kv=64, pipelined=True, p_in_registers=p_in_registers)
  split = _check_forward(q, k, v, spec, 256, 250, kv_split=(1, 3), **options)
  _same_outside_split(split, _check_forward(q, k, v, spec, 256, 250, **options), 128)


def test_forward_kv_split_limits():
  """A split that cannot run is refused with a reason: with several query tiles a CTA,
  with a tail as long as the query, more parts than key tiles, or where its parts'
  float32 output does not fit in shared memory (head dim 256 with 128-row key tiles; with
  the table's 64-row tiles it fits)."""
  run = functools.partial(
    mosaic_forward.forward, scale=0.1, spec=masks.MaskSpec(), q_len=256, kv_len=256
  )
  q = jax.ShapeDtypeStruct((1, 256, 1, 64), jnp.bfloat16)
  with pytest.raises(ValueError, match="one query tile a CTA"):
    jax.eval_shape(functools.partial(run, tiles_per_cta=2, kv_split=(1, 2)), q, q, q)
  with pytest.raises(ValueError, match="tail < query tiles"):
    jax.eval_shape(functools.partial(run, kv_split=(2, 2)), q, q, q)
  with pytest.raises(ValueError, match="parts <= key tiles"):
    jax.eval_shape(functools.partial(run, block_kv=128, kv_split=(1, 3)), q, q, q)
  q = jax.ShapeDtypeStruct((1, 256, 1, 256), jnp.bfloat16)
  with pytest.raises(ValueError, match="shared memory"):
    jax.eval_shape(functools.partial(run, block_kv=128, interpret=False, kv_split=(1, 2)), q, q, q)
  assert not mosaic_forward.kv_split_fits(256, 128, 2, 2)
  # The table's blocks: head dim 256 stages its parts' output 32 columns at a time.
  assert mosaic_forward.kv_split_fits(256, 64, 2, 2)
  assert mosaic_forward.kv_split_fits(128, 128, 2, 2)
  assert mosaic_forward.kv_split_fits(64, 256, 2, 2)


def test_merge_parts(rng):
  """Outputs over disjoint key ranges, each softmax-normalised, merged by their LSE equal
  attention over all the keys; a part that sees no key weighs nothing, and a row that sees
  none in any part gets a zero output and -inf LSE."""
  q = np.asarray(normal(rng, (1, 8, 2, 16)))
  k, v = (np.asarray(normal(rng, (1, 24, 2, 16))) for _ in range(2))
  scores = np.einsum("btnh,bsnh->bnts", q, k)
  scores[:, :, 0, :] = -np.inf  # row 0 sees nothing
  scores[:, :, 1, 8:] = -np.inf  # row 1 sees only the first part's keys

  def attend(cols):
    sc = scores[..., cols]
    top = np.max(sc, axis=-1, keepdims=True)
    top = np.where(np.isfinite(top), top, 0.0)
    w = np.exp(sc - top)
    total = w.sum(-1, keepdims=True)
    out = np.einsum("bnts,bsnh->btnh", w / np.where(total > 0, total, 1), v[:, cols])
    lse = np.where(total > 0, top + np.log(np.where(total > 0, total, 1)), -np.inf)[..., 0]
    return out, lse / LN2  # base 2

  ranges = [slice(0, 8), slice(8, 13), slice(13, 24)]
  parts = [attend(cols) for cols in ranges]
  o_parts = jnp.asarray(np.stack([o for o, _ in parts]))
  lse_parts = jnp.asarray(np.stack([lse for _, lse in parts]))
  out, lse = mosaic_forward.merge_parts(o_parts, lse_parts)
  want_out, want_lse = attend(slice(0, 24))
  np.testing.assert_allclose(np.asarray(out), want_out, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.asarray(lse), want_lse, rtol=1e-5)
  assert np.all(np.asarray(lse)[:, :, 0] == -np.inf) and not np.asarray(out)[:, 0].any()


def test_forward_kv_split_plan(monkeypatch):
  """The launch model splits a grid whose last wave is part empty when that shortens the
  modelled span, and leaves whole waves, short grids and very long ones alone."""
  from pallas_attention import tuning

  assert tuning._launch_span(132, [(133, 1.0)]) == 2.0
  assert tuning._launch_span(4, [(4, 3.0), (4, 1.0), (1, 1.0)]) == 5.0
  # Head dim 256 at 16k (8 heads, 7.76 waves): a plan only with its own 5 parts.
  assert tuning.forward_kv_split(8, 128, 256, 132) is None
  assert tuning.forward_kv_split(8, 128, 256, 132, head_dim=256)[1] == 5
  # head_dim 128 at 16k in the protocol: 16 heads of 128 query tiles, 15.5 waves.
  plan = tuning.forward_kv_split(16, 128, 128, 132)
  assert plan is not None
  tail, parts = plan
  assert 1 <= tail < 128 and parts in tuning.FWD_SPLIT_PARTS
  assert 128 // parts >= tuning.FWD_SPLIT_MIN_PART
  whole = 128 + tuning.FWD_SPLIT_OVERHEAD
  unsplit = tuning._launch_span(132, [(2048, whole)])
  sizes = [(p + 1) * 128 // parts - p * 128 // parts for p in range(parts)]
  pieces = [(tail, size + tuning.FWD_SPLIT_OVERHEAD) for size in sizes] * 16
  split = tuning._launch_span(132, [(16 * (128 - tail), whole)] + pieces)
  assert split < unsplit * (1 - tuning.FWD_SPLIT_MIN_GAIN)
  assert tuning.forward_kv_split(16, 132, 128, 132) is None  # 16 whole waves
  assert tuning.forward_kv_split(2, 8, 4, 132) is None  # keys too short to part
  assert tuning.forward_kv_split(1000, 128, 128, 132) is None  # 970 waves: nothing to gain
  monkeypatch.setattr(tuning, "FWD_KV_SPLIT", False)
  assert tuning.forward_kv_split(16, 128, 128, 132) is None


@pytest.mark.skipif(ON_GPU, reason="lowers for CUDA as a CPU run would not")
def test_forward_kv_split_dispatch(monkeypatch):
  """flash_attention on a Hopper GPU (lowered for CUDA here, 132 SMs assumed) splits the
  last wave of a long non-causal forward as tuning.forward_kv_split plans; not causal."""
  from pallas_attention import flash_attention, tuning
  from pallas_attention.mosaic import attention

  monkeypatch.setattr(attention.fwd, "interpreting", lambda: False)
  monkeypatch.setattr(attention, "_sm_count", lambda: 132)
  x = jax.ShapeDtypeStruct((1, 16384, 9, 128), jnp.bfloat16)
  tail, parts = tuning.forward_kv_split(9, 128, 128, 132)
  parts_type = f"tensor<{parts}x1x{tail * 128}x9x128xf32>"

  def lowered(causal):
    run = functools.partial(flash_attention, is_causal=causal, implementation="mosaic")
    return jax.jit(run).trace(x, x, x).lower(lowering_platforms=("cuda",)).as_text()

  assert parts_type in lowered(False)
  assert parts_type not in lowered(True)
  # Shorter keys: no split (tuning.FWD_SPLIT_MIN_KV).
  x = jax.ShapeDtypeStruct((1, 8192, 18, 128), jnp.bfloat16)
  assert tuning.forward_kv_split(18, 64, 64, 132) is not None
  assert "x18x128xf32>" not in lowered(False)


@pytest.mark.skipif(not ON_GPU, reason="the launch plan needs the GPU's SM count")
def test_gpu_flash_attention_kv_split(monkeypatch, rng):
  """On the GPU, a long non-causal call whose grid the plan splits: output and gradients
  as without the split (whole query tiles bit for bit, split ones within rounding)."""
  from pallas_attention import flash_attention, tuning
  from pallas_attention.mosaic import attention

  b, t, n, h = 1, 16384, 9, 128
  plan = tuning.forward_kv_split(b * n, t // 128, t // 128, attention._sm_count())
  if plan is None:
    pytest.skip(f"no split planned on {attention._sm_count()} SMs")
  q, k, v, do = (normal(rng, (b, t, n, h), jnp.bfloat16) for _ in range(4))

  def run():
    jax.clear_caches()
    fn = functools.partial(flash_attention, implementation="mosaic")
    out, vjp = jax.vjp(fn, q, k, v)
    return [np.asarray(x, np.float32) for x in (out, *vjp(do))]

  split = run()
  monkeypatch.setattr(tuning, "FWD_KV_SPLIT", False)
  plain = run()
  rows = plan[0] * 128
  np.testing.assert_array_equal(split[0][:, rows:], plain[0][:, rows:])
  assert rel_err(split[0][:, :rows], plain[0][:, :rows]) < 1e-2
  for got, want in zip(split[1:], plain[1:], strict=True):
    assert rel_err(got, want) < 1e-2


def test_block_table_short_and_long_keys():
  """head_dim 64 takes 256-row forward key tiles except for short causal key sequences."""
  from pallas_attention import tuning

  assert tuning.mosaic_blocks(64, causal=True, kv_len=16384).fwd_kv == 256
  assert tuning.mosaic_blocks(64, causal=True, kv_len=4096).fwd_kv == 128
  assert tuning.mosaic_blocks(64, causal=False, kv_len=1024).fwd_kv == 256
  assert tuning.mosaic_blocks(128, kv_len=16384).fwd_kv == 128
  assert tuning.mosaic_blocks(256).dkv_split
  # The pipelined forward: head dims 128 and 256 from 2048 keys; head dim 64 never.
  assert tuning.mosaic_blocks(128).fwd_pipelined and tuning.mosaic_blocks(256).fwd_pipelined
  assert tuning.mosaic_blocks(128, causal=True, kv_len=2048).fwd_pipelined
  assert not tuning.mosaic_blocks(128, kv_len=1024).fwd_pipelined
  assert not tuning.mosaic_blocks(256, causal=True, kv_len=512).fwd_pipelined
  assert not tuning.mosaic_blocks(64).fwd_pipelined
  # Query tiles a forward CTA: several for short keys, one for long ones (head dim 256:
  # one, its second Q buffer would not fit).
  q_tiles = {
    (hd, causal, kv): tuning.mosaic_blocks(hd, causal=causal, kv_len=kv).fwd_q_tiles
    for hd in (64, 128, 256)
    for causal in (False, True)
    for kv in (512, 2048, 4096, 8192, 16384, None)
  }
  assert q_tiles[64, False, 512] == 4 and q_tiles[64, False, 2048] == 2
  assert q_tiles[64, True, 4096] == 4 and q_tiles[64, True, 8192] == 1
  assert q_tiles[128, False, 4096] == 2 and q_tiles[128, False, 8192] == 1
  assert q_tiles[128, True, 8192] == 2 and q_tiles[128, True, 16384] == 1
  assert all(q_tiles[hd, c, None] == 1 for hd in (64, 128, 256) for c in (False, True))
  assert all(q_tiles[256, c, kv] == 1 for c in (False, True) for kv in (512, 16384))
  # deterministic_backward=False: fused backward blocks at head dims 64 and 128 only.
  assert not tuning.mosaic_blocks(128).bwd_fused
  assert tuning.mosaic_blocks(64, fused=True).bwd_fused
  assert tuning.mosaic_blocks(128, fused=True).bwd_fused
  assert not tuning.mosaic_blocks(256, fused=True).bwd_fused
  assert not tuning.mosaic_blocks(128, causal=True, kv_len=2048, fused=True).bwd_fused
  assert tuning.mosaic_blocks(128, causal=True, kv_len=4096, fused=True).bwd_fused
  assert tuning.mosaic_blocks(64, causal=True, kv_len=512, fused=True).bwd_fused
  # Which calls take the fused backward: every one with deterministic_backward=False
  # (where the head dim has it); deterministic ones (dQ added in order) long only,
  # where it was measured faster than the two-kernel backward.
  fused = tuning.fused_backward
  assert fused(64, True, 512, deterministic=False) and fused(128, False, 512, False)
  assert not fused(256, False, 16384, deterministic=False)
  assert not fused(128, True, 2048, deterministic=False) and fused(128, True, 4096, False)
  assert fused(128, False, 2048, True) and fused(64, False, 4096, True)
  assert not fused(128, False, 1024, True) and not fused(64, False, 1024, True)
  assert fused(64, False, 2048, True)
  assert fused(64, True, 1024, True) and not fused(64, True, 512, True)
  assert fused(128, True, 4096, True) and not fused(128, True, 2048, True)
  assert not fused(256, False, 16384, True)


def test_autotuner_picks_and_caches_mosaic_blocks(rng, tmp_path, monkeypatch):
  """Opt-in autotuning through flash_attention: correct results, both parts tuned and
  cached on disk with a time per candidate, and a second call served from the cache."""
  import json

  from pallas_attention import autotune, flash_attention, tuning

  monkeypatch.setenv("PALLAS_ATTENTION_CACHE_DIR", str(tmp_path))
  autotune._clear_memo()
  autotune.enable(True)
  try:
    q, k, v, ct = (normal(rng, (1, 128, 2, 64), jnp.bfloat16) for _ in range(4))

    def grads(q, k, v):
      out, vjp = jax.vjp(lambda *a: flash_attention(*a, implementation="mosaic"), q, k, v)
      return out, vjp(ct)

    out, (dq, dk, dv) = grads(q, k, v)
    ref_out, _, ref_grads = reference_with_grads(q, k, v, ct)
    assert rel_err(out, ref_out) < 2e-2
    for got, want in zip((dq, dk, dv), ref_grads, strict=True):
      assert rel_err(got, want) < 2e-2
    entries = json.loads(autotune.cache_path().read_text())["entries"].values()
    kinds = sorted(entry["kind"] for entry in entries)
    assert kinds == ["mosaic_bwd", "mosaic_fwd"]
    interpreter = jax.default_backend() == "cpu"
    for entry in entries:
      candidates = tuning.mosaic_candidates(64, entry["kind"][len("mosaic_") :], interpreter)
      assert len(entry["candidates"]) == len(candidates)
      assert tuning.MosaicBlocks(**entry["config"]) in candidates
    # A new process (fresh memo) reads the cache instead of timing again.
    autotune._clear_memo()
    before = autotune.cache_path().stat().st_mtime_ns
    grads(q * 0.5, k, v)  # new values, same shapes: a new trace only if uncached
    assert autotune.cache_path().stat().st_mtime_ns == before
  finally:
    autotune.enable(False)
    autotune._clear_memo()


@pytest.mark.parametrize("pipelined", [False, True], ids=["serial", "pipelined"])
@pytest.mark.parametrize("p_in_registers", P_PATHS)
@pytest.mark.parametrize(
  "heads,kv_heads,spec,q_len,kv_len",
  [
    (4, 2, masks.MaskSpec(True), 256, 256),
    (4, 1, masks.MaskSpec(False, 30, 5), 200, 250),
  ],
)
def test_forward_head_pairs(heads, kv_heads, spec, q_len, kv_len, p_in_registers, pipelined, rng):
  """Two query heads of one GQA group per CTA: the same answer as the reference."""
  t = s = 256
  q = normal(rng, (2, t, heads, 64), jnp.bfloat16)
  k, v = (normal(rng, (2, s, kv_heads, 64), jnp.bfloat16) for _ in range(2))
  options = dict(p_in_registers=p_in_registers, pipelined=pipelined)
  _check_forward(q, k, v, spec, q_len, kv_len, head_pairs=True, **options)


@pytest.mark.skipif(ON_GPU, reason="on the GPU the tests above run this path")
@pytest.mark.parametrize("pipelined", [False, True], ids=["serial", "pipelined"])
@pytest.mark.parametrize("head_dim,head_pairs", [(64, False), (128, True), (256, False)])
def test_forward_register_path_lowers_for_cuda(head_dim, head_pairs, pipelined):
  """The GPU-only forward (P in registers, register reallocation) lowers for CUDA."""
  q = jax.ShapeDtypeStruct((1, 256, 4, head_dim), jnp.bfloat16)
  k = jax.ShapeDtypeStruct((1, 256, 2, head_dim), jnp.bfloat16)
  run = lambda q, k, v: mosaic_forward.forward(  # noqa: E731
    q,
    k,
    v,
    scale=0.1,
    spec=masks.MaskSpec(True),
    q_len=200,
    kv_len=256,
    block_kv=64 if head_dim == 256 else 128,
    head_pairs=head_pairs,
    pipelined=pipelined,
    p_in_registers=True,
    interpret=False,
  )
  lowered = jax.jit(run).trace(q, k, k).lower(lowering_platforms=("cuda",))
  assert "mosaic_gpu" in lowered.as_text()


@pytest.mark.skipif(not ON_GPU, reason="ptxas runs only when compiling for a GPU")
@pytest.mark.parametrize("head_dim,block_kv", [(128, 128), (256, 64)])
@pytest.mark.parametrize("causal", [False, True])
def test_gpu_pipelined_forward_wgmma_not_serialized(head_dim, block_kv, causal, monkeypatch, capfd):
  """ptxas keeps the pipelined forward's wgmma asynchronous.

  Defining a wgmma register operand while one is in flight (info C7513), or too few
  registers (C7512), makes ptxas serialize every wgmma of the kernel, silently (a third
  slower on an H200, benchmarks/RESULTS.md).
  """
  monkeypatch.setenv("MOSAIC_GPU_DUMP_PTXAS", "1")
  # A shape no other test compiles, so that this call compiles (and ptxas reports) here.
  q = jnp.ones((1, 384, 2, head_dim), jnp.bfloat16)
  run = jax.jit(
    lambda q: mosaic_forward.forward(
      q,
      q,
      q,
      scale=0.1,
      spec=masks.MaskSpec(causal),
      q_len=379,
      kv_len=384,
      block_kv=block_kv,
      pipelined=True,
    )
  )
  jax.block_until_ready(run(q))
  report = "".join(capfd.readouterr())
  assert "registers" in report  # ptxas did report on this compile
  assert "instructions are serialized" not in report, report

"""masks.py against an independent NumPy definition of jax.nn's mask semantics."""

from __future__ import annotations

import itertools

import jax.numpy as jnp
import numpy as np
import pytest

from pallas_attention import masks


def numpy_mask(t, s, spec: masks.MaskSpec, q_len, kv_len):
  """jax.nn.dot_product_attention's masks, written out directly."""
  i = np.arange(t)[:, None]
  j = np.arange(s)[None, :]
  keep = (i < q_len) & (j < kv_len)
  if spec.causal:
    keep &= j <= i
  if spec.window_left is not None:
    keep &= i <= j + spec.window_left
  if spec.window_right is not None:
    keep &= i >= j - spec.window_right
  return keep


SPECS = [
  masks.MaskSpec(),
  masks.MaskSpec(causal=True),
  masks.MaskSpec(window_left=5, window_right=0),
  masks.MaskSpec(window_left=0, window_right=0),
  masks.MaskSpec(window_left=17, window_right=3),
  masks.MaskSpec(window_left=None, window_right=9),
  masks.MaskSpec(causal=True, window_left=20),
  masks.MaskSpec(causal=True, window_left=4, window_right=30),
  # Bands off the diagonal (negative sides), as ring.py builds for shifted blocks.
  masks.MaskSpec(window_left=-20, window_right=45),
  masks.MaskSpec(window_left=40, window_right=-12),
]
SHAPES = [(37, 37), (64, 100), (100, 41), (1, 70)]


def _lengths(t, s):
  return [(t, s), (t // 2, s), (t, max(1, s // 3)), (0, s), (t, 0), (3, 5)]


@pytest.mark.parametrize("spec", SPECS, ids=repr)
@pytest.mark.parametrize("t,s", SHAPES)
def test_element_mask(spec, t, s):
  for q_len, kv_len in _lengths(t, s):
    got = masks.element_mask(jnp.arange(t), jnp.arange(s), spec, q_len, kv_len)
    np.testing.assert_array_equal(np.asarray(got), numpy_mask(t, s, spec, q_len, kv_len))


def _check_ranges(keep, own_len, block_own, block_other, ranges_fn):
  """keep: [own, other] element mask. Check each own-block's (lo, full_lo, full_hi, hi)."""
  own, other = keep.shape
  n_other = -(-other // block_other)
  padded = np.zeros((-(-own // block_own) * block_own, n_other * block_other), bool)
  padded[:own, :other] = keep
  for start in range(0, own, block_own):
    lo, full_lo, full_hi, hi = (int(x) for x in ranges_fn(start))
    assert 0 <= lo <= full_lo <= full_hi <= hi <= n_other
    tiles = padded[start : start + block_own].reshape(block_own, n_other, block_other)
    visible = tiles.any(axis=(0, 2))
    full = tiles.all(axis=(0, 2))
    # Skipped tiles hold nothing visible; tiles claimed full are full.
    assert not visible[:lo].any() and not visible[hi:].any()
    assert full[full_lo:full_hi].all()
    # The structural masks are intervals per line, so the bounds are tight.
    if visible.any():
      assert visible[lo] and visible[hi - 1]
    else:
      assert lo == hi


@pytest.mark.parametrize("spec", SPECS, ids=repr)
@pytest.mark.parametrize("t,s", SHAPES)
@pytest.mark.parametrize("block_q,block_k", [(16, 16), (32, 16), (16, 64)])
def test_block_ranges(spec, t, s, block_q, block_k):
  for q_len, kv_len in _lengths(t, s):
    keep = numpy_mask(t, s, spec, q_len, kv_len)
    _check_ranges(
      keep,
      q_len,
      block_q,
      block_k,
      lambda start, q_len=q_len, kv_len=kv_len: masks.kv_block_range(
        start, block_q, block_k, spec, q_len, kv_len
      ),
    )
    _check_ranges(
      keep.T,
      kv_len,
      block_k,
      block_q,
      lambda start, q_len=q_len, kv_len=kv_len: masks.q_block_range(
        start, block_k, block_q, spec, q_len, kv_len
      ),
    )


def test_full_tiles_found():
  """Causal, no padding: every tile strictly below the diagonal needs no mask."""
  spec = masks.MaskSpec(causal=True)
  for q_block in range(8):
    lo, full_lo, full_hi, hi = masks.kv_block_range(q_block * 32, 32, 32, spec, 256, 256)
    assert (int(lo), int(full_lo), int(full_hi), int(hi)) == (0, 0, q_block, q_block + 1)


def test_window_skips_far_tiles():
  spec = masks.MaskSpec(window_left=32, window_right=0)
  counts = [
    int(hi - lo)
    for lo, _, _, hi in (masks.kv_block_range(i * 64, 64, 64, spec, 4096, 4096) for i in range(64))
  ]
  assert max(counts) <= 2
  assert list(itertools.islice(counts, 1)) == [1]


@pytest.mark.parametrize("over_queries", [True, False], ids=["over_queries", "over_keys"])
@pytest.mark.parametrize(
  "spec,q_len,kv_len",
  [
    (masks.MaskSpec(), 256, 256),
    (masks.MaskSpec(), 200, 256),
    (masks.MaskSpec(), 256, 130),
    (masks.MaskSpec(True), 256, 256),
    (masks.MaskSpec(True), 256, 200),
    (masks.MaskSpec(False, 40, None), 256, 256),
    (masks.MaskSpec(False, None, 17), 256, 256),
    (masks.MaskSpec(True, 40, None), 256, 256),
    (masks.MaskSpec(False, 150, -100), 256, 256),  # a band off the diagonal (ring.py)
    (masks.MaskSpec(False, -70, 200), 256, 256),
  ],
)
def test_edge_runs_cover_every_partly_visible_tile(spec, q_len, kv_len, over_queries):
  """Where edge_runs says a run of partly visible tiles cannot occur, the block ranges
  have none there, for every block and every tile size the kernels use."""
  t = s = 256
  lead, trail = masks.edge_runs(spec, q_len, kv_len, t, s, over_queries)
  for own, other in itertools.product((64, 128, 256), (64, 128)):
    starts = jnp.arange(0, s if over_queries else t, own)
    if over_queries:
      lo, full_lo, full_hi, hi = masks.q_block_range(starts, own, other, spec, q_len, kv_len)
    else:
      lo, full_lo, full_hi, hi = masks.kv_block_range(starts, own, other, spec, q_len, kv_len)
    if not lead:
      np.testing.assert_array_equal(full_lo, lo)
    if not trail:
      np.testing.assert_array_equal(full_hi, hi)

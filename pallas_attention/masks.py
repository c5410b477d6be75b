"""The one definition of which (query row, key column) pairs may attend.

Every implementation (the Triton kernels, the blockwise XLA path) and the test
reference build their masks from these functions, so they cannot drift apart.

The structural masks (causal, local window, sequence lengths) share a shape: for
each query row ``i`` the visible key columns form one interval
``[col_lo(i), col_hi(i))`` whose ends never decrease as ``i`` grows, and for each
key column ``j`` the rows that see it form an interval ``[row_lo(j), row_hi(j))``.
That is what lets a kernel skip whole tiles and mask element-wise only on the
tiles that straddle an edge.

All functions take jnp scalars or arrays and work inside Pallas kernels, under
XLA and in the float64 reference alike.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
from jax import lax


@dataclasses.dataclass(frozen=True)
class MaskSpec:
  """The static part of the structural mask.

  Attributes:
    causal: row ``i`` sees columns ``j <= i`` (top-left aligned, as
      ``jax.nn.dot_product_attention``).
    window_left: row ``i`` sees columns ``j >= i - window_left``; None: no bound.
    window_right: row ``i`` sees columns ``j <= i + window_right``; None: no bound.

  The public API takes non-negative window sides. Internally a side may be
  negative: the band then lies off the diagonal, which is how ring.py masks a
  block whose keys start at a different global position than its queries.
  Every function below holds for such bands too.
  """

  causal: bool = False
  window_left: int | None = None
  window_right: int | None = None


def col_bounds(rows, spec: MaskSpec, kv_len):
  """Visible key columns of each query row: ``[lo, hi)``, same shape as ``rows``."""
  lo = jnp.zeros_like(rows)
  if spec.window_left is not None:
    lo = jnp.maximum(lo, rows - spec.window_left)
  hi = jnp.full_like(rows, kv_len)
  if spec.causal:
    hi = jnp.minimum(hi, rows + 1)
  if spec.window_right is not None:
    hi = jnp.minimum(hi, rows + spec.window_right + 1)
  return lo, hi


def row_bounds(cols, spec: MaskSpec, q_len):
  """Query rows that see each key column: ``[lo, hi)``; the inverse of col_bounds.

  Columns at or past the key length are seen by no row; callers clip columns to
  the key length before asking.
  """
  lo = jnp.zeros_like(cols)
  if spec.causal:
    lo = jnp.maximum(lo, cols)
  if spec.window_right is not None:
    lo = jnp.maximum(lo, cols - spec.window_right)
  hi = jnp.full_like(cols, q_len)
  if spec.window_left is not None:
    hi = jnp.minimum(hi, cols + spec.window_left + 1)
  return lo, hi


def visible(rows, cols, spec: MaskSpec, q_len, kv_len):
  """True where query row ``rows`` may attend to key column ``cols``.

  ``rows`` and ``cols`` are integer arrays of one shape (or broadcastable), and
  only elementwise comparisons with scalars are used, so the function also runs
  on register tiles with a fixed layout (Mosaic GPU's WGMMA layout), where
  reshapes and ``full_like`` are not available. This is col_bounds written
  elementwise: ``lo <= col < hi`` and ``row < q_len``.
  """
  keep = (cols < kv_len) & (rows < q_len)
  if spec.causal:
    keep = keep & (cols <= rows)
  if spec.window_left is not None:
    keep = keep & (cols >= rows - spec.window_left)
  if spec.window_right is not None:
    keep = keep & (cols <= rows + spec.window_right)
  return keep


def edge_runs(spec: MaskSpec, q_len: int, kv_len: int, t: int, s: int, over_queries: bool):
  """Which runs of partly visible tiles a sweep along one axis can meet: ``(lead, trail)``.

  A kernel that visits the tiles of one axis in increasing order (``over_queries``:
  the query tiles of a key block, as q_block_range gives them; else the key tiles of
  a query block, kv_block_range) meets tiles that need the element-wise mask before
  the fully visible ones (``lead``) only where the lower end of the visible interval
  moves with the block's lines, and after them (``trail``) only where the upper end
  does or lines past ``q_len`` / ``kv_len`` (of ``t`` / ``s``) exist. The Mosaic GPU
  kernels leave out what a run that cannot occur would need (the forward's masked loop
  for it; the backward's test for it, and its mask code when neither can). Static.
  """
  padded = q_len < t or kv_len < s
  if over_queries:  # a key column's rows: [row_lo, row_hi) of row_bounds
    lead = spec.causal or spec.window_right is not None
    trail = spec.window_left is not None or padded
  else:  # a query row's columns: [col_lo, col_hi) of col_bounds
    lead = spec.window_left is not None
    trail = spec.causal or spec.window_right is not None or padded
  return lead, trail


def element_mask(rows, cols, spec: MaskSpec, q_len, kv_len):
  """Boolean ``[len(rows), len(cols)]``: True where row ``i`` may attend to column ``j``."""
  return visible(rows[:, None], cols[None, :], spec, q_len, kv_len)


def _block_ranges(start, size, other_block, bounds, own_len, other_len):
  """Shared arithmetic of kv_block_range and q_block_range (see their docs)."""
  end = jnp.minimum(start + size, own_len)
  nonempty = end > start
  last = jnp.maximum(end - 1, start)
  first_lo, first_hi = bounds(start)
  last_lo, last_hi = bounds(last)
  # Every quantity divided below is non-negative, so lax.div is floor division.
  # Union of the intervals of this block's lines: [first_lo, last_hi);
  # intersection: [last_lo, first_hi), since both ends grow with the line.
  union_lo = jnp.clip(first_lo, 0, other_len)
  union_hi = jnp.clip(last_hi, union_lo, other_len)
  lo = lax.div(union_lo, other_block)
  nonempty = nonempty & (union_hi > union_lo)
  hi = jnp.where(nonempty, lax.div(union_hi + other_block - 1, other_block), lo)
  inter_lo = jnp.clip(last_lo, 0, other_len)
  inter_hi = jnp.clip(first_hi, 0, other_len)
  full_lo = jnp.clip(lax.div(inter_lo + other_block - 1, other_block), lo, hi)
  full_hi = jnp.clip(lax.div(inter_hi, other_block), full_lo, hi)
  # A block with lines past the valid length needs element-wise masking.
  full_hi = jnp.where(start + size <= own_len, full_hi, full_lo)
  return lo, full_lo, full_hi, hi


def kv_block_range(q_start, block_q: int, block_k: int, spec: MaskSpec, q_len, kv_len):
  """Key blocks a query block ``[q_start, q_start + block_q)`` must visit.

  Returns block indices ``(lo, full_lo, full_hi, hi)`` with
  ``lo <= full_lo <= full_hi <= hi``: blocks in ``[lo, hi)`` may hold visible
  pairs (all others are fully masked and can be skipped), and blocks in
  ``[full_lo, full_hi)`` are visible in every element (no element-wise mask
  needed there).
  """
  return _block_ranges(
    q_start,
    block_q,
    block_k,
    lambda row: col_bounds(row, spec, kv_len),
    q_len,
    kv_len,
  )


def q_block_range(k_start, block_k: int, block_q: int, spec: MaskSpec, q_len, kv_len):
  """Query blocks a key block ``[k_start, k_start + block_k)`` must visit.

  The transpose of kv_block_range, with the same ``(lo, full_lo, full_hi, hi)``
  meaning, in units of ``block_q``.
  """
  return _block_ranges(
    k_start,
    block_k,
    block_q,
    lambda col: row_bounds(col, spec, q_len),
    kv_len,
    q_len,
  )

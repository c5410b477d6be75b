"""The normalised form of one attention call, as every implementation receives it.

api.flash_attention checks the user's arguments and hands each implementation:

- ``q [B, T, N, H]``, ``k, v [B, S, K, H]`` with ``N % K == 0``;
- ``bias`` None or ``[Bb, Nb, Tb, Sb]``, ``mask`` None or bool of the same
  form, where each of ``Bb, Nb, Tb, Sb`` is 1 (broadcast) or the full size;
- ``q_len, kv_len [B]`` int32 (the full lengths when the user gave none);
- a Problem: the static part.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp

from pallas_attention import masks


@dataclasses.dataclass(frozen=True)
class Problem:
  """Static description of an attention call; hashable, so jit caches on it."""

  scale: float
  spec: masks.MaskSpec
  implementation: str
  # Implementation-specific tuning (e.g. tuning.TritonBlocks); None: its default.
  config: Any = None
  # Whether the caller gave per-batch sequence lengths (q_len, kv_len are then
  # data; otherwise they are the full T and S).
  has_lengths: bool = False
  # False: the backward may sum partial gradients with float atomics in an order
  # that varies between runs (mosaic: the fused backward, unordered). True: mosaic's
  # fused backward, where taken, orders its adds. Other implementations are
  # deterministic either way.
  deterministic_backward: bool = True


def round_up(x: int, multiple: int) -> int:
  return -(-x // multiple) * multiple


def pad_axis(x, axis: int, size: int):
  """Zero-pad ``x`` along ``axis`` up to ``size`` (a no-op when already that long)."""
  if x is None or x.shape[axis] == size:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, size - x.shape[axis])
  return jnp.pad(x, widths)


def pad_extra(x, t_pad: int, s_pad: int):
  """Pad a bias or mask ``[Bb, Nb, Tb, Sb]`` along its non-broadcast T and S axes."""
  if x is None:
    return None
  if x.shape[2] > 1:
    x = pad_axis(x, 2, t_pad)
  if x.shape[3] > 1:
    x = pad_axis(x, 3, s_pad)
  return x

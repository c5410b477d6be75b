"""flash_attention: check the arguments, normalise their shapes, pick an implementation."""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from pallas_attention import core, masks
from pallas_attention.problem import Problem

# The order in which implementation=None tries them on a GPU.
IMPLEMENTATIONS = ("mosaic", "triton", "xla")
_DTYPES = (jnp.float16, jnp.bfloat16, jnp.float32)


def flash_attention(
  query,
  key,
  value,
  bias=None,
  mask=None,
  *,
  scale: float | None = None,
  is_causal: bool = False,
  query_seq_lengths=None,
  key_value_seq_lengths=None,
  local_window_size: int | tuple[int | None, int | None] | None = None,
  q_segment_ids=None,
  kv_segment_ids=None,
  logits_soft_cap: float | None = None,
  alibi_slopes=None,
  sink_logits=None,
  block_mask=None,
  block_mask_size: tuple[int, int] = (128, 128),
  dropout_rate: float = 0.0,
  dropout_rng=None,
  return_residual: bool = False,
  implementation: str | Sequence[str] | None = None,
  deterministic_backward: bool = True,
):
  r"""Exact softmax attention that never materialises the ``T × S`` score matrix.

  For each batch ``b`` and query head ``n`` (reading key/value head
  ``n // (N / K)``)::

      logits = scale · q kᵀ + bias,   masked to −∞ where not allowed
      out    = softmax(logits) v,     lse = log Σ_j exp(logits)

  Arguments shared with ``jax.nn.dot_product_attention`` keep its names, shapes
  and meaning, so a call of it switches over by name alone.

  Args:
    query: ``[B, T, N, H]`` or unbatched ``[T, N, H]``; float16, bfloat16 or float32.
    key: ``[B, S, K, H]`` (or ``[S, K, H]``), same dtype as query, ``N % K == 0``.
    value: same shape and dtype as key.
    bias: additive, broadcastable to ``[B, N, T, S]`` (``[N, T, S]`` unbatched).
      Differentiable.
    mask: bool, broadcastable like bias; True means attend.
    scale: logit scale; default ``1 / sqrt(H)``. A Python number.
    is_causal: row ``i`` attends to columns ``j <= i`` (top-left aligned).
    query_seq_lengths: ``[B]`` ints; rows at or past the length attend to nothing.
    key_value_seq_lengths: ``[B]`` ints; columns at or past the length are masked.
    local_window_size: ``w`` or ``(left, right)``: row ``i`` sees
      ``i - left <= j <= i + right``; a side may be None (unbounded).
    q_segment_ids, kv_segment_ids, logits_soft_cap, alibi_slopes, sink_logits,
      block_mask, block_mask_size, dropout_rate, dropout_rng: not implemented
      yet; anything but their defaults raises NotImplementedError.
    return_residual: also return the natural-log log-sum-exp ``[B, N, T]``
      (``[N, T]`` unbatched), float32, ``-inf`` for rows that attend to nothing.
    implementation: ``"triton"``, ``"xla"``, ``"mosaic"``, a sequence of them
      (the first that supports the call runs) or None (the fastest available).
    deterministic_backward: True (default): gradients are bitwise the same from run
      to run (``mosaic`` then uses its fused backward with the ``dq`` additions in a
      fixed order where that measured faster: non-causal, long keys; see tuning.py).
      False lets ``mosaic`` use its fused backward where the block table measured it
      faster: head dims up to 128, except causal head dim 128 with fewer than 4096
      keys. One kernel instead of two (benchmarks/RESULTS.md), with ``dq`` summed by
      float atomics whose order varies, so its last bits may differ between runs.
      ``triton`` and ``xla`` are deterministic either way.

  Returns:
    ``out`` with the shape and dtype of ``query`` (rows that attend to nothing
    are zero), or ``(out, lse)`` with ``return_residual=True``.

  Raises:
    ValueError, TypeError: bad arguments, naming the argument.
    NotImplementedError: a valid call that no requested implementation serves.
  """
  names = _implementation_names(implementation)
  if not isinstance(deterministic_backward, bool):
    raise TypeError(
      f"deterministic_backward: expected a bool, got {type(deterministic_backward).__name__}"
    )
  query, key, value = (
    _as_float_array(x, name) for x, name in ((query, "query"), (key, "key"), (value, "value"))
  )
  unbatched = _check_qkv(query, key, value)
  if unbatched:
    query, key, value = query[None], key[None], value[None]
  b, t, n, h = query.shape
  s = key.shape[1]
  _not_implemented(
    q_segment_ids=q_segment_ids is not None,
    kv_segment_ids=kv_segment_ids is not None,
    logits_soft_cap=logits_soft_cap is not None,
    alibi_slopes=alibi_slopes is not None,
    sink_logits=sink_logits is not None,
    block_mask=block_mask is not None,
    dropout_rate=dropout_rate != 0.0,
    dropout_rng=dropout_rng is not None,
  )
  del block_mask_size
  target = (b, n, t, s)
  bias = _broadcastable(bias, "bias", target, unbatched)
  if bias is not None and not jnp.issubdtype(bias.dtype, jnp.floating):
    raise TypeError(f"bias: expected a floating dtype, got {bias.dtype}")
  mask = _broadcastable(mask, "mask", target, unbatched)
  if mask is not None and mask.dtype != jnp.bool_:
    raise TypeError(
      f"mask: expected bool (True = attend), got {mask.dtype}; pass an additive mask as bias"
    )
  q_len = _lengths(query_seq_lengths, "query_seq_lengths", b, t, unbatched)
  kv_len = _lengths(key_value_seq_lengths, "key_value_seq_lengths", b, s, unbatched)
  spec = masks.MaskSpec(bool(is_causal), *_window(local_window_size))
  scale = _scale(scale, h)

  has_lengths = query_seq_lengths is not None or key_value_seq_lengths is not None
  problem = _select(names, scale, spec, query, key, bias, mask, has_lengths, deterministic_backward)
  out, lse = core.attention_jit(problem, query, key, value, bias, mask, q_len, kv_len)
  if unbatched:
    out, lse = out[0], lse[0]
  return (out, lse) if return_residual else out


def available_implementations() -> list[str]:
  """Implementations that can run on the default device, fastest first.

  ``implementation=None`` tries them in this order; the first that supports the
  call's shapes and options runs it.
  """
  return [name for name in _default_order() if _unavailable(name) is None]


def select_problem(
  query, key, spec: masks.MaskSpec, *, scale: float, mask=None, implementation=None
) -> Problem:
  """The Problem flash_attention would run for checked ``[B, T, N, H]`` arrays.

  For callers in this package that build the MaskSpec themselves: ring.py runs
  blocks at a global offset, whose windows are shifted bands (sides may be negative,
  which flash_attention's argument check rejects).
  """
  names = _implementation_names(implementation)
  return _select(names, scale, spec, query, key, None, mask, False)


def _select(
  names, scale, spec, query, key, bias, mask, has_lengths, deterministic_backward=True
) -> Problem:
  reasons = []
  for name in names:
    reason = _unavailable(name)
    problem = Problem(
      scale,
      spec,
      name,
      has_lengths=has_lengths,
      deterministic_backward=deterministic_backward,
    )
    if reason is None:
      reason = core.implementation_module(name).supports(problem, query, key, bias, mask)
    if reason is None:
      return problem
    reasons.append(f"{name}: {reason}")
  raise NotImplementedError("no implementation supports this call: " + "; ".join(reasons))


def _unavailable(name: str) -> str | None:
  """Why implementation ``name`` cannot run on the default device, or None."""
  try:
    module = core.implementation_module(name)
  except ImportError as err:  # e.g. a JAX release without the Pallas Triton lowering
    return f"cannot be imported ({err})"
  return module.unavailable()


def _implementation_names(implementation) -> tuple[str, ...]:
  if implementation is None:
    return _default_order()
  names = (implementation,) if isinstance(implementation, str) else tuple(implementation)
  if not names:
    raise ValueError("implementation: an empty sequence names no implementation")
  for name in names:
    if name not in IMPLEMENTATIONS:
      raise ValueError(
        f"implementation: unknown name {name!r}; choose from {IMPLEMENTATIONS} or None"
      )
  return names


def _default_order() -> tuple[str, ...]:
  """Fastest first for the default device; interpret-mode Pallas is never the default."""
  if jax.default_backend() == "gpu":
    return IMPLEMENTATIONS
  return ("xla",)


def _as_float_array(x, name: str):
  arr = jnp.asarray(x)
  if arr.dtype not in _DTYPES:
    raise TypeError(f"{name}: expected float16, bfloat16 or float32, got {arr.dtype}")
  return arr


def _check_qkv(query, key, value) -> bool:
  """Checks ranks, shapes and dtypes; returns True for unbatched ``[T, N, H]`` inputs."""
  if query.ndim not in (3, 4):
    raise ValueError(f"query: expected [B, T, N, H] or [T, N, H], got shape {query.shape}")
  for name, x in (("key", key), ("value", value)):
    if x.ndim != query.ndim:
      raise ValueError(
        f"{name}: expected rank {query.ndim} like query {query.shape}, got shape {x.shape}"
      )
    if x.dtype != query.dtype:
      raise TypeError(f"{name}: dtype {x.dtype} differs from query's {query.dtype}")
  if value.shape != key.shape:
    raise ValueError(f"value: shape {value.shape} differs from key's {key.shape}")
  if key.shape[-1] != query.shape[-1]:
    raise ValueError(f"key: head dim {key.shape[-1]} differs from query's {query.shape[-1]}")
  if query.ndim == 4 and key.shape[0] != query.shape[0]:
    raise ValueError(f"key: batch {key.shape[0]} differs from query's {query.shape[0]}")
  n, num_kv_heads = query.shape[-2], key.shape[-2]
  if num_kv_heads == 0 or n % num_kv_heads:
    raise ValueError(
      f"key: query heads ({n}) must be a multiple of key/value heads ({num_kv_heads})"
    )
  if query.shape[-1] == 0 or query.shape[-3] == 0 or key.shape[-3] == 0:
    raise ValueError(f"query/key: empty sequence or head dim: {query.shape}, {key.shape}")
  return query.ndim == 3


def _broadcastable(x, name: str, target: tuple[int, int, int, int], unbatched: bool):
  """``x`` as ``[Bb, Nb, Tb, Sb]``, each axis 1 or the full size of ``target``."""
  if x is None:
    return None
  x = jnp.asarray(x)
  shown = "[N, T, S]" if unbatched else "[B, N, T, S]"
  if x.ndim > 4 or (unbatched and x.ndim == 4 and x.shape[0] != 1):
    raise ValueError(f"{name}: shape {x.shape} is not broadcastable to {shown}")
  x = x.reshape((1,) * (4 - x.ndim) + x.shape)
  for size, full in zip(x.shape, target, strict=True):
    if size not in (1, full):
      shape = target[1:] if unbatched else target
      raise ValueError(f"{name}: shape {x.shape} is not broadcastable to {shown} = {shape}")
  return x


def _lengths(x, name: str, batch: int, full: int, unbatched: bool):
  if x is None:
    return jnp.full((batch,), full, jnp.int32)
  x = jnp.asarray(x)
  if not jnp.issubdtype(x.dtype, jnp.integer):
    raise TypeError(f"{name}: expected an integer dtype, got {x.dtype}")
  if unbatched and x.ndim == 0:
    x = x[None]
  if x.shape != (batch,):
    raise ValueError(f"{name}: expected shape ({batch},), got {x.shape}")
  return jnp.clip(x.astype(jnp.int32), 0, full)


def _window(window) -> tuple[int | None, int | None]:
  if window is None:
    return None, None
  sides = (window, window) if isinstance(window, (int, np.integer)) else window
  try:
    left, right = sides
  except (TypeError, ValueError):
    raise TypeError(
      f"local_window_size: expected an int or (left, right), got {window!r}"
    ) from None
  for side in (left, right):
    if side is not None and (not isinstance(side, (int, np.integer)) or isinstance(side, bool)):
      raise TypeError(f"local_window_size: sides must be ints or None, got {window!r}")
    if side is not None and side < 0:
      raise ValueError(f"local_window_size: sides must be >= 0, got {window!r}")
  return (None if left is None else int(left)), (None if right is None else int(right))


def _scale(scale, head_dim: int) -> float:
  if scale is None:
    return 1.0 / math.sqrt(head_dim)
  if isinstance(scale, jax.core.Tracer):
    raise TypeError("scale: must be a static Python number, not a traced value")
  try:
    return float(scale)
  except (TypeError, ValueError):
    raise TypeError(f"scale: expected a number, got {scale!r}") from None


def _not_implemented(**given: bool) -> None:
  used = [name for name, is_set in given.items() if is_set]
  if used:
    raise NotImplementedError(
      f"{', '.join(used)}: not implemented yet in pallas_attention; leave at the default"
    )

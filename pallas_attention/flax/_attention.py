"""attention_fn: flash attention with the signature of Flax's dot_product_attention."""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import math
import warnings
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from pallas_attention import masks
from pallas_attention.api import flash_attention


@dataclasses.dataclass(frozen=True)
class ModuleOptions:
  """What a pallas_attention.flax module adds to the arguments Flax passes its attention_fn.

  Flax's modules call ``self.attention_fn`` with a fixed set of arguments; these
  reach ``attention_fn`` through ``module_options`` instead.
  """

  is_causal: bool = False
  local_window_size: int | tuple[int | None, int | None] | None = None
  logits_soft_cap: float | None = None
  implementation: str | Sequence[str] | None = None
  q_segment_ids: Any = None
  kv_segment_ids: Any = None

  def given(self) -> list[str]:
    """Names of the options not at their defaults."""
    values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
    return [name for name, value in values.items() if value is not None and value is not False]


@dataclasses.dataclass
class _Handoff:
  options: ModuleOptions
  read: bool = False


_MODULE_OPTIONS: contextvars.ContextVar[_Handoff | None] = contextvars.ContextVar(
  "pallas_attention_flax_module_options", default=None
)


@contextlib.contextmanager
def module_options(options: ModuleOptions):
  """Makes ``options`` the defaults of ``attention_fn`` calls inside the block.

  A module wraps its Flax ``__call__`` in this. If the block ends without an
  ``attention_fn`` call having read non-default options (the module was given
  some other attention function), they would be lost: that raises ValueError.
  """
  handoff = _Handoff(options)
  token = _MODULE_OPTIONS.set(handoff)
  try:
    yield
  finally:
    _MODULE_OPTIONS.reset(token)
  if not handoff.read and options.given():
    raise ValueError(
      f"{', '.join(options.given())}: only pallas_attention.flax.attention_fn reads these "
      "options, and this module's attention_fn is another function"
    )


def options_for_call(
  module, mask, q_segment_ids, kv_segment_ids, decoding: bool, cache_index=None, cache_shape=None
):
  """``(mask, ModuleOptions)`` for one call of a module with pallas_attention's options.

  ``module`` has the attributes ``is_causal``, ``local_window_size``,
  ``logits_soft_cap`` and ``implementation``. While decoding (one query at
  position ``cache_index`` against a cache ``[*batch, S, K, H]``) Flax's cache mask
  already makes the step causal, and a window must be placed at the query's
  position rather than at row 0, so it becomes part of the mask.
  """
  window = module.local_window_size
  if decoding and window is not None and cache_shape is not None:
    *batch_dims, max_length, _, _ = cache_shape
    cols = jnp.arange(max_length)
    near = masks.visible(cache_index, cols, _spec(False, window), max_length, max_length)
    near = near.reshape((1,) * len(batch_dims) + (1, 1, max_length))
    mask = near if mask is None else jnp.logical_and(mask, near)
    window = None
  options = ModuleOptions(
    is_causal=bool(module.is_causal) and not decoding,
    local_window_size=window,
    logits_soft_cap=module.logits_soft_cap,
    implementation=module.implementation,
    q_segment_ids=q_segment_ids,
    kv_segment_ids=kv_segment_ids,
  )
  return mask, options


def _merge(name: str, explicit, from_module):
  if explicit is not None and from_module is not None:
    raise ValueError(f"{name}: given both to the module and to attention_fn")
  return from_module if explicit is None else explicit


def attention_fn(
  query,
  key,
  value,
  bias=None,
  mask=None,
  broadcast_dropout: bool = True,
  dropout_rng=None,
  dropout_rate: float = 0.0,
  deterministic: bool = False,
  dtype=None,
  precision=None,
  module=None,
  force_fp32_for_softmax: bool = False,
  einsum_dot_general=None,
  qk_attn_weights_einsum=None,
  attn_weights_value_einsum=None,
  promote_dtype=None,
  is_causal: bool = False,
  *,
  local_window_size: int | tuple[int | None, int | None] | None = None,
  logits_soft_cap: float | None = None,
  q_segment_ids=None,
  kv_segment_ids=None,
  implementation: str | Sequence[str] | None = None,
  deterministic_backward: bool = True,
):
  """Flash attention with the signature of ``flax.linen.dot_product_attention``.

  Args (as Flax's): ``query [..., T, N, H]``, ``key``/``value [..., S, K, H]``
  (``N % K == 0``); ``bias``/``mask`` broadcastable to ``[..., N, T, S]``, the mask
  bool or float (nonzero = attend, as ``make_attention_mask`` builds it in
  float32); ``dtype`` the computation dtype (inputs are cast to it);
  ``precision`` and ``force_fp32_for_softmax`` are accepted and ignored (products
  accumulate and the softmax runs in float32 always); ``promote_dtype`` (NNX) is
  applied; ``is_causal`` (NNX) uses the causal tile skipping instead of a mask.

  Keyword-only, as ``flash_attention`` (bind them with ``functools.partial``; the
  ``pallas_attention.flax`` modules pass them from their own options):
  ``local_window_size`` (``w`` or ``(left, right)``), ``logits_soft_cap``,
  ``q_segment_ids [..., T]`` / ``kv_segment_ids [..., S]`` (both or neither;
  attend iff equal), ``implementation`` and ``deterministic_backward`` (only here: bind
  it with ``functools.partial`` and pass the result as the modules' ``attention_fn``).

  ``flash_attention`` does not implement segment ids and the soft-cap yet:
  segment ids become a bool mask ``[B, 1, T, S]`` (still flash attention, but the
  mask is read from memory), and a soft-capped call runs a dense attention with a
  warning. Both switch to ``flash_attention`` itself once it accepts them.
  """
  handoff = _MODULE_OPTIONS.get()
  if handoff is not None:
    handoff.read = True
    given = handoff.options
    is_causal = bool(is_causal) or given.is_causal
    local_window_size = _merge("local_window_size", local_window_size, given.local_window_size)
    logits_soft_cap = _merge("logits_soft_cap", logits_soft_cap, given.logits_soft_cap)
    q_segment_ids = _merge("q_segment_ids", q_segment_ids, given.q_segment_ids)
    kv_segment_ids = _merge("kv_segment_ids", kv_segment_ids, given.kv_segment_ids)
    implementation = _merge("implementation", implementation, given.implementation)
  if query.ndim < 3:
    raise ValueError(f"query: expected [..., T, N, H], got shape {query.shape}")
  batch_dims = query.shape[:-3]
  if (q_segment_ids is None) != (kv_segment_ids is None):
    raise ValueError("q_segment_ids, kv_segment_ids: give both or neither")
  if q_segment_ids is not None:
    q_segment_ids = _segment_ids(q_segment_ids, "q_segment_ids", (*batch_dims, query.shape[-3]))
    kv_segment_ids = _segment_ids(kv_segment_ids, "kv_segment_ids", (*batch_dims, key.shape[-3]))
  if logits_soft_cap is not None and not logits_soft_cap > 0:
    raise ValueError(f"logits_soft_cap: expected a positive number, got {logits_soft_cap!r}")

  nnx_caller = promote_dtype is not None
  flax_kwargs = dict(
    query=query,
    key=key,
    value=value,
    bias=bias,
    mask=mask,
    broadcast_dropout=broadcast_dropout,
    dropout_rng=dropout_rng,
    dropout_rate=dropout_rate,
    deterministic=deterministic,
    dtype=dtype,
    precision=precision,
    module=module,
  )
  if nnx_caller:
    flax_kwargs.update(promote_dtype=promote_dtype)
  else:
    flax_kwargs.update(
      force_fp32_for_softmax=force_fp32_for_softmax,
      einsum_dot_general=einsum_dot_general,
      qk_attn_weights_einsum=qk_attn_weights_einsum,
      attn_weights_value_einsum=attn_weights_value_einsum,
    )
  einsums = (einsum_dot_general, qk_attn_weights_einsum, attn_weights_value_einsum)
  why_flax = None
  if module is not None:
    why_flax = "attention weights are sown (module is set)"
  elif dropout_rate > 0.0 and not deterministic:
    why_flax = "dropout is not fused yet"
  elif any(f is not None for f in einsums):
    why_flax = "custom einsum functions"
  if why_flax is not None:
    if logits_soft_cap is not None:
      raise NotImplementedError(
        f"logits_soft_cap: Flax's attention has no soft-cap, and it must run here ({why_flax})"
      )
    # Flax's attention is dense: every structural mask becomes part of its mask.
    mask = _as_bool(mask)
    spec = _spec(is_causal, local_window_size)
    if spec != masks.MaskSpec():
      t, s = query.shape[-3], key.shape[-3]
      structural = masks.element_mask(jnp.arange(t), jnp.arange(s), spec, t, s)
      mask = structural if mask is None else mask & structural
    if q_segment_ids is not None:
      segments = _segment_mask(q_segment_ids, kv_segment_ids)
      mask = segments if mask is None else mask & segments
    flax_kwargs["mask"] = mask
    return _flax_attention(why_flax, nnx_caller, **flax_kwargs)

  if nnx_caller:
    query, key, value = promote_dtype((query, key, value), dtype=dtype)
  elif dtype is not None:
    query, key, value = (x.astype(dtype) for x in (query, key, value))
  batch = math.prod(batch_dims)
  q, k, v = (x.reshape((batch, *x.shape[-3:])) for x in (query, key, value))
  mask = None if mask is None else _flatten_batch(_as_bool(mask), batch_dims, 3)
  bias = None if bias is None else _flatten_batch(bias, batch_dims, 3)
  options = dict(is_causal=is_causal, local_window_size=local_window_size)
  if q_segment_ids is not None:
    q_ids = q_segment_ids.reshape(batch, q.shape[1])
    kv_ids = kv_segment_ids.reshape(batch, k.shape[1])
    if _flash_attention_accepts("segment_ids"):
      options.update(q_segment_ids=q_ids, kv_segment_ids=kv_ids)
    else:
      segments = _segment_mask(q_ids, kv_ids)
      mask = segments if mask is None else mask & segments
  if logits_soft_cap is not None and not _flash_attention_accepts("logits_soft_cap"):
    warnings.warn(
      "pallas_attention.flax: flash_attention has no logits_soft_cap yet; using a dense "
      "attention that stores the [B, N, T, S] logits",
      stacklevel=2,
    )
    out = _dense_attention(
      q, k, v, bias, mask, _spec(is_causal, local_window_size), logits_soft_cap
    )
  else:
    if logits_soft_cap is not None:
      options.update(logits_soft_cap=logits_soft_cap)
    out = flash_attention(
      q,
      k,
      v,
      bias,
      mask,
      implementation=implementation,
      deterministic_backward=deterministic_backward,
      **options,
    )
  return out.reshape(query.shape[:-1] + (value.shape[-1],))


def _flax_attention(why: str, nnx_caller: bool, **kwargs):
  warnings.warn(f"pallas_attention.flax: {why}; using Flax's attention", stacklevel=3)
  if nnx_caller:
    from flax import nnx

    return nnx.dot_product_attention(**kwargs)
  from flax import linen

  return linen.dot_product_attention(**kwargs)


def _as_bool(mask):
  if mask is None or mask.dtype == jnp.bool_:
    return mask
  return mask != 0


def _spec(is_causal: bool, local_window_size) -> masks.MaskSpec:
  if local_window_size is None:
    return masks.MaskSpec(bool(is_causal))
  if isinstance(local_window_size, int):
    return masks.MaskSpec(bool(is_causal), local_window_size, local_window_size)
  left, right = local_window_size
  return masks.MaskSpec(bool(is_causal), left, right)


def _flatten_batch(x, batch_dims: tuple[int, ...], tail: int):
  """``[*batch, ...tail dims]`` as ``[B, ...]``; an all-ones batch stays 1 (broadcast)."""
  x = x.reshape((1,) * (len(batch_dims) + tail - x.ndim) + x.shape)
  lead = x.shape[: x.ndim - tail]
  if all(d == 1 for d in lead):
    return x.reshape((1, *x.shape[x.ndim - tail :]))
  x = jnp.broadcast_to(x, (*batch_dims, *x.shape[x.ndim - tail :]))
  return x.reshape((math.prod(batch_dims), *x.shape[len(batch_dims) :]))


def _segment_ids(ids, name: str, shape: tuple[int, ...]):
  ids = jnp.asarray(ids)
  if not jnp.issubdtype(ids.dtype, jnp.integer):
    raise TypeError(f"{name}: expected an integer dtype, got {ids.dtype}")
  if ids.shape != shape:
    raise ValueError(f"{name}: expected shape {shape} (batch dims and length), got {ids.shape}")
  return ids


def _segment_mask(q_ids, kv_ids):
  """``[..., 1, T, S]`` bool: True where the query's and key's segment ids are equal."""
  return (q_ids[..., :, None] == kv_ids[..., None, :])[..., None, :, :]


@functools.cache
def _flash_attention_accepts(option: str) -> bool:
  """Whether ``flash_attention`` implements ``option`` (it raises NotImplementedError if not)."""
  qkv = jax.ShapeDtypeStruct((1, 16, 1, 16), jnp.float32)
  ids = jax.ShapeDtypeStruct((1, 16), jnp.int32)
  if option == "segment_ids":
    call = lambda q, ids: flash_attention(q, q, q, q_segment_ids=ids, kv_segment_ids=ids)
  elif option == "logits_soft_cap":
    call = lambda q, ids: flash_attention(q, q, q, logits_soft_cap=1.0)
  else:
    raise ValueError(f"unknown option {option!r}")
  try:
    jax.eval_shape(call, qkv, ids)
  except NotImplementedError:
    return False
  return True


def _dense_attention(q, k, v, bias, mask, spec: masks.MaskSpec, soft_cap: float):
  """Soft-capped attention over the dense ``[B, N, T, S]`` logits; ``q [B, T, N, H]``.

  Same semantics as ``flash_attention`` (softmax in float32, GQA by head groups,
  rows that attend to nothing give zeros and zero gradients).
  """
  b, t, n, h = q.shape
  s, kv_heads = k.shape[1], k.shape[2]
  grouped = q.reshape(b, t, kv_heads, n // kv_heads, h)
  logits = jnp.einsum("btkgh,bskh->bkgts", grouped, k, preferred_element_type=jnp.float32)
  logits = logits.reshape(b, n, t, s) / math.sqrt(h)
  if bias is not None:
    logits = logits + bias
  logits = soft_cap * jnp.tanh(logits / soft_cap)
  keep = masks.element_mask(jnp.arange(t), jnp.arange(s), spec, t, s)
  if mask is not None:
    keep = keep & mask
  logits = jnp.where(keep, logits, -jnp.inf)
  row_max = jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True))
  weights = jnp.exp(logits - jnp.where(jnp.isfinite(row_max), row_max, 0.0))
  denom = jnp.sum(weights, axis=-1, keepdims=True)
  probs = weights / jnp.where(denom == 0.0, 1.0, denom)
  probs = probs.reshape(b, kv_heads, n // kv_heads, t, s)
  out = jnp.einsum("bkgts,bskh->btkgh", probs, v.astype(jnp.float32))
  return out.reshape(b, t, n, v.shape[-1]).astype(q.dtype)

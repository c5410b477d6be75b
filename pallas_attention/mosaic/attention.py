"""The ``mosaic`` implementation: Pallas Mosaic GPU kernels for Hopper (sm90).

This module is what core.py and api.py see: availability, which calls it serves,
and the padding around the kernels in forward.py and backward.py.

Served: bfloat16/float16, head dims up to 256 (padded to 64, 128 or 256), any
sequence lengths (padded to whole tiles and masked), causal and local windows,
GQA/MQA. Not served, so that dispatch moves on to ``triton``: float32, bias,
mask, per-batch sequence lengths. On CPU the same kernels run in the Mosaic GPU
interpreter (slow; for tests).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from pallas_attention import autotune, core, tuning
from pallas_attention.kernel_types import vary_like
from pallas_attention.mosaic import forward as fwd
from pallas_attention.problem import Problem, pad_axis, round_up

HEAD_DIMS = (64, 128, 256)


def unavailable() -> str | None:
  """None if the kernels can run on the default device; otherwise why not."""
  backend = jax.default_backend()
  if backend == "cpu":
    return None  # the Mosaic GPU interpreter
  if backend != "gpu":
    return f"needs an NVIDIA Hopper GPU (or the CPU interpreter), not {backend}"
  device = jax.devices()[0]
  capability = getattr(device, "compute_capability", None)
  if capability is None or not str(capability).startswith("9."):
    return f"needs compute capability 9.x (Hopper), not {capability} ({device.device_kind})"
  return None


def supports(problem: Problem, q, k, bias, mask) -> str | None:
  """None: these kernels serve the call; otherwise why not."""
  del k
  if q.dtype not in (jnp.bfloat16, jnp.float16):
    return f"dtype {q.dtype} (needs bfloat16 or float16)"
  if q.shape[-1] > HEAD_DIMS[-1]:
    return f"head dim {q.shape[-1]} > {HEAD_DIMS[-1]}"
  if bias is not None or mask is not None:
    return "bias and mask arrays are not supported"
  if problem.has_lengths:
    return "per-batch sequence lengths are not supported"
  return unavailable()


def head_dim_extent(h: int) -> int:
  return next(d for d in HEAD_DIMS if d >= h)


def default_blocks(
  h_pad: int, causal: bool, kv_len: int, deterministic: bool, interpreter: bool
) -> tuning.MosaicBlocks:
  """The package table's blocks for a call (no config, no autotuner): on a GPU
  ``tuning.mosaic_blocks`` with the fused backward where ``tuning.fused_backward``
  takes it; in the interpreter ``tuning.MOSAIC_INTERPRETER``. Their ``bwd_fused`` says
  which backward the call runs."""
  fused = tuning.fused_backward(h_pad, causal, kv_len, deterministic)
  if interpreter:
    # The interpreter's fused kernel keeps a dQ slice per key block (no TMA adds or
    # semaphores there): only for the opt-in, the deterministic default stays two-kernel.
    return dataclasses.replace(tuning.MOSAIC_INTERPRETER, bwd_fused=fused and not deterministic)
  return tuning.mosaic_blocks(h_pad, causal, kv_len, fused=fused)


def blocks(problem: Problem, q_shape, kv_shape, dtype, part: str) -> tuning.MosaicBlocks:
  """The blocks for one call: the Problem's config, the autotuner's choice (opt-in,
  see autotune.py) or the package table.

  ``part`` ("fwd" or "bwd") says which fields the caller uses; the autotuner
  times forward and backward candidates separately, each on this call's shapes.
  """
  if problem.config is not None:
    return problem.config
  h_pad = head_dim_extent(q_shape[3])
  interpreter = jax.default_backend() == "cpu"
  causal = problem.spec.causal
  deterministic = problem.deterministic_backward
  default = default_blocks(h_pad, causal, kv_shape[1], deterministic, interpreter)
  fused = default.bwd_fused
  if not autotune.enabled():
    return default
  candidates = tuning.mosaic_candidates(h_pad, part, interpreter=interpreter, fused=fused)
  spec = problem.spec
  key = dict(
    q=tuple(q_shape),
    kv=tuple(kv_shape),
    dtype=jnp.dtype(dtype).name,
    spec=(spec.causal, spec.window_left, spec.window_right),
    part=part,
  )
  if fused:  # separate entries: the fused backward, with dQ adds ordered or not
    key.update(fused=True, deterministic=problem.deterministic_backward)

  def make_run(config):
    problem_c = dataclasses.replace(problem, config=config)
    rng = jax.random.split(jax.random.key(0), 4)
    q = jax.random.normal(rng[0], q_shape, dtype)
    k, v = (jax.random.normal(r, kv_shape, dtype) for r in rng[1:3])
    fn = jax.jit(functools.partial(forward, problem_c))
    if part == "fwd":
      return lambda: fn(q, k, v, None, None, None, None)
    out, lse2 = fn(q, k, v, None, None, None, None)
    do = jax.random.normal(rng[3], q_shape, dtype)
    delta = core.row_delta(out, do)
    bwd = jax.jit(functools.partial(backward, problem_c))
    return lambda: bwd(q, k, v, None, None, None, None, do, lse2, delta)

  return autotune.choose(
    "mosaic_" + part,
    key,
    candidates,
    make_run,
    default=default,
    to_json=dataclasses.asdict,
    from_json=lambda entry: tuning.MosaicBlocks(**entry),
    rounds=2 if interpreter else 5,  # the interpreter takes seconds per call
  )


def _extents(t: int, s: int, h: int, config: tuning.MosaicBlocks, part: str):
  h_pad = head_dim_extent(h)
  if part == "fwd":
    return h_pad, round_up(t, fwd.CTA_ROWS), round_up(s, config.fwd_kv)
  t_pad = round_up(t, max(config.dkv_q, config.dq_q))
  return h_pad, t_pad, round_up(s, max(config.dkv_kv, config.dq_kv))


def _pad(x, seq: int, h_pad: int):
  return pad_axis(pad_axis(x, 3, h_pad), 1, seq)


def _fold_vmap(fn):
  """``fn(*arrays)``, every array batched on axis 0, with ``vmap`` folded into that axis.

  The kernels' grid already runs over the batch, so a vmapped call becomes one call
  with a larger batch (unbatched arguments are broadcast first) instead of going
  through Pallas' generic batching rule, which the interpreter does not take.
  """

  @jax.custom_batching.custom_vmap
  def folded(*args):
    return fn(*args)

  @folded.def_vmap
  def _rule(axis_size, in_batched, *args):
    args = [
      x if batched else jnp.broadcast_to(x, (axis_size, *x.shape))
      for x, batched in zip(args, in_batched, strict=True)
    ]
    outs = folded(*(x.reshape(axis_size * x.shape[1], *x.shape[2:]) for x in args))
    outs = jax.tree.map(lambda y: y.reshape(axis_size, -1, *y.shape[1:]), outs)
    return outs, jax.tree.map(lambda _: True, outs)

  return folded


def forward(problem: Problem, q, k, v, bias, mask, q_len, kv_len):
  """``out [B, T, N, H]`` and base-2 LSE ``[B, N, T]`` (f32)."""
  del bias, mask, q_len, kv_len  # supports() admits only the static full lengths
  return vary_like(_fold_vmap(functools.partial(_forward, problem))(q, k, v), q, k, v)


def _forward(problem: Problem, q, k, v):
  t, s, h = q.shape[1], k.shape[1], q.shape[3]
  config = blocks(problem, q.shape, k.shape, q.dtype, "fwd")
  h_pad, t_pad, s_pad = _extents(t, s, h, config, "fwd")
  head_pairs = config.fwd_head_pairs and (q.shape[2] // k.shape[2]) % 2 == 0
  kv_split = None
  spec = problem.spec
  plain = not spec.causal and spec.window_left is None and spec.window_right is None
  long_keys = s >= tuning.FWD_SPLIT_MIN_KV
  if plain and long_keys and config.fwd_q_tiles == 1 and not head_pairs and not fwd.interpreting():
    options = (h_pad, config.fwd_kv, config.fwd_stages, jnp.dtype(q.dtype).itemsize)
    if fwd.kv_split_fits(*options):
      pairs = q.shape[0] * q.shape[2]
      tiles = (t_pad // fwd.CTA_ROWS, s_pad // config.fwd_kv)
      kv_split = tuning.forward_kv_split(pairs, *tiles, _sm_count(), head_dim=h_pad)
  out, lse2 = fwd.forward(
    _pad(q, t_pad, h_pad),
    _pad(k, s_pad, h_pad),
    _pad(v, s_pad, h_pad),
    scale=problem.scale,
    spec=problem.spec,
    q_len=t,
    kv_len=s,
    **config.forward_options(),
    head_pairs=head_pairs,
    kv_split=kv_split,
  )
  return out[:, :t, :, :h], lse2[:, :, :t]


def _sm_count() -> int:
  """The default device's SMs (0 where it does not say)."""
  return int(getattr(jax.devices()[0], "core_count", 0) or 0)


def backward(problem: Problem, q, k, v, bias, mask, q_len, kv_len, do, lse2, delta):
  """``dq, dk, dv`` (see core._attention_bwd for lse2 and delta)."""
  del bias, mask, q_len, kv_len
  grads = _fold_vmap(functools.partial(_backward, problem))(q, k, v, do, lse2, delta)
  return vary_like(grads, q, k, v, do, lse2, delta)


def _backward(problem: Problem, q, k, v, do, lse2, delta):
  from pallas_attention.mosaic import backward as bwd

  t, s, h = q.shape[1], k.shape[1], q.shape[3]
  config = blocks(problem, q.shape, k.shape, q.dtype, "bwd")
  h_pad, t_pad, s_pad = _extents(t, s, h, config, "bwd")
  # Padded rows: no gradient flows in (do = 0) and p = exp2(s - inf) = 0.
  lse2 = jnp.pad(lse2, ((0, 0), (0, 0), (0, t_pad - t)), constant_values=jnp.inf)
  dq, dk, dv = bwd.backward(
    _pad(q, t_pad, h_pad),
    _pad(k, s_pad, h_pad),
    _pad(v, s_pad, h_pad),
    _pad(do, t_pad, h_pad),
    lse2,
    pad_axis(delta, 2, t_pad),
    scale=problem.scale,
    spec=problem.spec,
    q_len=t,
    kv_len=s,
    blocks=config,
    deterministic=problem.deterministic_backward,
  )
  return dq[:, :t, :, :h], dk[:, :s, :, :h], dv[:, :s, :, :h]

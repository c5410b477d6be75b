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

import jax
import jax.numpy as jnp

from pallas_attention import tuning
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


def blocks(problem: Problem, h_pad: int) -> tuning.MosaicBlocks:
  return problem.config or tuning.mosaic_blocks(h_pad, problem.spec.causal)


def _extents(problem: Problem, t: int, s: int, h: int):
  h_pad = head_dim_extent(h)
  config = blocks(problem, h_pad)
  t_pad = round_up(t, max(fwd.CTA_ROWS, config.dkv_q, config.dq_q))
  s_pad = round_up(s, max(config.fwd_kv, config.dkv_kv, config.dq_kv))
  return h_pad, t_pad, s_pad, config


def _pad(x, seq: int, h_pad: int):
  return pad_axis(pad_axis(x, 3, h_pad), 1, seq)


def forward(problem: Problem, q, k, v, bias, mask, q_len, kv_len):
  """``out [B, T, N, H]`` and base-2 LSE ``[B, N, T]`` (f32)."""
  del bias, mask, q_len, kv_len  # supports() admits only the static full lengths
  t, s, h = q.shape[1], k.shape[1], q.shape[3]
  h_pad, t_pad, s_pad, config = _extents(problem, t, s, h)
  out, lse2 = fwd.forward(
    _pad(q, t_pad, h_pad),
    _pad(k, s_pad, h_pad),
    _pad(v, s_pad, h_pad),
    scale=problem.scale,
    spec=problem.spec,
    q_len=t,
    kv_len=s,
    block_kv=config.fwd_kv,
    stages=config.fwd_stages,
  )
  return out[:, :t, :, :h], lse2[:, :, :t]


def backward(problem: Problem, q, k, v, bias, mask, q_len, kv_len, do, lse2, delta):
  """``dq, dk, dv`` (see core._attention_bwd for lse2 and delta)."""
  from pallas_attention.mosaic import backward as bwd

  del bias, mask, q_len, kv_len
  t, s, h = q.shape[1], k.shape[1], q.shape[3]
  h_pad, t_pad, s_pad, config = _extents(problem, t, s, h)
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
  )
  return dq[:, :t, :, :h], dk[:, :s, :, :h], dv[:, :s, :, :h]

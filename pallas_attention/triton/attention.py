"""FlashAttention forward, dK/dV and dQ kernels in Pallas with the Triton lowering.

NVIDIA sm80+; on a CPU backend the same kernels run in Pallas interpret mode. The
tile arithmetic and the loops over visible tiles come from loops.py, shared with
the XLA implementation; this module only says where each tile lives in memory.

Sequences are zero-padded to whole blocks and head dims to a power of two (at
least 16); padded key columns are masked by the key length, padded query rows are
sliced off.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_attention import loops, tiles, tuning
from pallas_attention.kernel_types import out_type
from pallas_attention.problem import Problem, pad_axis, pad_extra, round_up

MAX_HEAD_DIM = 256


def unavailable() -> str | None:
  """None if the kernels can run on the default device; otherwise why not."""
  backend = jax.default_backend()
  if backend == "cpu":
    return None  # interpret mode
  if backend != "gpu":
    return f"needs an NVIDIA GPU (or CPU interpret mode), not {backend}"
  device = jax.devices()[0]
  capability = getattr(device, "compute_capability", None)
  if capability is None or float(capability) < 8.0:
    return f"needs compute capability >= 8.0, not {capability} ({device.device_kind})"
  return None


def supports(problem: Problem, q, k, bias, mask) -> str | None:
  """None: these kernels serve the call; otherwise why not."""
  del problem, k, bias, mask
  if q.shape[-1] > MAX_HEAD_DIM:
    return f"head dim {q.shape[-1]} > {MAX_HEAD_DIM}"
  return unavailable()


def _interpret() -> bool:
  return jax.default_backend() == "cpu"


def _blocks(problem: Problem, head_dim: int, dtype, t: int, s: int) -> tuning.TritonBlocks:
  blocks = problem.config or tuning.triton_blocks(head_dim, dtype)
  return blocks.clipped(t, s)


def _extra_tile(ref, b, n, row_start, rows: int, col_start, cols: int):
  """One ``[rows|1, cols|1]`` tile of a bias or mask ref ``[Bb, Nb, Tb, Sb]``."""
  if ref is None:
    return None
  bb, nb, tb, sb = ref.shape
  tile = ref[
    b if bb > 1 else 0,
    n if nb > 1 else 0,
    pl.ds(row_start, rows) if tb > 1 else pl.ds(0, 1),
    pl.ds(col_start, cols) if sb > 1 else pl.ds(0, 1),
  ]
  return tile != 0 if ref.dtype == jnp.int8 else tile


def _kv_loader(geo, k_ref, v_ref, bias_ref, mask_ref, b, n, kv_head, q_start):
  """``load(j)``: key block ``j`` of ``kv_head`` and its extras for query head ``n``."""

  def load(j):
    k_start = j * geo.block_k
    cols = pl.ds(k_start, geo.block_k)
    return loops.KVTile(
      k_ref[b, cols, kv_head, :],
      v_ref[b, cols, kv_head, :],
      _extra_tile(bias_ref, b, n, q_start, geo.block_q, k_start, geo.block_k),
      _extra_tile(mask_ref, b, n, q_start, geo.block_q, k_start, geo.block_k),
    )

  return load


def _split_extras(refs, has_bias: bool, has_mask: bool):
  refs = list(refs)
  bias = refs.pop(0) if has_bias else None
  mask = refs.pop(0) if has_mask else None
  return bias, mask, refs


def _prepare(h_pad, t_pad, s_pad, q, k, v, bias, mask):
  """Pad to whole blocks and a power-of-two head dim; mask as int8 for Triton."""
  q = pad_axis(pad_axis(q, 3, h_pad), 1, t_pad)
  k, v = (pad_axis(pad_axis(x, 3, h_pad), 1, s_pad) for x in (k, v))
  bias = pad_extra(bias, t_pad, s_pad)
  mask = None if mask is None else pad_extra(mask.astype(jnp.int8), t_pad, s_pad)
  return q, k, v, [x for x in (bias, mask) if x is not None]


def _geometry(problem, block_q, block_k, mask, dtype) -> loops.Geometry:
  precision = tiles.EXACT
  if dtype == jnp.float32 and not _interpret():
    # Triton's exact float32 product is scalar FMA code, slow to compile and to
    # run; three TF32 passes keep float32 accuracy on the tensor cores.
    precision = lax.DotAlgorithmPreset.TF32_TF32_F32_X3
  return loops.Geometry(block_q, block_k, problem.scale, problem.spec, mask is not None, precision)


def _forward_kernel(
  q_len_ref, kv_len_ref, q_ref, k_ref, v_ref, *refs, geo, groups, has_bias, has_mask
):
  bias_ref, mask_ref, (o_ref, lse_ref) = _split_extras(refs, has_bias, has_mask)
  num_q_blocks = pl.num_programs(0)
  # Last query blocks first: under a causal mask they have the most work.
  i = num_q_blocks - 1 - pl.program_id(0)
  b, n = pl.program_id(1), pl.program_id(2)
  kv_head = lax.div(n, groups)
  q_start = i * geo.block_q
  rows = pl.ds(q_start, geo.block_q)

  load = _kv_loader(geo, k_ref, v_ref, bias_ref, mask_ref, b, n, kv_head, q_start)
  out, lse2 = loops.forward_rows(
    geo, q_ref[b, rows, n, :], q_start, load, q_len_ref[b], kv_len_ref[b]
  )
  o_ref[b, rows, n, :] = out.astype(o_ref.dtype)
  lse_ref[b, n, rows] = lse2


def forward(problem: Problem, q, k, v, bias, mask, q_len, kv_len):
  """``out [B, T, N, H]`` (q's dtype) and base-2 LSE ``[B, N, T]`` (f32)."""
  b, t, n, h = q.shape
  s, num_kv_heads = k.shape[1], k.shape[2]
  h_pad = tuning.triton_extent(h)
  blocks = _blocks(problem, h_pad, q.dtype, t, s)
  t_pad, s_pad = round_up(t, blocks.fwd_q), round_up(s, blocks.fwd_k)
  q, k, v, extras = _prepare(h_pad, t_pad, s_pad, q, k, v, bias, mask)
  kernel = functools.partial(
    _forward_kernel,
    geo=_geometry(problem, blocks.fwd_q, blocks.fwd_k, mask, q.dtype),
    groups=n // num_kv_heads,
    has_bias=bias is not None,
    has_mask=mask is not None,
  )
  out, lse2 = pl.pallas_call(
    kernel,
    grid=(t_pad // blocks.fwd_q, b, n),
    out_shape=[
      out_type((b, t_pad, n, h_pad), q.dtype, q_len, kv_len, q, k, v, *extras),
      out_type((b, n, t_pad), jnp.float32, q_len, kv_len, q, k, v, *extras),
    ],
    compiler_params=plgpu.CompilerParams(num_warps=blocks.fwd_warps, num_stages=blocks.fwd_stages),
    interpret=_interpret(),
    name="pallas_attention_fwd",
  )(q_len, kv_len, q, k, v, *extras)
  return out[:, :t, :, :h], lse2[:, :, :t]


def _dq_kernel(
  q_len_ref,
  kv_len_ref,
  q_ref,
  k_ref,
  v_ref,
  do_ref,
  lse_ref,
  delta_ref,
  *refs,
  geo,
  groups,
  has_bias,
  has_mask,
):
  bias_ref, mask_ref, (dq_ref,) = _split_extras(refs, has_bias, has_mask)
  i, b, n = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  kv_head = lax.div(n, groups)
  q_start = i * geo.block_q
  rows = pl.ds(q_start, geo.block_q)

  load = _kv_loader(geo, k_ref, v_ref, bias_ref, mask_ref, b, n, kv_head, q_start)
  dq = loops.dq_rows(
    geo,
    q_ref[b, rows, n, :],
    do_ref[b, rows, n, :],
    lse_ref[b, n, rows],
    delta_ref[b, n, rows],
    q_start,
    load,
    q_len_ref[b],
    kv_len_ref[b],
  )
  dq_ref[b, rows, n, :] = dq.astype(dq_ref.dtype)


def _dkv_kernel(
  q_len_ref,
  kv_len_ref,
  q_ref,
  k_ref,
  v_ref,
  do_ref,
  lse_ref,
  delta_ref,
  *refs,
  geo,
  groups,
  has_bias,
  has_mask,
):
  bias_ref, mask_ref, (dk_ref, dv_ref) = _split_extras(refs, has_bias, has_mask)
  j, b, kv_head = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  k_start = j * geo.block_k
  cols = pl.ds(k_start, geo.block_k)

  def load(g, i):
    n = kv_head * groups + g
    q_start = i * geo.block_q
    rows = pl.ds(q_start, geo.block_q)
    return loops.QTile(
      q_ref[b, rows, n, :],
      do_ref[b, rows, n, :],
      lse_ref[b, n, rows],
      delta_ref[b, n, rows],
      _extra_tile(bias_ref, b, n, q_start, geo.block_q, k_start, geo.block_k),
      _extra_tile(mask_ref, b, n, q_start, geo.block_q, k_start, geo.block_k),
    )

  dk, dv = loops.dkv_cols(
    geo,
    k_ref[b, cols, kv_head, :],
    v_ref[b, cols, kv_head, :],
    k_start,
    groups,
    load,
    q_len_ref[b],
    kv_len_ref[b],
  )
  dk_ref[b, cols, kv_head, :] = dk.astype(dk_ref.dtype)
  dv_ref[b, cols, kv_head, :] = dv.astype(dv_ref.dtype)


def backward(problem: Problem, q, k, v, bias, mask, q_len, kv_len, do, lse2, delta):
  """``dq, dk, dv`` in the dtypes of q, k, v (see core._attention_bwd for lse2, delta)."""
  b, t, n, h = q.shape
  s, num_kv_heads = k.shape[1], k.shape[2]
  h_pad = tuning.triton_extent(h)
  blocks = _blocks(problem, h_pad, q.dtype, t, s)
  t_pad = round_up(t, max(blocks.dkv_q, blocks.dq_q))
  s_pad = round_up(s, max(blocks.dkv_k, blocks.dq_k))
  q, k, v, extras = _prepare(h_pad, t_pad, s_pad, q, k, v, bias, mask)
  do = pad_axis(pad_axis(do, 3, h_pad), 1, t_pad)
  lse2, delta = (pad_axis(x, 2, t_pad) for x in (lse2, delta))
  inputs = (q_len, kv_len, q, k, v, do, lse2, delta, *extras)
  common = dict(groups=n // num_kv_heads, has_bias=bias is not None, has_mask=mask is not None)

  dk, dv = pl.pallas_call(
    functools.partial(
      _dkv_kernel, geo=_geometry(problem, blocks.dkv_q, blocks.dkv_k, mask, q.dtype), **common
    ),
    grid=(s_pad // blocks.dkv_k, b, num_kv_heads),
    out_shape=[out_type(k.shape, k.dtype, *inputs), out_type(v.shape, v.dtype, *inputs)],
    compiler_params=plgpu.CompilerParams(num_warps=blocks.dkv_warps, num_stages=blocks.dkv_stages),
    interpret=_interpret(),
    name="pallas_attention_dkv",
  )(*inputs)
  dq = pl.pallas_call(
    functools.partial(
      _dq_kernel, geo=_geometry(problem, blocks.dq_q, blocks.dq_k, mask, q.dtype), **common
    ),
    grid=(t_pad // blocks.dq_q, b, n),
    out_shape=out_type(q.shape, q.dtype, *inputs),
    compiler_params=plgpu.CompilerParams(num_warps=blocks.dq_warps, num_stages=blocks.dq_stages),
    interpret=_interpret(),
    name="pallas_attention_dq",
  )(*inputs)
  return dq[:, :t, :, :h], dk[:, :s, :, :h], dv[:, :s, :, :h]

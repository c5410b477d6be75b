"""FlashAttention forward in Pallas Mosaic GPU (Hopper): groundwork for the `mosaic` issue.

Not dispatched yet (``implementation="mosaic"`` still raises NotImplementedError):
this is the first step, a forward kernel that compiles and is correct on an H100
and runs in the Mosaic GPU interpreter on CPU. One warpgroup per 64-row query
block; K/V tiles arrive by TMA in a ``stages``-deep shared-memory ring, each slot
with its own barrier, and the next tile's copy is issued as soon as a slot is
free; both products are ``wgmma``. P goes through shared memory because the
interpreter's ``wgmma`` takes its left operand only from there.

Limits of this version: bf16/f16; T, S and H multiples of 64; causal or no mask;
no lengths, window, bias or mask; no backward. benchmarks/NOTES.md has its speed.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_attention import tiles

BLOCK = 64  # rows of one wgmma per warpgroup; also the key tile


def check(q, k) -> None:
  """Raise NotImplementedError for what this kernel does not serve."""
  t, h = q.shape[1], q.shape[3]
  s = k.shape[1]
  if q.dtype not in (jnp.bfloat16, jnp.float16):
    raise NotImplementedError(f"mosaic: dtype {q.dtype} (needs bfloat16 or float16)")
  if t % BLOCK or s % BLOCK or h % 64 or h > 256:
    raise NotImplementedError(
      f"mosaic: T={t}, S={s} must be multiples of {BLOCK} and H={h} one of 64, 128, 192, 256"
    )


def forward(q, k, v, *, scale: float, causal: bool = False, stages: int = 2):
  """``out [B, T, N, H]`` and base-2 LSE ``[B, N, T]`` (f32)."""
  check(q, k)
  b, t, n, h = q.shape
  s, kv_heads = k.shape[1], k.shape[2]
  groups = n // kv_heads
  num_kv_blocks = s // BLOCK
  stages = min(stages, num_kv_blocks)
  dtype = q.dtype

  def kernel(q_ref, k_ref, v_ref, o_ref, lse_ref, scratch):
    q_smem, k_smem, v_smem, p_smem, lse_smem, q_bar, k_bars, v_bars = scratch
    q_start = lax.axis_index("q") * BLOCK
    head, batch = lax.axis_index("heads"), lax.axis_index("batch")
    kv_head = lax.div(head, jnp.array(groups, head.dtype))
    plgpu.copy_gmem_to_smem(q_ref.at[batch, pl.ds(q_start, BLOCK), head], q_smem, q_bar.at[0])

    def fetch(j, slot):
      cols = (batch, pl.ds(j * BLOCK, BLOCK), kv_head)
      plgpu.copy_gmem_to_smem(k_ref.at[cols], k_smem.at[slot], k_bars.at[slot])
      plgpu.copy_gmem_to_smem(v_ref.at[cols], v_smem.at[slot], v_bars.at[slot])

    for slot in range(stages):
      fetch(slot, slot)
    num_steps = num_kv_blocks
    if causal:  # key blocks past the diagonal are never loaded
      num_steps = jnp.minimum(lax.div(q_start, jnp.array(BLOCK, q_start.dtype)) + 1, num_kv_blocks)
    plgpu.barrier_wait(q_bar.at[0])

    row_layout = plgpu.Layout.WGMMA.reduce(1)
    m = plgpu.layout_cast(jnp.full((BLOCK,), -jnp.inf, jnp.float32), row_layout)
    denom = plgpu.layout_cast(jnp.zeros((BLOCK,), jnp.float32), row_layout)
    acc = plgpu.layout_cast(jnp.zeros((BLOCK, h), jnp.float32), plgpu.Layout.WGMMA)

    def step(j, carry):
      m, denom, acc = carry
      slot = lax.rem(j, jnp.array(stages, j.dtype))
      plgpu.barrier_wait(k_bars.at[slot])

      def scores(acc_ref):
        plgpu.wgmma(acc_ref, q_smem, k_smem.at[slot].transpose((1, 0)))
        return acc_ref[...]

      sc = pl.run_scoped(scores, plgpu.ACC((BLOCK, BLOCK), jnp.float32)) * (scale * tiles.LOG2E)
      if causal:
        rows = plgpu.broadcasted_iota(jnp.int32, (BLOCK, BLOCK), 0, layout=plgpu.Layout.WGMMA)
        cols = plgpu.broadcasted_iota(jnp.int32, (BLOCK, BLOCK), 1, layout=plgpu.Layout.WGMMA)
        sc = jnp.where(rows + q_start >= cols + j * BLOCK, sc, -jnp.inf)
      m_new = jnp.maximum(m, sc.max(axis=1))
      m_shift = jnp.where(m_new == -jnp.inf, 0.0, m_new)
      alpha = jnp.exp2(m - m_shift)
      p = jnp.exp2(sc - lax.broadcast_in_dim(m_shift, sc.shape, [0]))
      denom = denom * alpha + p.sum(axis=1)
      p_smem[...] = p.astype(dtype)
      plgpu.commit_smem()
      plgpu.barrier_wait(v_bars.at[slot])

      def values(acc_ref):
        plgpu.wgmma(acc_ref, p_smem, v_smem.at[slot])
        return acc_ref[...]

      pv = pl.run_scoped(values, plgpu.ACC((BLOCK, h), jnp.float32))
      acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0]) + pv

      # Both products have read this slot: refill it with the tile `stages` ahead.
      @pl.when(j + stages < num_steps)
      def _():
        fetch(j + stages, slot)

      return m_new, denom, acc

    m, denom, acc = lax.fori_loop(0, num_steps, step, (m, denom, acc))
    empty = denom == 0.0
    safe = jnp.where(empty, 1.0, denom)
    q_smem[...] = (acc / lax.broadcast_in_dim(safe, acc.shape, [0])).astype(dtype)
    lse_smem[...] = jnp.where(empty, -jnp.inf, m + jnp.log2(safe))
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(q_smem, o_ref.at[batch, pl.ds(q_start, BLOCK), head])
    plgpu.copy_smem_to_gmem(lse_smem, lse_ref.at[batch, head, pl.ds(q_start, BLOCK)])
    plgpu.wait_smem_to_gmem(0)

  def entry(q_ref, k_ref, v_ref, o_ref, lse_ref):
    swizzled = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))
    pl.run_scoped(
      lambda *scratch: kernel(q_ref, k_ref, v_ref, o_ref, lse_ref, scratch),
      plgpu.SMEM((BLOCK, h), dtype, transforms=swizzled),
      plgpu.SMEM((stages, BLOCK, h), dtype, transforms=swizzled),
      plgpu.SMEM((stages, BLOCK, h), dtype, transforms=swizzled),
      plgpu.SMEM((BLOCK, BLOCK), dtype, transforms=swizzled),
      plgpu.SMEM((BLOCK,), jnp.float32),
      plgpu.Barrier(num_barriers=1),
      plgpu.Barrier(num_barriers=stages),
      plgpu.Barrier(num_barriers=stages),
    )

  call = plgpu.kernel(
    entry,
    out_type=[q, jax.ShapeDtypeStruct((b, n, t), jnp.float32)],
    grid=(t // BLOCK, n, b),
    grid_names=("q", "heads", "batch"),
  )
  if jax.default_backend() == "cpu":
    with plgpu.force_gpu_interpret_mode():
      return call(q, k, v)
  return call(q, k, v)


forward_jit = jax.jit(forward, static_argnames=("scale", "causal", "stages"))

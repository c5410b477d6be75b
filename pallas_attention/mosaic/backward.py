"""FlashAttention backward in Pallas Mosaic GPU (Hopper): a dK/dV kernel and a dQ kernel,
or (``blocks.bwd_fused``) one kernel for all three (``_fused``), whose dQ additions are
put in a fixed order when ``deterministic``.

Both kernels are warp specialised: ``consumers`` warpgroups of 64 rows each do the
math, and one producer warpgroup streams the tiles they loop over through a
``blocks.bwd_stages``-deep shared-memory ring by TMA. Each slot has "loaded"
barriers (the TMA copies arrive on them) and a "consumed" barrier (every consumer
arrives once it is done with the slot); the producer refills a slot only after its
consumed barrier completes.

dK/dV: a CTA owns ``blocks.dkv_kv`` key rows of one kv head and keeps its K and V
tiles in shared memory; it loops over every query head of the kv head's GQA group
and over the query tiles that may see its keys, so dK and dV of a kv head are
summed in registers (no atomics, no per-query-head temporaries). Scores are
computed transposed, ``sᵀ = K·Qᵀ``, so that ``pᵀ`` and ``dsᵀ`` are already the
left operands of ``dV += pᵀ·dO`` and ``dK += dsᵀ·Q``.

dQ: a CTA owns ``blocks.dq_q`` query rows of one query head and loops over the
key tiles they may see.

Tiles that a warpgroup's rows cannot see are skipped (only their barriers are
honoured), tiles on a mask edge get the element-wise mask of ``masks.visible``,
and the rest run unmasked.

The left operand of the accumulating products (``pᵀ``, ``dsᵀ``, ``ds``) comes
from registers on the GPU; the Mosaic GPU interpreter only takes it from shared
memory, so with ``p_in_registers=False`` it is staged there first.
"""

from __future__ import annotations

import contextlib
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_attention import masks, tiles, tuning
from pallas_attention.mosaic import forward as fwd

ROWS = 64  # rows of one consumer warpgroup: the M of one wgmma
_SWIZZLED = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))


def check(q, k, blocks: tuning.MosaicBlocks) -> None:
  """Raise for inputs the kernels do not serve (they expect padded inputs)."""
  t, n, h = q.shape[1:]
  s, kv_heads = k.shape[1:3]
  if q.dtype not in (jnp.bfloat16, jnp.float16):
    raise NotImplementedError(f"mosaic backward: dtype {q.dtype} (needs bfloat16 or float16)")
  if h not in (64, 128, 256):
    raise NotImplementedError(f"mosaic backward: head dim {h} (needs 64, 128 or 256)")
  if n % kv_heads:
    raise ValueError(f"mosaic backward: {n} query heads are not a multiple of {kv_heads}")
  sizes = (blocks.dkv_q, blocks.dkv_kv, blocks.dq_q, blocks.dq_kv)
  if any(size % 64 or size > 256 for size in sizes) or blocks.bwd_stages < 1:
    raise ValueError(f"mosaic backward: blocks {blocks} must be multiples of 64, at most 256")
  if blocks.bwd_fused and (
    blocks.dkv_split or fused_slab(blocks.dkv_q, h, blocks.dkv_kv // ROWS) is None
  ):
    raise ValueError(
      f"mosaic backward: bwd_fused needs dkv_split off and dkv_kv, dkv_q of (128, 128), "
      f"(128, 64) at head dim 128 or (64, 64); got {blocks}"
    )
  if t % max(blocks.dkv_q, blocks.dq_q) or s % max(blocks.dkv_kv, blocks.dq_kv):
    raise ValueError(f"mosaic backward: T={t}, S={s} must be multiples of the blocks {blocks}")


def _matmul(a, b, shape):
  """``a @ b`` of shared-memory operands as a float32 register tile (WGMMA layout)."""

  def product(acc_ref):
    plgpu.wgmma(acc_ref, a, b)
    return acc_ref[...]

  return pl.run_scoped(product, plgpu.ACC(shape, jnp.float32))


def _matmul_add(acc, a, b, a_smem, also=None):
  """``acc + a @ b``: ``a`` a 16-bit register tile, ``b`` in shared memory.

  ``a_smem`` None: ``a`` is the wgmma's register operand and ``acc`` its
  accumulator. Otherwise ``a`` goes through ``a_smem`` first (the interpreter path).
  ``also``: ``(a2, b2, shape)`` of a shared-memory product issued in the same wgmma
  group (one wait for both); then ``(acc + a @ b, a2 @ b2)`` is returned.
  """
  shapes = [acc.shape] if also is None else [acc.shape, also[2]]

  def issue(refs):
    plgpu.wgmma(refs[0], a if a_smem is None else a_smem, b)
    if also is not None:
      plgpu.wgmma(refs[1], also[0], also[1])

  if a_smem is None:
    inits = [acc] + [jnp.zeros(shape, jnp.float32) for shape in shapes[1:]]
    inits = [plgpu.layout_cast(x, plgpu.Layout.WGMMA) for x in inits]
    out = pl.run_state(issue)(tuple(plgpu.ACC.init(x) for x in inits))
  else:
    a_smem[...] = a
    plgpu.commit_smem()

    def issue_and_read(*refs):
      issue(refs)
      return tuple(ref[...] for ref in refs)

    out = pl.run_scoped(issue_and_read, *(plgpu.ACC(shape, jnp.float32) for shape in shapes))
    out = (acc + out[0], *out[1:])
  return out[0] if also is None else out


def _broadcast(x, shape, dim):
  return lax.broadcast_in_dim(x, shape, [dim])


def _positions(shape, dim, start):
  """``start`` + the index along ``dim`` of a 2-D WGMMA-layout tile, broadcast from a
  vector (a thread holds one value per row or column it owns) instead of a full iota
  tile, so a masked tile needs few registers for its row and column numbers."""
  layout = plgpu.Layout.WGMMA.reduce(1 - dim)
  vec = plgpu.broadcasted_iota(jnp.int32, (shape[dim],), 0, layout=layout)
  return _broadcast(vec + start, shape, dim)


def _tile_ranges(block_range, cta_start, cta_rows, wg_start, other_block, wg_rows=ROWS):
  """Tiles ``lo <= c_lo <= f_lo <= f_hi <= c_hi <= hi`` of the other axis.

  ``[lo, hi)``: the tiles the CTA streams; ``[c_lo, c_hi)``: those that this
  warpgroup's ``wg_rows`` rows may see; ``[f_lo, f_hi)``: those they see in every
  element.
  """
  lo, _, _, hi = block_range(cta_start, cta_rows, other_block)
  c_lo, f_lo, f_hi, c_hi = block_range(wg_start, wg_rows, other_block)
  c_lo = jnp.clip(c_lo, lo, hi)
  c_hi = jnp.clip(c_hi, c_lo, hi)
  f_lo = jnp.clip(f_lo, c_lo, c_hi)
  f_hi = jnp.clip(f_hi, f_lo, c_hi)
  return lo, c_lo, f_lo, f_hi, c_hi, hi


def _sweep(ranges, visit, skip, carry, edges, down=False):
  """Visit tiles ``[lo, hi)`` in order: ``visit(masked, tile, carry)`` or ``skip``;
  from ``hi - 1`` down where ``down`` (a traced bool, or Python False).

  One loop visits every tile the rows may see; ``masked`` is a traced bool, true on
  the tiles outside ``[f_lo, f_hi)`` (``_masked`` masks those only), or
  False where ``edges`` (``masks.edge_runs``) says no tile needs the mask. A second
  loop for the masked tiles would keep its own copies of the loop-invariant wgmma
  descriptors live through the unmasked one: ptxas ran out of registers and spilled
  them in the unmasked loop (benchmarks/RESULTS.md, sixth session).
  """
  lo, c_lo, f_lo, f_hi, c_hi, hi = ranges

  def loop(start, stop, body, carry):
    if down is False:
      return lax.fori_loop(start, stop, body, carry)

    def mirrored(j, carry):
      return body(start + _mirror(j - start, stop - start, down), carry)

    return lax.fori_loop(start, stop, mirrored, carry)

  if not any(edges):
    return loop(lo, hi, functools.partial(visit, False), carry)
  lead, trail = edges

  def seen(i, carry):
    before, after = i < f_lo, i >= f_hi
    masked = (before | after) if lead and trail else (before if lead else after)
    return visit(masked, i, carry)

  first, last = (lo, c_lo), (c_hi, hi)
  if down is not False:  # the tiles above the rows' come first
    pick = functools.partial(jnp.where, down)
    first, last = (pick(c_hi, lo), pick(hi, c_lo)), (pick(lo, c_hi), pick(c_lo, hi))
  carry = loop(*first, skip, carry)
  carry = loop(c_lo, c_hi, seen, carry)
  return loop(*last, skip, carry)


def _masked(masked, tile, row0, col_tile, transposed, spec, q_len, kv_len):
  """``tile`` with the pairs ``masks.visible`` hides set to 0 where ``masked`` (a traced
  bool: under ``lax.cond``, so only edge tiles compute the mask), ``tile`` itself where
  ``masked`` is False (static: no mask compiled).

  The tile's rows are numbered from ``row0``, its columns from ``col_tile`` times its
  width; ``transposed``: rows are keys and columns queries (``sᵀ`` of the dK/dV
  kernels), else rows are queries.
  """
  if masked is False:
    return tile

  def mask(tile):
    rows = _positions(tile.shape, 0, row0)
    cols = _positions(tile.shape, 1, col_tile * tile.shape[1])
    queries, keys = (cols, rows) if transposed else (rows, cols)
    return jnp.where(masks.visible(queries, keys, spec, q_len, kv_len), tile, 0.0)

  return lax.cond(masked, mask, lambda tile: tile, tile)


def _sweep_group(group, ranges, visit, skip, carry, edges, down=False):
  """``_sweep`` for each query head ``g`` of a GQA group, in order:
  ``visit(g, masked, i, carry)`` or ``skip(g, i, carry)`` per query tile ``i``."""

  def per_head(g, carry):
    visit_g, skip_g = functools.partial(visit, g), functools.partial(skip, g)
    return _sweep(ranges, visit_g, skip_g, carry, edges, down)

  return lax.fori_loop(0, group, per_head, carry)


def _dkv_tile(slot, rings, bars, k_wg, v_wg, dv, a_smem, masked, r0, i, static):
  """One query tile of a dK/dV warpgroup (``_dkv``, ``_fused``), up to ``dsᵀ``.

  Waits for the ring ``slot``'s Q, lse (``bars[0]``) and dO, delta (``bars[1]``);
  computes ``sᵀ = K·Qᵀ``, ``pᵀ`` (masked element-wise if ``masked``; the warpgroup's
  keys start at ``r0``, and ``i`` is the query tile), ``dv + pᵀ·dO`` and ``dPᵀ = V·dOᵀ``
  in one wgmma group, and ``dsᵀ = pᵀ ⊙ (dPᵀ − δ)``. ``static``: scale, spec, q_len,
  kv_len. Returns ``(dv, dsᵀ as float32, the Q tile)``.
  """
  scale, spec, q_len, kv_len = static
  q_ring, do_ring, lse_ring, delta_ring = rings
  q_bar, do_bar = bars
  bq, dtype = q_ring.shape[1], q_ring.dtype
  vec_layout = plgpu.Layout.WGMMA.reduce(0)  # one value per column of sᵀ
  with jax.named_scope("b_qwait"):
    plgpu.barrier_wait(q_bar.at[slot])
  q_tile, do_tile = q_ring.at[slot], do_ring.at[slot]
  with jax.named_scope("b_s"):
    st = _matmul(k_wg, q_tile.transpose((1, 0)), (ROWS, bq))
  lse = plgpu.load(lse_ring.at[slot], layout=vec_layout)
  pt = jnp.exp2(st * (scale * tiles.LOG2E) - _broadcast(lse, st.shape, 1))
  pt = _masked(masked, pt, r0, i, True, spec, q_len, kv_len)
  with jax.named_scope("b_dowait"):
    plgpu.barrier_wait(do_bar.at[slot])
  dpt_product = (v_wg, do_tile.transpose((1, 0)), (ROWS, bq))
  with jax.named_scope("b_dv_dp"):
    dv, dpt = _matmul_add(dv, pt.astype(dtype), do_tile, a_smem, also=dpt_product)
  delta = plgpu.load(delta_ring.at[slot], layout=vec_layout)
  dst = pt * (dpt - _broadcast(delta, dpt.shape, 1))
  return dv, dst, q_tile


def _produce(steps, stages: int, fetch, consumed) -> None:
  """Producer warpgroup: ``fetch(step, slot)`` for every step through the ring."""
  for slot in range(stages):
    pl.when(slot < steps)(functools.partial(fetch, jnp.int32(slot), slot))

  def refill(step, carry):
    slot = lax.rem(step, stages)
    plgpu.barrier_wait(consumed.at[slot])  # the consumers are done with step - stages
    fetch(step, slot)
    return carry

  def drain(step, carry):  # observe every completion: the interpreter checks it
    plgpu.barrier_wait(consumed.at[lax.rem(step, stages)])
    return carry

  lax.fori_loop(stages, steps, refill, 0)
  lax.fori_loop(jnp.maximum(steps - stages, 0), steps, drain, 0)


def _mirror(offset, count, down):
  """``offset`` in ``[0, count)``, counted from the other end where ``down`` (a traced
  bool; Python False: unchanged, nothing traced)."""
  if down is False:
    return offset
  return jnp.where(down, count - 1 - offset, offset)


def _query_tile(step, lo, num_q, down=False):
  """The (GQA head ``g``, query tile ``i``) of a dK/dV kernel's step: the heads in
  turn, each over tiles ``[lo, lo + num_q)`` in order (from the last down where
  ``down``: the ordered fused kernel's heaviest-first blocks, ``_ordered_cta``). The
  producer fetches in this order, and the fused kernel's dQ writer adds in it.
  ``_step`` is the inverse."""
  g = lax.div(step, num_q)  # num_q > 0 whenever there is a step
  return g, lo + _mirror(step - g * num_q, num_q, down)


def _step(g, i, lo, num_q, down=False):
  """The step at which a dK/dV kernel visits query tile ``i`` of GQA head ``g``."""
  return g * num_q + _mirror(i - lo, num_q, down)


def _produce_query_tiles(refs, rings, bars, batch, head0, group, lo, num_q, bq, stages, down=False):
  """Producer of the dK/dV kernels: Q, lse, dO, delta tiles for every (query head of
  the GQA group starting at ``head0``, query tile in ``[lo, lo + num_q)``) step
  (``_query_tile``'s order).

  Q and lse arrive on ``q_bar``, dO and delta on ``do_bar`` (two copies each).
  """
  q_ref, lse_ref, do_ref, delta_ref = refs
  q_ring, lse_ring, do_ring, delta_ring = rings
  q_bar, do_bar, consumed = bars

  def fetch(step, slot):
    g, i = _query_tile(step, lo, num_q, down)
    q0 = i * bq
    head = head0 + g
    rows, vec = (batch, pl.ds(q0, bq), head), (batch, head, pl.ds(q0, bq))
    plgpu.copy_gmem_to_smem(q_ref.at[rows], q_ring.at[slot], q_bar.at[slot])
    plgpu.copy_gmem_to_smem(lse_ref.at[vec], lse_ring.at[slot], q_bar.at[slot])
    plgpu.copy_gmem_to_smem(do_ref.at[rows], do_ring.at[slot], do_bar.at[slot])
    plgpu.copy_gmem_to_smem(delta_ref.at[vec], delta_ring.at[slot], do_bar.at[slot])

  _produce(group * num_q, stages, fetch, consumed)


def _skip_tile(loaded, consumed, slot) -> None:
  """A consumer's step on a tile its rows cannot see: honour the barriers only."""
  for bar in loaded:
    plgpu.barrier_wait(bar.at[slot])
  plgpu.barrier_arrive(consumed.at[slot])


def _registers(role: str) -> None:
  """Move registers from the producer to the consumers (warp specialisation's point:
  the consumers hold two float32 accumulators and the score tiles)."""
  if role == "producer":
    plgpu.set_max_registers(24, action="decrease")
  else:
    plgpu.set_max_registers(240, action="increase")


# The fused kernel's timeline (benchmarks/timeline_probe.py): with ``timeline`` it also
# writes, per CTA and step, the GPU's nanosecond clock at these points. Writer warp
# (ordered): its step starts, its turn has come (the adds above have landed), the
# consumers' slabs are in, its adds have landed, its count and buffer are released.
# Consumer warpgroup 0: the tile starts, it waits for its slab buffer (ordered: the
# writer to free it; unordered: its last add to have read it), it has it; and at step 0
# only, the CTA's end (dK and dV stored).
TIMELINE_EVENTS = (
  "writer_start",
  "writer_turn",
  "writer_slabs",
  "writer_landed",
  "writer_done",
  "consumer_start",
  "consumer_wait",
  "consumer_handed",
  "consumer_end",
)


def _store_register(ref, register: str) -> None:
  """Store a special register (``globaltimer_lo``: the GPU's nanosecond clock, low 32
  bits; ``smid``) into a one-element int32 global-memory ref (every thread of the warp
  or warpgroup stores the same value)."""
  from jax._src.lib.mlir import ir
  from jax._src.lib.mlir.dialects import llvm
  from jax.experimental.mosaic.gpu import utils as mgpu_utils

  @plgpu.inline_mgpu(arg_types=(plgpu.RefType(),))
  def store(_, target):
    i32, i64 = ir.IntegerType.get_signless(32), ir.IntegerType.get_signless(64)
    value = mgpu_utils.inline_ptx(
      f"mov.u32 $0, %{register};", result_types=i32, has_side_effects=True
    )
    address = llvm.ptrtoint(i64, mgpu_utils.memref_ptr(target))
    mgpu_utils.inline_ptx("st.global.u32 [$0], $1;", address, value, has_side_effects=True)

  store(ref)


def _call(body, out_type, scratch, grid, grid_names, consumers, name):
  # ``name``: the kernel's name in profiles (benchmarks/profile_step.py).
  # Mosaic GPU launches the last grid axis fastest: give it the tile axis, so the CTAs
  # that stream the same head's tiles run side by side and share them in L2.
  return plgpu.kernel(
    body,
    out_type=out_type,
    scratch_types=scratch,
    compiler_params=fwd.compiler_params(interpret=False),
    grid=grid,
    grid_names=grid_names,
    num_threads=consumers + 1,
    thread_name="wg",
    kernel_name=name,
  )


def _dkv(q, k, v, do, lse2, delta, scale, spec, q_len, kv_len, blocks, p_in_registers):
  b, t, n, h = q.shape
  s, kv_heads = k.shape[1:3]
  group = n // kv_heads
  bq, bk, stages = blocks.dkv_q, blocks.dkv_kv, blocks.bwd_stages
  consumers = bk // ROWS
  dtype = q.dtype
  edges = masks.edge_runs(spec, q_len, kv_len, t, s, over_queries=True)
  q_range = functools.partial(masks.q_block_range, spec=spec, q_len=q_len, kv_len=kv_len)
  static = (scale, spec, q_len, kv_len)

  def kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref, *scratch):
    k_smem, v_smem, q_ring, do_ring, lse_ring, delta_ring, *p_smem = scratch[:-4]
    kv_bar, q_bar, do_bar, consumed = scratch[-4:]
    wg = lax.axis_index("wg")
    batch, kv_head = lax.axis_index("batch"), lax.axis_index("heads")
    k0 = lax.axis_index("kv") * bk
    lo, _, _, hi = q_range(k0, bk, bq)
    num_q = hi - lo

    @pl.when(wg == consumers)
    def _producer():
      _registers("producer")

      _produce_query_tiles(
        (q_ref, lse_ref, do_ref, delta_ref),
        (q_ring, lse_ring, do_ring, delta_ring),
        (q_bar, do_bar, consumed),
        batch,
        kv_head * group,
        group,
        lo,
        num_q,
        bq,
        stages,
      )

    @pl.when(wg < consumers)
    def _consumer():
      _registers("consumer")
      r0 = k0 + wg * ROWS
      rows = (batch, pl.ds(r0, ROWS), kv_head)
      k_wg, v_wg = k_smem.at[wg], v_smem.at[wg]
      a_smem = p_smem[0].at[wg] if p_smem else None
      plgpu.copy_gmem_to_smem(k_ref.at[rows], k_wg, kv_bar.at[wg])
      plgpu.copy_gmem_to_smem(v_ref.at[rows], v_wg, kv_bar.at[wg])
      plgpu.barrier_wait(kv_bar.at[wg])
      ranges = _tile_ranges(q_range, k0, bk, r0, bq)
      rings = (q_ring, do_ring, lse_ring, delta_ring)

      def visit(g, masked, i, carry):
        dk, dv = carry
        slot = lax.rem(_step(g, i, lo, num_q), stages)
        tile = (slot, rings, (q_bar, do_bar), k_wg, v_wg, dv, a_smem, masked, r0, i, static)
        dv, dst, q_tile = _dkv_tile(*tile)
        with jax.named_scope("b_dk"):
          dk = _matmul_add(dk, dst.astype(dtype), q_tile, a_smem)
        plgpu.barrier_arrive(consumed.at[slot])
        return dk, dv

      def skip(g, i, carry):
        _skip_tile((q_bar, do_bar), consumed, lax.rem(_step(g, i, lo, num_q), stages))
        return carry

      zeros = plgpu.layout_cast(jnp.zeros((ROWS, h), jnp.float32), plgpu.Layout.WGMMA)
      dk, dv = _sweep_group(group, ranges, visit, skip, (zeros, zeros), edges)
      k_wg[...] = (dk * scale).astype(k_wg.dtype)
      v_wg[...] = dv.astype(v_wg.dtype)
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(k_wg, dk_ref.at[rows])
      plgpu.copy_smem_to_gmem(v_wg, dv_ref.at[rows])
      plgpu.wait_smem_to_gmem(0)

  scratch = [
    plgpu.SMEM((consumers, ROWS, h), k.dtype, transforms=_SWIZZLED),
    plgpu.SMEM((consumers, ROWS, h), v.dtype, transforms=_SWIZZLED),
    plgpu.SMEM((stages, bq, h), dtype, transforms=_SWIZZLED),
    plgpu.SMEM((stages, bq, h), dtype, transforms=_SWIZZLED),
    plgpu.SMEM((stages, bq), jnp.float32),
    plgpu.SMEM((stages, bq), jnp.float32),
  ]
  if not p_in_registers:
    scratch.append(plgpu.SMEM((consumers, ROWS, bq), dtype, transforms=_SWIZZLED))
  scratch += [
    plgpu.Barrier(num_arrivals=2, num_barriers=consumers),  # K, V
    plgpu.Barrier(num_arrivals=2, num_barriers=stages),  # Q, lse
    plgpu.Barrier(num_arrivals=2, num_barriers=stages),  # dO, delta
    plgpu.Barrier(num_arrivals=consumers, num_barriers=stages),
  ]
  grid = (b, kv_heads, s // bk)
  call = _call(kernel, (k, v), scratch, grid, ("batch", "heads", "kv"), consumers, "attention_dkv")
  return call(q, k, v, do, lse2, delta)


def query_tiles_of_key_blocks(spec: masks.MaskSpec, q_len: int, kv_len: int, s: int, bq, bk):
  """numpy ``(lo, hi)`` over the ``s // bk`` key blocks: block ``j``'s CTA visits query
  tiles ``[lo[j], hi[j])`` (``masks.q_block_range``, as the dK/dV kernels compute it)."""
  import numpy as np

  with jax.ensure_compile_time_eval():
    j = jnp.arange(s // bk, dtype=jnp.int32)
    lo, _, _, hi = masks.q_block_range(j * bk, bk, bq, spec, q_len, kv_len)
    return np.asarray(lo), np.asarray(hi)


def dq_contributors(spec: masks.MaskSpec, q_len: int, kv_len: int, t: int, s: int, bq, bk):
  """The key blocks that add into each query tile's dQ in the fused kernel.

  Returns numpy ``(first, count)`` over the ``t // bq`` query tiles: key block ``j``'s
  CTA visits query tile ``i`` (``masks.q_block_range``) exactly for ``j`` in
  ``[first[i], first[i] + count[i])``, and ``first``, ``first + count`` are the
  ``lo``, ``hi`` of ``masks.kv_block_range`` (what the ordered kernel computes for
  each tile). Raises NotImplementedError where a mask breaks this (none of the
  structural masks do; the check guards the ordered kernel from waiting forever).
  """
  import numpy as np

  q_lo, q_hi = query_tiles_of_key_blocks(spec, q_len, kv_len, s, bq, bk)
  with jax.ensure_compile_time_eval():
    i = jnp.arange(t // bq, dtype=jnp.int32)
    kv_lo, _, _, kv_hi = masks.kv_block_range(i * bq, bq, bk, spec, q_len, kv_len)
    kv_lo, kv_hi = np.asarray(kv_lo), np.asarray(kv_hi)
  i, j = np.arange(t // bq)[:, None], np.arange(s // bk)[None, :]
  visits = (q_lo[None, :] <= i) & (i < q_hi[None, :])
  expected = (kv_lo[:, None] <= j) & (j < kv_hi[:, None])
  if not np.array_equal(visits, expected):
    raise NotImplementedError(f"ordered dQ adds: the key blocks of a query tile differ for {spec}")
  return kv_lo, kv_hi - kv_lo


def fused_slab(bq: int, h: int, consumers: int):
  """Each consumer warpgroup's share of a query tile's dQ in the fused kernel.

  ``(row_step, rows, col_step, cols)``: warpgroup ``w`` computes rows
  ``[w·row_step, w·row_step + rows)`` and columns ``[w·col_step, w·col_step + cols)``
  of the ``bq × h`` tile; None when the blocks cannot be shared out in 64-row slabs.
  """
  if consumers == 1 and bq == ROWS:
    return 0, ROWS, 0, h
  if consumers == 2 and bq == 2 * ROWS:
    return ROWS, ROWS, 0, h  # one 64-row half of the query tile each
  if consumers == 2 and bq == ROWS and h == 128:
    return 0, ROWS, 64, 64  # one 64-column half each
  return None


def _dq_turn(kv_block, first, stop, down=False):
  """The ordered fused kernel's place for key block ``kv_block`` among the blocks
  ``[first, stop)`` that add into a query tile: ``(turn, last, more)``. It adds once
  ``turn`` adds are in (the blocks above it add first); ``last``: the lowest block, which
  adds last and takes the count back to zero; ``more``: others follow (signal them).
  ``down`` (Python bool or traced; ``_ordered_cta``): the blocks below add first."""
  above = stop - 1 - kv_block, kv_block == first, kv_block > first
  below = kv_block - first, kv_block == stop - 1, kv_block < stop - 1
  if isinstance(down, bool):
    return below if down else above
  return tuple(jnp.where(down, b, a) for a, b in zip(above, below, strict=True))


def _add_part(sem, copies, turn, last, more, ready=None) -> None:
  """Once ``turn`` adds of this part are counted in ``sem``, store (turn 0) or add the
  ``(source, target)`` pairs that ``copies()`` gives; the last adder takes the count
  back to zero. ``ready``: called between the wait and the copies (the slabs' barrier)."""
  wait = functools.partial(plgpu.semaphore_wait, sem, turn, memory_scope="gpu")
  pl.when((turn > 0) & more)(functools.partial(wait, decrement=False))
  pl.when((turn > 0) & last)(functools.partial(wait, decrement=True))
  if ready is not None:
    ready()

  def copy(op):
    for source, target in copies():
      plgpu.copy_smem_to_gmem(source, target, reduction_op=op)

  pl.when(turn == 0)(lambda: copy(None))
  pl.when(turn > 0)(lambda: copy("add"))


def _dq_parts(consumers: int, slab_rows: int, parts: int) -> tuple:
  """The parts of a query tile's dQ that the ordered kernel counts apart, each a tuple
  of ``(consumer slab, first row, rows)`` copies: ``parts`` 1, one part of every
  consumer's slab; ``consumers``, one per slab; twice that, two per slab (row halves)."""
  if parts == 1:
    return (tuple((c, 0, slab_rows) for c in range(consumers)),)
  per_slab, rest = divmod(parts, consumers)
  if rest or per_slab not in (1, 2) or slab_rows % (8 * per_slab):
    raise ValueError(f"ORDERED_DQ_PARTS={parts}: 1, {consumers} or {2 * consumers}")
  rows = slab_rows // per_slab
  return tuple(((c, u * rows, rows),) for c in range(consumers) for u in range(per_slab))


def _ordered_chunks(
  pairs: int, num_kv: int, causal: bool = False, head_dim: int | None = None
) -> tuple[int, int]:
  """``(chunk, group)`` of the ordered fused kernel's launch order (``_ordered_cta``):
  ``chunk`` key blocks of a (batch, kv head) pair start together, beside the same
  chunk of ``group`` - 1 other pairs. (num_kv, 1): the pairs one after the other,
  which is what causal calls and more than ``tuning.ORDERED_CHUNK_MAX_KV`` key
  blocks get (measured: see tuning.ORDERED_CHUNK), unless
  ``tuning.ORDERED_CHUNK_BY_HEAD_DIM`` has the head dim (non-causal, any key count; its
  first rule whose least key-block count ``num_kv`` reaches)."""
  chunk, wave, max_kv = tuning.ORDERED_CHUNK, tuning.ORDERED_WAVE, tuning.ORDERED_CHUNK_MAX_KV
  if not causal and head_dim in tuning.ORDERED_CHUNK_BY_HEAD_DIM:
    rules = tuning.ORDERED_CHUNK_BY_HEAD_DIM[head_dim]
    (chunk, wave), max_kv = next(cw for least, cw in rules if num_kv >= least), num_kv
  chunked = (
    chunk
    and (tuning.ORDERED_CHUNK_CAUSAL or not causal)
    and chunk < num_kv <= max_kv
    and num_kv % chunk == 0
  )
  if not chunked:
    return num_kv, 1
  group = max((d for d in range(1, wave // chunk + 1) if pairs % d == 0), default=1)
  return chunk, group


def _ordered_down_pairs(pairs: int, num_kv: int, causal: bool) -> int:
  """How many of the ordered kernel's last (batch, kv head) pairs run their heaviest
  key block first (``_ordered_cta``): enough for ``tuning.ORDERED_DOWN_BLOCKS`` key
  blocks, causal calls only."""
  if not (causal and tuning.ORDERED_DOWN_BLOCKS):
    return 0
  return min(pairs, -(-tuning.ORDERED_DOWN_BLOCKS // num_kv))


def _launch_index(batch_axis, head_axis, kv_axis, kv_heads, num_kv):
  """A fused-kernel CTA's place in launch order: its grid position (batch, kv head,
  key block) made linear, the key block fastest (``_ordered_cta`` maps it to the work
  the CTA does; the timeline indexes its stamps by it)."""
  return (batch_axis * kv_heads + head_axis) * num_kv + kv_axis


def _ordered_cta(batch_axis, head_axis, kv_axis, b, kv_heads, num_kv, causal=False, head_dim=None):
  """(batch, kv head, key block, down) of a CTA of the ordered fused kernel.

  Every (batch, kv head) pair's key blocks are launched from the last down, so a
  block only waits for blocks launched before it. They start ``chunk`` at a time
  (``_ordered_chunks``), chunk c of ``group`` pairs together, then chunk c + 1 of the
  same pairs: a block waits for the blocks above it at every query tile until they
  are a tile ahead, and the blocks that start together wait longest (a chain of
  adds), so chunks keep that chain short, while the pairs of a group share their
  Q, dO and dQ tiles in L2 across chunks.

  ``down`` (causal; the last ``_ordered_down_pairs`` pairs, else Python False): the
  pair's key blocks are launched from the first up, the heaviest first, so the grid
  does not end on a pair's heaviest blocks with SMs idle beside them. Its blocks add
  into each dQ tile from the lowest up (still only waiting for blocks launched
  before them) and visit the query tiles from the last down, so that a block and the
  block below it reach each tile after as many steps (visited upward, a block would
  reach each tile one step before the block it waits for).
  """
  pairs = b * kv_heads
  chunk, group = _ordered_chunks(pairs, num_kv, causal, head_dim)
  linear = _launch_index(batch_axis, head_axis, kv_axis, kv_heads, num_kv)
  in_chunk, linear = lax.rem(linear, chunk), lax.div(linear, chunk)
  in_group, linear = lax.rem(linear, group), lax.div(linear, group)
  chunk_index, group_index = lax.rem(linear, num_kv // chunk), lax.div(linear, num_kv // chunk)
  pair = group_index * group + in_group
  launched = chunk_index * chunk + in_chunk
  kv_block = num_kv - 1 - launched
  down = False
  if down_pairs := _ordered_down_pairs(pairs, num_kv, causal):
    down = pair >= pairs - down_pairs
    kv_block = jnp.where(down, launched, kv_block)
  return lax.div(pair, kv_heads), lax.rem(pair, kv_heads), kv_block, down


def _fused(
  q,
  k,
  v,
  do,
  lse2,
  delta,
  scale,
  spec,
  q_len,
  kv_len,
  blocks,
  p_in_registers,
  reduce,
  ordered,
  timeline=False,
):
  """dQ, dK and dV in one kernel: the dK/dV kernel that also adds each tile's dQ.

  A CTA owns ``blocks.dkv_kv`` key rows as in ``_dkv``. Once every consumer has
  written its ``dsᵀ`` rows of a query tile into ``ds_smem``, the tile's
  ``dQ = ds · K`` is shared out in slabs (``fused_slab``) and each warpgroup adds its
  slab into a float32 ``[B, T, N, H]`` buffer with a TMA reduce-add: 5 tile products
  per tile instead of the 7 of the two-kernel backward.

  ``timeline`` (on the GPU; benchmarks/timeline_probe.py): also return the
  stamps ``int32 [CTAs, steps, len(TIMELINE_EVENTS)]`` and each CTA's SM ``int32
  [CTAs]``, CTAs in launch order (``_ordered_cta`` maps them to key blocks).

  Float additions from different CTAs land in no fixed order, so without ``ordered``
  dQ may differ from run to run in its last bits. With ``ordered`` (deterministic)
  the key blocks add into each query tile in decreasing order: a global semaphore
  per (batch, query head, query tile) counts the adds done (or one per part of the
  tile, ``tuning.ORDERED_DQ_PARTS``; the counts ``tuning.ORDERED_SEM_STRIDE`` words
  apart, one per 128-byte line by default), and key block ``j`` adds
  when it reads ``stop - 1 - j`` (``[first, stop)``: the tile's key blocks,
  ``dq_contributors``), waits for its add to land, and counts it in; the lowest block
  of a tile takes the count back to zero for the next call. The highest block (turn 0)
  stores instead of adding, so the buffer is not zeroed first unless some query tile
  has no key block at all (a mask that hides whole tiles; its dQ must be zeros). The
  waiting is done by a writer warp of the producer warpgroup (``plgpu.warp_map``: warp
  0 fetches, warp 1 writes dQ), to which the consumers hand their slabs through a
  double-buffered tile, so they only wait if it falls two tiles behind; it polls for
  its turn at a tile before the slabs are in (``tuning.ORDERED_POLL_FIRST``). The
  key-block grid axis is launched from the last block down, so a block only waits for
  blocks launched before it. Query tiles are visited upward: with a causal mask block
  ``j`` starts at its diagonal, which no higher block sees, and reaches each later tile
  some steps after block ``j + 1`` did, so it need not wait (adding in increasing order
  instead makes every block wait for the whole chain below it before its first add).
  The price, with a causal mask: a pair's heaviest CTAs (its lowest key blocks) start
  last, so the grid would end on the last pair's heaviest blocks with SMs idle beside
  them: the last pairs (``tuning.ORDERED_DOWN_BLOCKS``) therefore run the other way
  round (``_ordered_cta``: heaviest first, adding from the lowest block up, tiles
  visited downward). Non-causal, blocks that start together still trail each other by
  one add; ``_ordered_cta`` shortens those chains.

  The Mosaic GPU interpreter has no TMA reductions (nor global semaphores): with
  ``reduce=False`` each CTA writes its partial dQ to a slice of its own
  (``[S / dkv_kv, B, T, N, H]``) and XLA sums them in a fixed order (fine for test
  shapes, not for long sequences).
  """
  b, t, n, h = q.shape
  s, kv_heads = k.shape[1:3]
  group = n // kv_heads
  bq, bk, stages = blocks.dkv_q, blocks.dkv_kv, blocks.bwd_stages
  consumers = bk // ROWS
  dtype = q.dtype
  edges = masks.edge_runs(spec, q_len, kv_len, t, s, over_queries=True)
  q_range = functools.partial(masks.q_block_range, spec=spec, q_len=q_len, kv_len=kv_len)
  kv_range = functools.partial(masks.kv_block_range, spec=spec, q_len=q_len, kv_len=kv_len)
  row_step, slab_rows, col_step, slab_cols = fused_slab(bq, h, consumers)
  static = (scale, spec, q_len, kv_len)
  semaphores = ordered and reduce
  if timeline and not reduce:
    raise ValueError("timeline: the fused kernel on the GPU only")
  steps = group * (t // bq)  # at most, per CTA
  # Ordered, each tile's first adder stores: the dQ buffer needs zeros only where a
  # tile has no key block to add into it.
  stores_every_tile = semaphores and dq_contributors(spec, q_len, kv_len, t, s, bq, bk)[1].all()
  dq_parts = _dq_parts(consumers, slab_rows, tuning.ORDERED_DQ_PARTS) if semaphores else ()
  sem_stride = tuning.ORDERED_SEM_STRIDE

  def kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref, dk_ref, dv_ref, *scratch):
    stamps_ref = sm_ref = None
    if timeline:
      stamps_ref, sm_ref, *scratch = scratch
    k_smem, v_smem, q_ring, do_ring, lse_ring, delta_ring, ds_smem, dq_smem = scratch[:8]
    if semaphores:
      *scratch, dq_full, dq_free = scratch
    p_smem = scratch[8:-6]
    kv_bar, q_bar, do_bar, consumed, ds_ready, done = scratch[-6:]
    wg = lax.axis_index("wg")
    batch, kv_head = lax.axis_index("batch"), lax.axis_index("heads")
    kv_block = lax.axis_index("kv")
    launch = _launch_index(batch, kv_head, kv_block, kv_heads, s // bk) if timeline else None

    def stamp(step, event):
      if timeline:
        _store_register(stamps_ref.at[launch, step, pl.ds(event, 1)], "globaltimer_lo")

    down = False
    if ordered:
      cta = (batch, kv_head, kv_block, b, kv_heads, s // bk, spec.causal, h)
      batch, kv_head, kv_block, down = _ordered_cta(*cta)
    k0 = kv_block * bk
    lo, _, _, hi = q_range(k0, bk, bq)
    num_q = hi - lo

    def produce():
      _produce_query_tiles(
        (q_ref, lse_ref, do_ref, delta_ref),
        (q_ring, lse_ring, do_ring, delta_ring),
        (q_bar, do_bar, consumed),
        batch,
        kv_head * group,
        group,
        lo,
        num_q,
        bq,
        stages,
        down,
      )

    def write_dq(counts):
      """The dQ writer (one warp of the producer warpgroup, ordered path): adds the
      consumers' slabs of each tile once it is this key block's turn (the first block
      of a tile, turn 0, stores them: the buffer need not start at zero). With a count
      per part of the tile (``dq_parts``), a part is added once the block above has
      added that part, so the next block's first part can go in while this block's
      later parts are still on their way."""

      def part_copies(buf, i, head, part):  # (slab in shared memory, its place in dQ)
        for c, r, rows in part:
          q_rows = pl.ds(i * bq + (c * row_step + r), rows)
          target = (batch, q_rows, head, pl.ds(c * col_step, slab_cols))
          yield dq_smem.at[buf, c, pl.ds(r, rows)], dq_ref.at[target]

      def step(st, carry):
        stamp(st, 0)
        g, i = _query_tile(st, lo, num_q, down)
        buf = lax.rem(st, 2)
        head = kv_head * group + g
        first, _, _, stop = kv_range(i * bq, bq, bk)
        turn, last, more = _dq_turn(kv_block, first, stop, down)
        tile = (batch * n + head) * (t // bq) + i
        sems = [counts.at[(tile * len(dq_parts) + p) * sem_stride] for p in range(len(dq_parts))]

        def slabs_in():
          stamp(st, 1)
          plgpu.barrier_wait(dq_full.at[buf])
          stamp(st, 2)

        poll_first = tuning.ORDERED_POLL_FIRST
        if not poll_first:
          slabs_in()
        for p, (sem, part) in enumerate(zip(sems, dq_parts, strict=True)):
          copies = functools.partial(part_copies, buf, i, head, part)
          _add_part(sem, copies, turn, last, more, slabs_in if poll_first and p == 0 else None)
        for p, sem in enumerate(sems):
          later = sum(len(part) for part in dq_parts[p + 1 :])
          plgpu.wait_smem_to_gmem(later)  # part p has landed in memory, not only been read
          if p == 0:
            stamp(st, 3)
          pl.when(more)(functools.partial(plgpu.semaphore_signal, sem, 1, memory_scope="gpu"))
        plgpu.barrier_arrive(dq_free.at[buf])
        stamp(st, 4)
        return carry

      lax.fori_loop(0, group * num_q, step, 0)

    @pl.when(wg == consumers)
    def _producer():
      _registers("producer")
      if timeline:
        _store_register(sm_ref.at[pl.ds(launch, 1)], "smid")
      if not semaphores:
        produce()
        return
      # One count of adds done per (batch, query head, query tile) or per part of
      # one, sem_stride words apart.
      counts = pl.get_global(
        plgpu.SemaphoreType.REGULAR((b * n * (t // bq) * len(dq_parts) * sem_stride,))
      )

      @plgpu.warp_map
      def _(warp):
        pl.when(warp == 0)(produce)
        pl.when(warp == 1)(functools.partial(write_dq, counts))

    @pl.when(wg < consumers)
    def _consumer():
      _registers("consumer")
      own = pl.ds(pl.multiple_of(wg * ROWS, ROWS), ROWS)
      r0 = k0 + wg * ROWS
      rows = (batch, pl.ds(r0, ROWS), kv_head)
      k_wg, v_wg = k_smem.at[own], v_smem.at[own]
      a_smem = p_smem[0].at[wg] if p_smem else None
      plgpu.copy_gmem_to_smem(k_ref.at[rows], k_wg, kv_bar.at[wg])
      plgpu.copy_gmem_to_smem(v_ref.at[rows], v_wg, kv_bar.at[wg])
      for c in range(consumers):  # the dQ products read every warpgroup's K rows
        plgpu.barrier_wait(kv_bar.at[c])
      # Every warpgroup visits the tiles its CTA sees (masked where any element of
      # the CTA's may be hidden): the dsᵀ hand-over needs all of them at each tile.
      ranges = _tile_ranges(q_range, k0, bk, k0, bq, wg_rows=bk)
      rings = (q_ring, do_ring, lse_ring, delta_ring)
      slab_q = pl.ds(pl.multiple_of(wg * row_step, ROWS), slab_rows)
      slab_h = pl.ds(pl.multiple_of(wg * col_step, 64), slab_cols)

      def consumer_stamp(visits, event):
        if timeline:
          pl.when(wg == 0)(lambda: stamp(visits, event))

      def visit(g, masked, i, carry):
        dk, dv, visits = carry
        consumer_stamp(visits, 5)
        slot = lax.rem(_step(g, i, lo, num_q, down), stages)
        buf = lax.rem(visits, 2)
        tile = (slot, rings, (q_bar, do_bar), k_wg, v_wg, dv, a_smem, masked, r0, i, static)
        dv, dst, q_tile = _dkv_tile(*tile)
        dst = dst.astype(dtype)
        ds_buf = ds_smem.at[buf]
        ds_buf.at[own][...] = dst
        plgpu.commit_smem()
        plgpu.barrier_arrive(ds_ready.at[buf])
        if a_smem is None:
          dk = _matmul_add(dk, dst, q_tile, None)
        else:  # dsᵀ is in shared memory already
          dk = dk + _matmul(ds_buf.at[own], q_tile, dk.shape)
        plgpu.barrier_arrive(consumed.at[slot])
        plgpu.barrier_wait(ds_ready.at[buf])  # every warpgroup's dsᵀ rows are in
        ds_q = ds_buf.at[:, slab_q].transpose((1, 0))  # [slab rows, bk]
        dq = _matmul(ds_q, k_smem.at[:, slab_h], (slab_rows, slab_cols))
        if semaphores:  # hand the slab to the writer warp (visits = its step)
          consumer_stamp(visits, 6)

          @pl.when(visits >= 2)
          def _():
            plgpu.barrier_wait(dq_free.at[buf])  # its add from two tiles ago is done

          consumer_stamp(visits, 7)
          dq_smem.at[buf, wg][...] = dq
          plgpu.commit_smem()
          plgpu.barrier_arrive(dq_full.at[buf])
          return dk, dv, visits + 1
        dq_wg = dq_smem.at[wg]
        consumer_stamp(visits, 6)
        plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the last add has read dq_wg
        consumer_stamp(visits, 7)
        dq_wg[...] = dq
        plgpu.commit_smem()
        q_rows = pl.ds(i * bq + wg * row_step, slab_rows)
        target = (batch, q_rows, kv_head * group + g, slab_h)
        if reduce:
          plgpu.copy_smem_to_gmem(dq_wg, dq_ref.at[target], reduction_op="add")
        else:
          plgpu.copy_smem_to_gmem(dq_wg, dq_ref.at[(kv_block, *target)])
        return dk, dv, visits + 1

      def skip(g, i, carry):
        _skip_tile((q_bar, do_bar), consumed, lax.rem(_step(g, i, lo, num_q, down), stages))
        return carry

      zeros = plgpu.layout_cast(jnp.zeros((ROWS, h), jnp.float32), plgpu.Layout.WGMMA)
      carry = (zeros, zeros, jnp.int32(0))
      dk, dv, _ = _sweep_group(group, ranges, visit, skip, carry, edges, down)
      plgpu.barrier_arrive(done)
      plgpu.barrier_wait(done)  # no warpgroup reads K for dQ any more
      k_wg[...] = (dk * scale).astype(k_wg.dtype)
      v_wg[...] = dv.astype(v_wg.dtype)
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(k_wg, dk_ref.at[rows])
      plgpu.copy_smem_to_gmem(v_wg, dv_ref.at[rows])
      plgpu.wait_smem_to_gmem(0)
      consumer_stamp(0, 8)

  scratch = [
    plgpu.SMEM((bk, h), k.dtype, transforms=_SWIZZLED),
    plgpu.SMEM((bk, h), v.dtype, transforms=_SWIZZLED),
    plgpu.SMEM((stages, bq, h), dtype, transforms=_SWIZZLED),
    plgpu.SMEM((stages, bq, h), dtype, transforms=_SWIZZLED),
    plgpu.SMEM((stages, bq), jnp.float32),
    plgpu.SMEM((stages, bq), jnp.float32),
    plgpu.SMEM((2, bk, bq), dtype, transforms=_SWIZZLED),  # dsᵀ, double buffered
    # dQ slabs: double buffered for the writer warp on the ordered path
    plgpu.SMEM(
      (2, consumers, slab_rows, slab_cols) if semaphores else (consumers, slab_rows, slab_cols),
      jnp.float32,
    ),
  ]
  if not p_in_registers:
    scratch.append(plgpu.SMEM((consumers, ROWS, bq), dtype, transforms=_SWIZZLED))
  scratch += [
    plgpu.Barrier(num_arrivals=2, num_barriers=consumers),  # K, V
    plgpu.Barrier(num_arrivals=2, num_barriers=stages),  # Q, lse
    plgpu.Barrier(num_arrivals=2, num_barriers=stages),  # dO, delta
    plgpu.Barrier(num_arrivals=consumers, num_barriers=stages),
    plgpu.Barrier(num_arrivals=consumers, num_barriers=2),  # dsᵀ written
    plgpu.Barrier(num_arrivals=consumers),  # done with K
  ]
  if semaphores:
    scratch += [
      plgpu.Barrier(num_arrivals=consumers, num_barriers=2),  # dQ slabs written
      plgpu.Barrier(num_arrivals=1, num_barriers=2),  # dQ slabs added (writer warp)
    ]
  acc_shape = (b, t, n, h) if reduce else (s // bk, b, t, n, h)
  grid = (b, kv_heads, s // bk)
  name = "attention_fused_ordered" if semaphores else "attention_fused"
  ctas = b * kv_heads * (s // bk)
  extra = ()
  if timeline:
    extra = (
      jax.ShapeDtypeStruct((ctas, steps, len(TIMELINE_EVENTS)), jnp.int32),
      jax.ShapeDtypeStruct((ctas,), jnp.int32),
    )
  names = ("batch", "heads", "kv")
  if stores_every_tile:
    dq_type = jax.ShapeDtypeStruct(acc_shape, jnp.float32)
    call = _call(kernel, (dq_type, k, v, *extra), scratch, grid, names, consumers, name)
    dq, dk, dv, *stamps = call(q, k, v, do, lse2, delta)
  else:
    dq_acc = jax.new_ref(jnp.zeros(acc_shape, jnp.float32))
    call = _call(kernel, (k, v, *extra), scratch, grid, names, consumers, name)
    dk, dv, *stamps = call(q, k, v, do, lse2, delta, dq_acc)
    dq = dq_acc[...]
  if not reduce:
    dq = dq.sum(axis=0)
  return ((dq * scale).astype(dtype), dk, dv, *stamps)


def _dkv_split(q, k, v, do, lse2, delta, scale, spec, q_len, kv_len, blocks, p_in_registers):
  """dK/dV for wide heads (head dim > 128): two consumers split the work on 64 key rows.

  One 64-row warpgroup holding both the dK and the dV accumulator of a 256-wide head
  needs 256 float32 registers per thread for them alone; it spilled and ran at a
  quarter of the tensor cores' rate. Here warpgroup 0 computes ``sᵀ = K·Qᵀ`` and
  ``pᵀ``, hands ``pᵀ`` to warpgroup 1 through shared memory and accumulates
  ``dV += pᵀ·dO``; warpgroup 1 computes ``dpᵀ = V·dOᵀ``, ``dsᵀ`` from the shared
  ``pᵀ`` and accumulates ``dK += dsᵀ·Q``. Each does two products per tile and keeps
  one accumulator. ``p_ready`` / ``p_free`` (one arrival each) pass the ``pᵀ`` buffer
  back and forth; warpgroup 1 releases it once before the loop, so the handshake has
  as many waits as arrivals.
  """
  b, t, n, h = q.shape
  s, kv_heads = k.shape[1:3]
  group = n // kv_heads
  bq, stages = blocks.dkv_q, blocks.bwd_stages
  dtype = q.dtype
  edges = masks.edge_runs(spec, q_len, kv_len, t, s, over_queries=True)
  q_range = functools.partial(masks.q_block_range, spec=spec, q_len=q_len, kv_len=kv_len)
  consumers = 2

  def kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref, *scratch):
    k_smem, v_smem, q_ring, do_ring, lse_ring, delta_ring, pt_smem, *ds_smem = scratch[:-7]
    kv_bar, q_bar, do_bar, consumed, p_ready, p_free, done = scratch[-7:]
    wg = lax.axis_index("wg")
    batch, kv_head = lax.axis_index("batch"), lax.axis_index("heads")
    k0 = lax.axis_index("kv") * ROWS
    lo, _, _, hi = q_range(k0, ROWS, bq)
    num_q = hi - lo
    rows = (batch, pl.ds(k0, ROWS), kv_head)

    @pl.when(wg == consumers)
    def _producer():
      _registers("producer")

      _produce_query_tiles(
        (q_ref, lse_ref, do_ref, delta_ref),
        (q_ring, lse_ring, do_ring, delta_ring),
        (q_bar, do_bar, consumed),
        batch,
        kv_head * group,
        group,
        lo,
        num_q,
        bq,
        stages,
      )

    @pl.when(wg < consumers)
    def _consumer():
      _registers("consumer")

      @pl.when(wg == 0)
      def _load_kv():
        plgpu.copy_gmem_to_smem(k_ref.at[rows], k_smem, kv_bar.at[0])
        plgpu.copy_gmem_to_smem(v_ref.at[rows], v_smem, kv_bar.at[0])

      plgpu.barrier_wait(kv_bar.at[0])
      ranges = _tile_ranges(q_range, k0, ROWS, k0, bq)
      vec_layout = plgpu.Layout.WGMMA.reduce(0)  # one value per column of sᵀ
      zeros = plgpu.layout_cast(jnp.zeros((ROWS, h), jnp.float32), plgpu.Layout.WGMMA)

      def slot_of(g, i):
        return lax.rem(_step(g, i, lo, num_q), stages)

      def skip(g, i, carry):
        _skip_tile((q_bar, do_bar), consumed, slot_of(g, i))
        return carry

      def sweep(visit, carry):
        return _sweep_group(group, ranges, visit, skip, carry, edges)

      @pl.when(wg == 0)
      def _values():
        def visit(g, masked, i, dv):
          slot = slot_of(g, i)
          plgpu.barrier_wait(q_bar.at[slot])
          st = _matmul(k_smem, q_ring.at[slot].transpose((1, 0)), (ROWS, bq))
          st = st * (scale * tiles.LOG2E)
          lse = plgpu.load(lse_ring.at[slot], (), layout=vec_layout)
          pt = jnp.exp2(st - _broadcast(lse, st.shape, 1))
          pt = _masked(masked, pt, k0, i, True, spec, q_len, kv_len)
          plgpu.barrier_wait(p_free.at[0])
          pt_smem[...] = pt.astype(dtype)
          plgpu.commit_smem()
          plgpu.barrier_arrive(p_ready.at[0])
          plgpu.barrier_wait(do_bar.at[slot])
          dv = _matmul_add_smem(dv, pt_smem, do_ring.at[slot], p_in_registers)
          plgpu.barrier_arrive(consumed.at[slot])
          return dv

        dv = sweep(visit, zeros)
        plgpu.barrier_wait(p_free.at[0])  # warpgroup 1's last release
        plgpu.barrier_arrive(done)
        plgpu.barrier_wait(done)  # warpgroup 1 no longer reads V
        v_smem[...] = dv.astype(v_smem.dtype)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(v_smem, dv_ref.at[rows])
        plgpu.wait_smem_to_gmem(0)

      @pl.when(wg == 1)
      def _keys():
        a_smem = ds_smem[0] if ds_smem else None
        plgpu.barrier_arrive(p_free.at[0])  # the buffer starts free

        def visit(g, masked, i, dk):
          del masked  # pᵀ arrives masked
          slot = slot_of(g, i)
          plgpu.barrier_wait(do_bar.at[slot])
          dpt = _matmul(v_smem, do_ring.at[slot].transpose((1, 0)), (ROWS, bq))
          plgpu.barrier_wait(p_ready.at[0])
          pt = plgpu.load(pt_smem, (), layout=plgpu.Layout.WGMMA).astype(jnp.float32)
          plgpu.barrier_arrive(p_free.at[0])
          delta = plgpu.load(delta_ring.at[slot], (), layout=vec_layout)
          dst = pt * (dpt - _broadcast(delta, dpt.shape, 1))
          plgpu.barrier_wait(q_bar.at[slot])
          dk = _matmul_add(dk, dst.astype(dtype), q_ring.at[slot], a_smem)
          plgpu.barrier_arrive(consumed.at[slot])
          return dk

        dk = sweep(visit, zeros)
        plgpu.barrier_arrive(done)
        plgpu.barrier_wait(done)  # warpgroup 0 no longer reads K
        k_smem[...] = (dk * scale).astype(k_smem.dtype)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(k_smem, dk_ref.at[rows])
        plgpu.wait_smem_to_gmem(0)

  scratch = [
    plgpu.SMEM((ROWS, h), k.dtype, transforms=_SWIZZLED),
    plgpu.SMEM((ROWS, h), v.dtype, transforms=_SWIZZLED),
    plgpu.SMEM((stages, bq, h), dtype, transforms=_SWIZZLED),
    plgpu.SMEM((stages, bq, h), dtype, transforms=_SWIZZLED),
    plgpu.SMEM((stages, bq), jnp.float32),
    plgpu.SMEM((stages, bq), jnp.float32),
    plgpu.SMEM((ROWS, bq), dtype, transforms=_SWIZZLED),  # pᵀ, from warpgroup 0 to 1
  ]
  if not p_in_registers:
    scratch.append(plgpu.SMEM((ROWS, bq), dtype, transforms=_SWIZZLED))
  scratch += [
    plgpu.Barrier(num_arrivals=2, num_barriers=1),  # K, V
    plgpu.Barrier(num_arrivals=2, num_barriers=stages),  # Q, lse
    plgpu.Barrier(num_arrivals=2, num_barriers=stages),  # dO, delta
    plgpu.Barrier(num_arrivals=consumers, num_barriers=stages),
    plgpu.Barrier(num_arrivals=1, num_barriers=1),  # pᵀ written
    plgpu.Barrier(num_arrivals=1, num_barriers=1),  # pᵀ read
    plgpu.Barrier(num_arrivals=consumers),  # both done with K and V
  ]
  grid = (b, kv_heads, s // ROWS)
  call = _call(kernel, (k, v), scratch, grid, ("batch", "heads", "kv"), 2, "attention_dkv_split")
  return call(q, k, v, do, lse2, delta)


def _matmul_add_smem(acc, a_smem, b, on_gpu: bool):
  """``acc + a @ b`` with both operands in shared memory."""
  if on_gpu:

    def issue(acc_ref):
      plgpu.wgmma(acc_ref, a_smem, b)

    return pl.run_state(issue)(plgpu.ACC.init(acc))
  return acc + _matmul(a_smem, b, acc.shape)


def _dq(q, k, v, do, lse2, delta, scale, spec, q_len, kv_len, blocks, p_in_registers):
  b, t, n, h = q.shape
  s, kv_heads = k.shape[1:3]
  group = n // kv_heads
  bq, bk, stages = blocks.dq_q, blocks.dq_kv, blocks.bwd_stages
  consumers = bq // ROWS
  dtype = q.dtype
  edges = masks.edge_runs(spec, q_len, kv_len, t, s, over_queries=False)
  kv_range = functools.partial(masks.kv_block_range, spec=spec, q_len=q_len, kv_len=kv_len)

  def kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref, *scratch):
    q_smem, do_smem, lse_smem, delta_smem, k_ring, v_ring, *ds_smem = scratch[:-4]
    own_bar, k_bar, v_bar, consumed = scratch[-4:]
    wg = lax.axis_index("wg")
    batch, head = lax.axis_index("batch"), lax.axis_index("heads")
    kv_head = lax.div(head, group)
    # The last query tile first: with a causal mask it sees the most key tiles, and
    # CTAs that start last should be the short ones (as in the forward).
    q0 = (t // bq - 1 - lax.axis_index("q")) * bq
    lo, _, _, hi = kv_range(q0, bq, bk)

    @pl.when(wg == consumers)
    def _producer():
      _registers("producer")

      def fetch(step, slot):
        cols = (batch, pl.ds((lo + step) * bk, bk), kv_head)
        plgpu.copy_gmem_to_smem(k_ref.at[cols], k_ring.at[slot], k_bar.at[slot])
        plgpu.copy_gmem_to_smem(v_ref.at[cols], v_ring.at[slot], v_bar.at[slot])

      _produce(hi - lo, stages, fetch, consumed)

    @pl.when(wg < consumers)
    def _consumer():
      _registers("consumer")
      r0 = q0 + wg * ROWS
      rows, vec = (batch, pl.ds(r0, ROWS), head), (batch, head, pl.ds(r0, ROWS))
      q_wg, do_wg = q_smem.at[wg], do_smem.at[wg]
      a_smem = ds_smem[0].at[wg] if ds_smem else None
      plgpu.copy_gmem_to_smem(q_ref.at[rows], q_wg, own_bar.at[wg])
      plgpu.copy_gmem_to_smem(do_ref.at[rows], do_wg, own_bar.at[wg])
      plgpu.copy_gmem_to_smem(lse_ref.at[vec], lse_smem.at[wg], own_bar.at[wg])
      plgpu.copy_gmem_to_smem(delta_ref.at[vec], delta_smem.at[wg], own_bar.at[wg])
      plgpu.barrier_wait(own_bar.at[wg])
      ranges = _tile_ranges(kv_range, q0, bq, r0, bk)
      vec_layout = plgpu.Layout.WGMMA.reduce(1)  # one value per row of s
      lse = plgpu.load(lse_smem.at[wg], layout=vec_layout)
      delta = plgpu.load(delta_smem.at[wg], layout=vec_layout)

      def visit(masked, i, dq):
        slot = lax.rem(i - lo, stages)
        plgpu.barrier_wait(k_bar.at[slot])
        k_tile = k_ring.at[slot]
        sc = _matmul(q_wg, k_tile.transpose((1, 0)), (ROWS, bk)) * (scale * tiles.LOG2E)
        p = jnp.exp2(sc - _broadcast(lse, sc.shape, 0))
        p = _masked(masked, p, r0, i, False, spec, q_len, kv_len)
        plgpu.barrier_wait(v_bar.at[slot])
        dp = _matmul(do_wg, v_ring.at[slot].transpose((1, 0)), (ROWS, bk))
        ds = p * (dp - _broadcast(delta, dp.shape, 0))
        dq = _matmul_add(dq, ds.astype(dtype), k_tile, a_smem)
        plgpu.barrier_arrive(consumed.at[slot])
        return dq

      def skip(i, dq):
        _skip_tile((k_bar, v_bar), consumed, lax.rem(i - lo, stages))
        return dq

      zeros = plgpu.layout_cast(jnp.zeros((ROWS, h), jnp.float32), plgpu.Layout.WGMMA)
      dq = _sweep(ranges, visit, skip, zeros, edges)
      q_wg[...] = (dq * scale).astype(dtype)
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(q_wg, dq_ref.at[rows])
      plgpu.wait_smem_to_gmem(0)

  scratch = [
    plgpu.SMEM((consumers, ROWS, h), dtype, transforms=_SWIZZLED),
    plgpu.SMEM((consumers, ROWS, h), dtype, transforms=_SWIZZLED),
    plgpu.SMEM((consumers, ROWS), jnp.float32),
    plgpu.SMEM((consumers, ROWS), jnp.float32),
    plgpu.SMEM((stages, bk, h), k.dtype, transforms=_SWIZZLED),
    plgpu.SMEM((stages, bk, h), v.dtype, transforms=_SWIZZLED),
  ]
  if not p_in_registers:
    scratch.append(plgpu.SMEM((consumers, ROWS, bk), dtype, transforms=_SWIZZLED))
  scratch += [
    plgpu.Barrier(num_arrivals=4, num_barriers=consumers),  # Q, dO, lse, delta
    plgpu.Barrier(num_barriers=stages),  # K
    plgpu.Barrier(num_barriers=stages),  # V
    plgpu.Barrier(num_arrivals=consumers, num_barriers=stages),
  ]
  grid = (b, n, t // bq)
  call = _call(kernel, q, scratch, grid, ("batch", "heads", "q"), consumers, "attention_dq")
  return call(q, k, v, do, lse2, delta)


def backward(
  q,
  k,
  v,
  do,
  lse2,
  delta,
  *,
  scale: float,
  spec: masks.MaskSpec,
  q_len: int,
  kv_len: int,
  blocks: tuning.MosaicBlocks,
  p_in_registers: bool | None = None,
  deterministic: bool = True,
):
  """dq [B,T,N,H], dk, dv [B,S,K,H] in q/k/v dtypes.

  Inputs are padded: ``q``, ``do`` ``[B, T, N, H]``; ``k``, ``v`` ``[B, S, K, H]``;
  ``lse2`` ``[B, N, T]`` the base-2 log-sum-exp (``+inf`` for rows that see
  nothing) and ``delta`` ``[B, N, T]`` = rowsum(do ⊙ out) − dlse, both float32.
  Rows ``>= q_len`` and columns ``>= kv_len`` are masked. ``p_in_registers``:
  feed ``pᵀ``, ``dsᵀ`` and ``ds`` to wgmma from registers (default: off the CPU
  interpreter, which cannot). ``deterministic``: the fused kernel
  (``blocks.bwd_fused``) adds dQ in a fixed order (the two-kernel backward always
  does).
  """
  interpret = jax.default_backend() == "cpu"
  if p_in_registers is None:
    p_in_registers = not interpret
  static = dict(scale=scale, spec=spec, q_len=q_len, kv_len=kv_len, blocks=blocks)
  choices = dict(p_in_registers=p_in_registers, interpret=interpret, deterministic=deterministic)
  return kernels(q, k, v, do, lse2, delta, **static, **choices)


def kernels(
  q,
  k,
  v,
  do,
  lse2,
  delta,
  *,
  scale,
  spec,
  q_len,
  kv_len,
  blocks,
  p_in_registers,
  interpret,
  deterministic=True,
):
  """backward with every choice explicit; ``interpret``: in the Mosaic GPU interpreter.

  With ``interpret=False`` it also traces and lowers for CUDA on a machine without a
  GPU (``jit(...).trace(...).lower(lowering_platforms=("cuda",))``), which checks the
  register path as far as Mosaic GPU's lowering goes (layouts, shared memory size).
  """
  check(q, k, blocks)
  lse2, delta = lse2.astype(jnp.float32), delta.astype(jnp.float32)
  args = (q, k, v, do, lse2, delta, scale, spec, q_len, kv_len, blocks, p_in_registers)
  with plgpu.force_gpu_interpret_mode() if interpret else contextlib.nullcontext():
    if blocks.bwd_fused:
      return _fused(*args, reduce=not interpret, ordered=deterministic)
    dk, dv = (_dkv_split if blocks.dkv_split else _dkv)(*args)
    dq = _dq(*args)
  return dq, dk, dv


backward_jit = jax.jit(
  backward,
  static_argnames=(
    "scale",
    "spec",
    "q_len",
    "kv_len",
    "blocks",
    "p_in_registers",
    "deterministic",
  ),
)

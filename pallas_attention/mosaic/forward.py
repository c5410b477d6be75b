"""FlashAttention forward for Hopper in Pallas Mosaic GPU, warp-specialised.

One CTA owns 128 query rows of one head and runs three warpgroups:

- a producer (warpgroup 2) that copies key/value tiles by TMA into a
  ``stages``-deep shared-memory ring, refilling a slot once both consumers have
  released it (one "consumed" barrier per slot, two arrivals);
- two consumers (warpgroups 0 and 1), 64 query rows each, that run both matrix
  products on ``wgmma`` and the online softmax in registers. Schedule barriers
  make them take turns issuing products, so one warpgroup's softmax runs while
  the other's products do (FlashAttention-3's ping-pong).

Two consumer loops (``pipelined``, chosen by head dim and key length in tuning.py):

- serial: per key tile, Q·Kᵀ, softmax, P·V, one after the other;
- pipelined: per key tile n, Q·K(n)ᵀ and P(n-1)·V(n-1) are issued together,
  the softmax of tile n runs while P·V is on the tensor cores, and the output is
  rescaled once it has landed (FlashAttention-3's intra-warpgroup overlap). P
  is converted to the P·V operand only after that wait: defining a ``wgmma``
  operand register while one is in flight makes ptxas serialize all of the
  kernel's ``wgmma`` instructions (its info C7513).

Which key tiles a CTA visits and which of them need an element-wise mask come
from masks.kv_block_range; the mask itself is masks.visible on register tiles.
The lengths are static here (the wrapper falls back to another implementation
when the caller gives per-batch lengths); padded rows and columns are masked by
them. Query tiles run last-first, so under a causal mask the longest CTAs start
first. With ``tiles_per_cta`` > 1 a CTA runs several query tiles of its head in turn
(short sequences): the producer loads the next one's Q into a second buffer and its
key/value tiles on through the same ring while the consumers finish the current one.
With ``kv_split`` (long non-causal calls, planned by tuning.forward_kv_split) the grid's
last, part-empty wave becomes short CTAs: the first query tiles of every head run as
several CTAs over parts of the keys, after every whole tile, and their float32 outputs
are merged by LSE after the kernel (merge_parts).

``p_in_registers``: on the GPU, P stays in registers as the left operand of the
P·V ``wgmma``. The Mosaic GPU interpreter (CPU) does not take a register
operand, so there P goes through shared memory and the product is added to the
running output in registers (the interpreter runs no ``pl.run_state`` with
accumulators either, so its pipelined loop issues the same products in separate
scopes). Both paths share everything else.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_attention import masks, tiles

ROWS = 64  # query rows per consumer warpgroup (one wgmma M)
CONSUMERS = 2
CTA_ROWS = ROWS * CONSUMERS
_SWIZZLED = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))
SMEM_BYTES = 227 * 1024  # a Hopper CTA's shared memory
MAX_TILES_PER_CTA = 4
# A kv_split part's float32 output goes out this many columns at a time (head dim 256:
# half as many, to fit beside its key/value ring).
STAGE_COLS = {64: 64, 128: 64, 256: 32}
SMEM_SLACK = 4096  # barriers, the LSE rows and alignment, beside the tiles


def interpreting() -> bool:
  return jax.default_backend() == "cpu"


def call(kernel_call, *args, interpret: bool):
  """Run a ``plgpu.kernel`` compiled, or in the Mosaic GPU interpreter."""
  if interpret:
    with plgpu.force_gpu_interpret_mode():
      return kernel_call(*args)
  return kernel_call(*args)


# (ranges per warpgroup, directory): set by benchmarks to record the kernels'
# jax.named_scope regions with Mosaic GPU's profiler (a Chrome trace per call).
PROFILE: tuple[int, str] | None = None


def compiler_params(interpret: bool):
  if interpret:
    return None
  if PROFILE is not None:
    space, path = PROFILE
    return plgpu.CompilerParams(
      approx_math=True, profile_space=space, profile_dir=path, profile_bounds_check=True
    )
  return plgpu.CompilerParams(approx_math=True)


def _key_runs(lo, full_lo, full_hi, hi, edges, step, carry):
  """``step(j, carry, masked)`` over key tiles ``[lo, hi)`` in order, one loop per run:
  masked on ``[lo, full_lo)`` and ``[full_hi, hi)``, unmasked between. A run that
  ``edges`` (``masks.edge_runs``' lead, trail) says cannot occur gets no loop, and its
  bound (``full_lo`` or ``full_hi``) is not read."""
  lead, trail = edges
  plain_lo, plain_hi = full_lo if lead else lo, full_hi if trail else hi
  if lead:
    carry = lax.fori_loop(lo, plain_lo, lambda j, c: step(j, c, True), carry)
  carry = lax.fori_loop(plain_lo, plain_hi, lambda j, c: step(j, c, False), carry)
  if trail:
    carry = lax.fori_loop(plain_hi, hi, lambda j, c: step(j, c, True), carry)
  return carry


def forward(
  q,
  k,
  v,
  *,
  scale: float,
  spec: masks.MaskSpec,
  q_len: int,
  kv_len: int,
  block_kv: int = 128,
  stages: int = 2,
  schedule: bool = True,
  pipelined: bool = False,
  p_in_registers: bool | None = None,
  head_pairs: bool = False,
  tiles_per_cta: int = 1,
  kv_split: tuple[int, int] | None = None,
  interpret: bool | None = None,
):
  """``out [B, T, N, H]`` and base-2 LSE ``[B, N, T]`` (f32, -inf for empty rows).

  ``T`` must be a multiple of 128, ``S`` of ``block_kv``, ``H`` one of 64, 128,
  256; bf16 or f16. Rows ``>= q_len`` and columns ``>= kv_len`` are masked.

  ``head_pairs`` (GQA with an even number of query heads per key/value head): a CTA
  owns 64 rows of two query heads that share a key/value head, one per consumer
  warpgroup, so each key/value tile loaded serves both. Off by default: correct (the
  GPU tests), but 0.95-1.06x the plain forward on an H100 with no direction, since
  CTAs resident together already share one head's tiles in L2 (benchmarks/RESULTS.md).

  ``pipelined``: each consumer issues tile n's Q·Kᵀ and tile n-1's P·V together
  and runs tile n's softmax while P·V is on the tensor cores (FlashAttention-3's
  intra-warpgroup overlap, on top of the two warpgroups' ping-pong); the output
  is rescaled once that product has landed. Off: one tile at a time.

  ``tiles_per_cta``: query tiles (of 128 rows) each CTA runs one after the other, so that
  the next tile's Q and first key/value tiles load while the current one computes and
  its output is stored (short sequences, where a CTA's loads and stores are much of its
  time). A head's tiles go out in the order last, first, second-last, second, ..., so
  that under a causal mask two consecutive tiles have equal work. The largest divisor
  of the number of query tiles that is at most ``tiles_per_cta`` is taken; 1 with
  ``head_pairs``. At most MAX_TILES_PER_CTA: each tile's code is traced on its own, and
  the kernel's code grows with their number (on an H100, 8 tiles ran at half the speed
  of 4, and 4 tiles of the pipelined loop 23% under 2; benchmarks/RESULTS.md).

  ``kv_split`` ``(tail, parts)`` (one query tile a CTA, no head pairs): the first
  ``tail`` query tiles of every (batch, head) run as ``parts`` CTAs each, over a
  ``parts``-th of the key tiles, launched after every whole tile, so that the grid's
  last wave is short CTAs instead of a part-empty wave of long ones (``plan_kv_split``).
  Their outputs are normalised per part and kept in float32, then merged by their LSE
  after the kernel (``merge_parts``).

  ``interpret``: run in the Mosaic GPU interpreter (default: on a CPU backend).
  False on a CPU still traces and lowers for CUDA (``lowering_platforms=("cuda",)``).
  """
  b, t, n, h = q.shape
  s, kv_heads = k.shape[1], k.shape[2]
  if t % CTA_ROWS or s % block_kv or h not in (64, 128, 256):
    raise ValueError(f"mosaic forward: T={t} % {CTA_ROWS}, S={s} % {block_kv}, H={h}")
  groups = n // kv_heads
  if head_pairs and groups % 2:
    raise ValueError(f"mosaic forward: head_pairs needs an even GQA group, not {groups}")
  if not 1 <= tiles_per_cta <= MAX_TILES_PER_CTA:
    raise ValueError(f"mosaic forward: tiles_per_cta={tiles_per_cta}, not 1..{MAX_TILES_PER_CTA}")
  cta_rows = ROWS if head_pairs else CTA_ROWS
  num_q_tiles = t // cta_rows
  items = 1 if head_pairs else max(d for d in range(1, tiles_per_cta + 1) if num_q_tiles % d == 0)
  dtype = q.dtype
  if interpret is None:
    interpret = interpreting()
  if p_in_registers is None:
    p_in_registers = not interpret
  num_kv_tiles = s // block_kv
  tail, parts = kv_split or (0, 1)  # without a split: every query tile whole
  if kv_split is not None:
    fits = kv_split_fits(h, block_kv, stages, dtype.itemsize, p_in_registers)
    if not fits and not interpret:  # the interpreter has room
      raise ValueError(
        f"mosaic forward: kv_split at head dim {h} with {stages} stages of {block_kv} key "
        f"rows does not fit in shared memory ({SMEM_BYTES} bytes)"
      )
    if items != 1 or tiles_per_cta != 1 or head_pairs:
      raise ValueError("mosaic forward: kv_split needs one query tile a CTA and no head pairs")
    if not (1 <= tail < num_q_tiles and 2 <= parts <= num_kv_tiles):
      raise ValueError(
        f"mosaic forward: kv_split={kv_split} with {num_q_tiles} query and {num_kv_tiles} "
        "key tiles (1 <= tail < query tiles, 2 <= parts <= key tiles)"
      )
  if items > 1:  # the second Q buffer must fit beside the key/value ring
    smem = _tile_smem(h, block_kv, stages, dtype.itemsize, p_in_registers, q_buffers=2)
    if smem > SMEM_BYTES:
      raise ValueError(
        f"mosaic forward: {items} query tiles a CTA at head dim {h} with {stages} stages of "
        f"{block_kv} key rows need {smem} bytes of shared memory (over {SMEM_BYTES})"
      )
  log2_scale = scale * tiles.LOG2E
  # Masked loops are compiled only for the runs of partly visible key tiles that the
  # mask can produce (before or after the fully visible ones); non-causal: one loop.
  lead, trail = masks.edge_runs(spec, q_len, kv_len, t, s, over_queries=False)

  whole_per_pair = num_q_tiles - tail

  def kernel(q_ref, k_ref, v_ref, o_ref, lse_ref, *scratch):
    if kv_split:
      o_parts_ref, lse_parts_ref, *scratch = scratch
    qo_smem, k_smem, v_smem, lse_smem, q_bars, k_bars, v_bars, k_free, v_free, turn = scratch[:10]
    # turn: the serial schedule's two-arrival barrier; pipelined, one one-arrival
    # barrier per consumer ("your turn to issue products").
    p_smem = None if p_in_registers else scratch[10]
    stage_smem = scratch[-1] if kv_split else None  # a part's float32 output
    # Several query tiles a CTA: the second Q buffer, and "Q buffer b is free again"
    # (both consumers' O stored from it).
    q_second, q_free = scratch[-2:] if items > 1 else (None, None)
    wg = lax.axis_index("wg")
    part = is_part = None
    if kv_split:
      # A flat grid: every whole query tile (a head's tiles side by side, last first),
      # then the parts of the first ``tail`` tiles (per head: part-major).
      cta = lax.axis_index("cta")
      whole = b * n * whole_per_pair
      is_part = cta >= whole
      rel = jnp.where(is_part, cta - whole, cta)
      per_pair = jnp.where(is_part, tail * parts, whole_per_pair)
      pair, rem = lax.div(rel, per_pair), lax.rem(rel, per_pair)
      part = lax.div(rem, jnp.array(tail, rem.dtype))
      in_tail = lax.rem(rem, jnp.array(tail, rem.dtype))
      split_row = jnp.where(is_part, in_tail, num_q_tiles - 1 - rem) * cta_rows
      batch, head = lax.div(pair, jnp.array(n, pair.dtype)), lax.rem(pair, jnp.array(n, pair.dtype))
    else:
      batch, head = lax.axis_index("batch"), lax.axis_index("heads")
    if head_pairs:  # grid axis "heads" counts pairs; warpgroup w takes head 2·pair + w
      head = 2 * head
    kv_head = lax.div(head, jnp.array(groups, head.dtype))
    if head_pairs:
      head = head + jnp.minimum(wg, CONSUMERS - 1)

    def kv_range(r):
      """The first row of the CTA's r-th query tile, and the key tiles it visits."""
      if kv_split:
        start = split_row
      elif items == 1:  # last-first: under a causal mask the longest CTAs start first
        start = (num_q_tiles - 1 - lax.axis_index("q")) * cta_rows
      else:  # a head's tiles ordered last, first, second-last, second, ...
        pos = lax.axis_index("q") * items + r
        half = lax.div(pos, jnp.array(2, pos.dtype))
        even = lax.rem(pos, jnp.array(2, pos.dtype)) == 0
        start = jnp.where(even, num_q_tiles - 1 - half, half) * cta_rows
      lo, _, _, hi = masks.kv_block_range(start, cta_rows, block_kv, spec, q_len, kv_len)
      if kv_split:  # a part: its share of the key tiles (the consumers clip to it)
        count = jnp.array(parts, part.dtype)
        part_lo = jnp.where(is_part, lax.div(part * num_kv_tiles, count), 0)
        part_hi = jnp.where(is_part, lax.div((part + 1) * num_kv_tiles, count), num_kv_tiles)
        lo = jnp.maximum(lo, part_lo)
        hi = jnp.maximum(jnp.minimum(hi, part_hi), lo)
      return start, lo, hi

    def q_tile(buf, w):  # consumer w's Q (then O) buffer
      # Two allocations rather than one indexed by buf: a constant index captured by the
      # pipelined loop's pl.run_state does not lower (Mosaic GPU, jax 0.11.2).
      return (q_second if buf else qo_smem).at[w]

    def q_bar(buf, w):
      return q_bars.at[buf * CONSUMERS + w] if buf else q_bars.at[w]

    # One query tile a CTA: its range once, for both warpgroup roles.
    tile0 = kv_range(0) if items == 1 else None
    steps0 = tile0[2] - tile0[1] if items == 1 else None

    def take_turn():
      if schedule:
        plgpu.barrier_arrive(turn)
        plgpu.barrier_wait(turn)

    def produce(r, done):
      """Copy the r-th query tile (several a CTA) and its key/value tiles; ``done``:
      key tiles fetched before it (a traced count after the first tile)."""
      start, lo, hi = tile0 if items == 1 else kv_range(r)
      num_steps = steps0 if items == 1 else hi - lo
      if items > 1:
        buf = r % 2
        if r >= 2:
          plgpu.barrier_wait(q_free.at[buf])
        for w in range(CONSUMERS):
          rows = pl.ds(start + w * ROWS, ROWS)
          plgpu.copy_gmem_to_smem(q_ref.at[batch, rows, head], q_tile(buf, w), q_bar(buf, w))

      def fetch(step, slot):
        cols = (batch, pl.ds((lo + step) * block_kv, block_kv), kv_head)
        plgpu.copy_gmem_to_smem(k_ref.at[cols], k_smem.at[slot], k_bars.at[slot])
        plgpu.copy_gmem_to_smem(v_ref.at[cols], v_smem.at[slot], v_bars.at[slot])

      if r == 0:
        with jax.named_scope("p_fill"):
          for slot in range(stages):
            pl.when(slot < num_steps)(lambda slot=slot: fetch(slot, slot))

        def refill(step, carry):
          slot = lax.rem(step, jnp.array(stages, step.dtype))
          cols = (batch, pl.ds((lo + step) * block_kv, block_kv), kv_head)
          plgpu.barrier_wait(k_free.at[slot])
          plgpu.copy_gmem_to_smem(k_ref.at[cols], k_smem.at[slot], k_bars.at[slot])
          plgpu.barrier_wait(v_free.at[slot])
          plgpu.copy_gmem_to_smem(v_ref.at[cols], v_smem.at[slot], v_bars.at[slot])
          return carry

        lax.fori_loop(jnp.minimum(stages, num_steps), num_steps, refill, 0)
        return num_steps

      def refill_on(step, carry):  # step counts the CTA's key tiles
        slot = lax.rem(step, jnp.array(stages, step.dtype))
        cols = (batch, pl.ds((lo + step - done) * block_kv, block_kv), kv_head)
        ring_full = step >= stages
        pl.when(ring_full)(lambda: plgpu.barrier_wait(k_free.at[slot]))
        plgpu.copy_gmem_to_smem(k_ref.at[cols], k_smem.at[slot], k_bars.at[slot])
        pl.when(ring_full)(lambda: plgpu.barrier_wait(v_free.at[slot]))
        plgpu.copy_gmem_to_smem(v_ref.at[cols], v_smem.at[slot], v_bars.at[slot])
        return carry

      lax.fori_loop(done, done + num_steps, refill_on, 0)
      return done + num_steps

    @pl.when(wg == CONSUMERS)
    def _producer():
      if not interpret:
        plgpu.set_max_registers(40, action="decrease")
      done = 0  # key tiles fetched for the CTA's earlier query tiles
      for r in range(items):
        done = produce(r, done)

      # Observe the consumers' last releases, so that every barrier phase has
      # been seen by each warpgroup that waits on it (the interpreter checks).
      def drain(step, carry):
        slot = lax.rem(step, jnp.array(stages, step.dtype))
        plgpu.barrier_wait(k_free.at[slot])
        plgpu.barrier_wait(v_free.at[slot])
        return carry

      lax.fori_loop(jnp.maximum(done - stages, 0), done, drain, 0)
      for r in range(max(items - 2, 0), items if items > 1 else 0):
        plgpu.barrier_wait(q_free.at[r % 2])

    def consume(r, done):
      """One consumer's work on the CTA's r-th query tile; returns ``done`` updated."""
      cta_start, lo, hi = tile0 if items == 1 else kv_range(r)
      buf = r % 2 if items > 1 else 0
      q_smem = q_tile(buf, wg)
      q_start = cta_start if head_pairs else cta_start + wg * ROWS
      if items == 1:  # several: the producer loads them
        plgpu.copy_gmem_to_smem(q_ref.at[batch, pl.ds(q_start, ROWS), head], q_smem, q_bars.at[wg])
      _, full_lo, full_hi, _ = masks.kv_block_range(q_start, ROWS, block_kv, spec, q_len, kv_len)
      full_lo = jnp.clip(full_lo, lo, hi)
      full_hi = jnp.clip(full_hi, full_lo, hi)
      with jax.named_scope("c_qwait"):
        plgpu.barrier_wait(q_bar(buf, wg))

      row_layout = plgpu.Layout.WGMMA.reduce(1)
      m = plgpu.layout_cast(jnp.full((ROWS,), -jnp.inf, jnp.float32), row_layout)
      denom = plgpu.layout_cast(jnp.zeros((ROWS,), jnp.float32), row_layout)
      acc = plgpu.layout_cast(jnp.zeros((ROWS, h), jnp.float32), plgpu.Layout.WGMMA)

      def slot_of(j):  # ring slots count on from the CTA's earlier query tiles
        return lax.rem(j - lo if r == 0 else j - lo + done, jnp.array(stages, j.dtype))

      first = 0 if r == 0 else slot_of(lo)  # the slot of this tile's first key tile

      def mask_scores(sc, j):
        shape, layout = (ROWS, block_kv), plgpu.Layout.WGMMA
        rows = plgpu.broadcasted_iota(jnp.int32, shape, 0, layout=layout) + q_start
        cols = plgpu.broadcasted_iota(jnp.int32, shape, 1, layout=layout) + j * block_kv
        return jnp.where(masks.visible(rows, cols, spec, q_len, kv_len), sc, -jnp.inf)

      def probabilities(sc, j, m, masked: bool):
        """Tile j's new running max, the old max's rescale factor and P (float32)."""
        if masked:
          sc = mask_scores(sc, j)
        # m is in base-2 units (scores times log2_scale): p below takes one FMA a score.
        m_new = jnp.maximum(m, sc.max(axis=1) * log2_scale)
        # A row that has seen only masked columns keeps m = -inf: shift by 0.
        m_shift = jnp.where(m_new == -jnp.inf, 0.0, m_new) if masked else m_new
        alpha = jnp.exp2(m - m_shift)
        p = jnp.exp2(sc * log2_scale - lax.broadcast_in_dim(m_shift, sc.shape, [0]))
        return m_new, alpha, p

      def pv_operand(p16):
        """P as the P·V product's operand: from registers, or stored to shared memory."""
        if p_in_registers:
          return p16
        p_smem.at[wg][...] = p16
        plgpu.commit_smem()
        return p_smem.at[wg]

      def step(j, carry, masked: bool):
        m, denom, acc = carry
        slot = slot_of(j)

        def wait_next_k():  # K of step j was awaited during step j - 1's P·V product
          next_slot = slot_of(j + 1)
          pl.when(j + 1 < hi)(lambda: plgpu.barrier_wait(k_bars.at[next_slot]))

        def scores(acc_ref):
          plgpu.wgmma(acc_ref, q_smem, k_smem.at[slot].transpose((1, 0)))
          take_turn()
          return acc_ref[...]

        with jax.named_scope("c_qk"):
          sc = pl.run_scoped(scores, plgpu.ACC((ROWS, block_kv), jnp.float32))
        plgpu.barrier_arrive(k_free.at[slot])
        m_new, alpha, p = probabilities(sc, j, m, masked)
        acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
        denom = denom * alpha + p.sum(axis=1)
        p16 = p.astype(dtype)
        if not interpret:  # keeps the softmax ahead of the barriers (measured: +2-4%)
          acc, denom, m_new, p16 = lax.optimization_barrier((acc, denom, m_new, p16))
        if schedule:
          plgpu.barrier_arrive(turn)
        with jax.named_scope("c_vwait"):
          plgpu.barrier_wait(v_bars.at[slot])
          if schedule:
            plgpu.barrier_wait(turn)
        operand = pv_operand(p16)

        def values(acc_ref):
          plgpu.wgmma(acc_ref, operand, v_smem.at[slot])
          wait_next_k()
          if not p_in_registers:
            return acc_ref[...]

        if p_in_registers:
          with jax.named_scope("c_pv"):
            acc = pl.run_state(values)(plgpu.ACC.init(acc))
        else:
          acc = acc + pl.run_scoped(values, plgpu.ACC((ROWS, h), jnp.float32))
        plgpu.barrier_arrive(v_free.at[slot])
        return m_new, denom, acc

      def run_serial(m, denom, acc):
        pl.when(lo < hi)(lambda: plgpu.barrier_wait(k_bars.at[first]))
        pl.when(wg == 1)(take_turn)
        carry = _key_runs(lo, full_lo, full_hi, hi, (lead, trail), step, (m, denom, acc))
        pl.when(wg == 0)(take_turn)
        return carry

      # --- pipelined: tile n's scores and softmax overlap tile n-1's P·V product ---

      def my_turn():  # wait until the other consumer has issued its products
        if schedule:
          plgpu.barrier_wait(turn.at[wg])

      def pass_turn():
        if schedule:
          plgpu.barrier_arrive(turn.at[1 - wg])

      def softmax(sc, j, m, denom, masked: bool, convert: bool = True):
        """Tile j's online softmax: new max, rescale factor, P, denominator."""
        m_new, alpha, p = probabilities(sc, j, m, masked)
        return m_new, alpha, p.astype(dtype) if convert else p, denom * alpha + p.sum(axis=1)

      def overlapped(n, carry, masked: bool):
        """Issue Q·K(n)ᵀ and P(n-1)·V(n-1), softmax tile n while the latter runs."""
        m, denom, acc, p16 = carry
        slot, prev = slot_of(n), slot_of(n - 1)
        with jax.named_scope("c_wait"):
          plgpu.barrier_wait(k_bars.at[slot])
          plgpu.barrier_wait(v_bars.at[prev])
          my_turn()

        def scores(s_ref, acc_ref, p16):
          plgpu.wgmma(s_ref, q_smem, k_smem.at[slot].transpose((1, 0)))
          plgpu.wgmma(acc_ref, pv_operand(p16), v_smem.at[prev])
          pass_turn()
          return plgpu.wgmma_accumulator_load(s_ref, wait_n=1)  # P·V still running

        def tile_softmax(sc, m, denom):
          plgpu.barrier_arrive(k_free.at[slot])
          with jax.named_scope("c_softmax"):
            out = softmax(sc, n, m, denom, masked, convert=interpret)
            if not interpret:  # computed before the wait for P·V, not after it
              out = lax.optimization_barrier(out)
          return out

        if interpret:  # the interpreter runs no pl.run_state with accumulators
          sc, pv = pl.run_scoped(
            lambda s_ref, acc_ref: (scores(s_ref, acc_ref, p16), acc_ref[...]),
            plgpu.ACC((ROWS, block_kv), jnp.float32),
            plgpu.ACC((ROWS, h), jnp.float32),
          )
          acc = acc + pv
          m, alpha, p16, denom = tile_softmax(sc, m, denom)
        else:

          def products(refs):
            acc_ref, m_ref, denom_ref, p_ref, alpha_ref = refs
            sc = pl.run_scoped(
              lambda s_ref: scores(s_ref, acc_ref, p16),
              plgpu.ACC((ROWS, block_kv), jnp.float32),
            )
            m_ref[...], alpha_ref[...], p_ref[...], denom_ref[...] = tile_softmax(
              sc, m_ref[...], denom_ref[...]
            )

          # P leaves as float32 and becomes a wgmma operand only after the wait: defining
          # an operand register while a wgmma is in flight makes ptxas serialize every
          # wgmma of the kernel (ptxas info C7513; 405 against 614 TFLOP/s on an H200).
          p32 = plgpu.layout_cast(jnp.zeros((ROWS, block_kv), jnp.float32), plgpu.Layout.WGMMA)
          init = (plgpu.ACC.init(acc), m, denom, p32, m)
          acc, m, denom, p32, alpha = pl.run_state(products)(init)
          p16 = p32.astype(dtype)
        plgpu.barrier_arrive(v_free.at[prev])
        return m, denom, acc * lax.broadcast_in_dim(alpha, acc.shape, [0]), p16

      def run_pipelined(m, denom, acc):
        # The first tile: its scores and softmax alone.
        plgpu.barrier_wait(k_bars.at[first])
        pl.when(wg == 1)(pass_turn)  # consumer 0 issues first

        def first_scores(s_ref):
          plgpu.wgmma(s_ref, q_smem, k_smem.at[first].transpose((1, 0)))
          pass_turn()
          return s_ref[...]

        my_turn()
        sc = pl.run_scoped(first_scores, plgpu.ACC((ROWS, block_kv), jnp.float32))
        plgpu.barrier_arrive(k_free.at[first])
        if lead or trail:
          first_masked = (full_lo > lo) | (full_hi == lo)
          m, _, p16, denom = lax.cond(
            first_masked,
            lambda sc, m, d: softmax(sc, lo, m, d, True),
            lambda sc, m, d: softmax(sc, lo, m, d, False),
            sc,
            m,
            denom,
          )
        else:
          m, _, p16, denom = softmax(sc, lo, m, denom, False)
        carry = (m, denom, acc, p16)
        plain_lo = jnp.clip(full_lo, lo + 1, hi) if lead else lo + 1
        plain_hi = jnp.clip(full_hi, plain_lo, hi) if trail else hi
        carry = _key_runs(lo + 1, plain_lo, plain_hi, hi, (lead, trail), overlapped, carry)
        m, denom, acc, p16 = carry
        # The last tile's P·V product.
        last = slot_of(hi - 1)
        plgpu.barrier_wait(v_bars.at[last])
        my_turn()

        def values(acc_ref):
          plgpu.wgmma(acc_ref, pv_operand(p16), v_smem.at[last])
          pass_turn()
          if interpret:
            return acc_ref[...]

        if interpret:
          acc = acc + pl.run_scoped(values, plgpu.ACC((ROWS, h), jnp.float32))
        else:
          acc = pl.run_state(values)(plgpu.ACC.init(acc))
        plgpu.barrier_arrive(v_free.at[last])
        pl.when(wg == 0)(my_turn)  # consumer 1's last pass
        return m, denom, acc

      def finish(m, denom, acc):
        with jax.named_scope("c_epilogue"):
          empty = denom == 0.0
          safe = jnp.where(empty, 1.0, denom)
          inv = 1.0 / safe
          out = acc * lax.broadcast_in_dim(inv, acc.shape, [0])
          rows = pl.ds(q_start, ROWS)

          def store_lse():
            lse_smem.at[wg][...] = jnp.where(empty, -jnp.inf, m + jnp.log2(safe))

          def store():
            q_smem[...] = out.astype(dtype)
            store_lse()
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(q_smem, o_ref.at[batch, rows, head])
            plgpu.copy_smem_to_gmem(lse_smem.at[wg], lse_ref.at[batch, head, rows])

          def store_part():  # float32 until the merge, through shared memory in slices
            store_lse()
            width = STAGE_COLS[h]
            for c in range(h // width):
              if c:
                plgpu.wait_smem_to_gmem(0, wait_read_only=True)
              stage_smem.at[wg][...] = out[:, c * width : (c + 1) * width]
              plgpu.commit_smem()
              target = o_parts_ref.at[part, batch, rows, head, pl.ds(c * width, width)]
              plgpu.copy_smem_to_gmem(stage_smem.at[wg], target)
            plgpu.copy_smem_to_gmem(lse_smem.at[wg], lse_parts_ref.at[part, batch, head, rows])

          if kv_split:
            pl.when(~is_part)(store)
            pl.when(is_part)(store_part)
          else:
            store()
          if items == 1 or r == items - 1:
            plgpu.wait_smem_to_gmem(0)
          else:  # the Q buffer and lse_smem are free once read
            plgpu.wait_smem_to_gmem(0, wait_read_only=True)
          if items > 1:
            plgpu.barrier_arrive(q_free.at[buf])

      if pipelined:  # a CTA that visits no key tile (lo == hi) skips the loop entirely
        pl.when(lo < hi)(lambda: finish(*run_pipelined(m, denom, acc)))
        pl.when(lo >= hi)(lambda: finish(m, denom, acc))
      else:
        finish(*run_serial(m, denom, acc))
      return hi - lo if r == 0 else done + hi - lo

    @pl.when(wg < CONSUMERS)
    def _consumer():
      if not interpret:
        plgpu.set_max_registers(232, action="increase")
      done = 0  # key tiles consumed for the CTA's earlier query tiles
      for r in range(items):
        done = consume(r, done)

  scratch = [
    plgpu.SMEM((CONSUMERS, ROWS, h), dtype, transforms=_SWIZZLED),  # Q, then O
    plgpu.SMEM((stages, block_kv, h), dtype, transforms=_SWIZZLED),
    plgpu.SMEM((stages, block_kv, h), dtype, transforms=_SWIZZLED),
    plgpu.SMEM((CONSUMERS, ROWS), jnp.float32),
    plgpu.Barrier(num_barriers=CONSUMERS * (1 if items == 1 else 2)),  # Q landed
    plgpu.Barrier(num_barriers=stages),
    plgpu.Barrier(num_barriers=stages),
    plgpu.Barrier(num_arrivals=CONSUMERS, num_barriers=stages),
    plgpu.Barrier(num_arrivals=CONSUMERS, num_barriers=stages),
    # pipelined: one barrier per consumer; serial: one two-arrival barrier
    plgpu.Barrier(num_barriers=CONSUMERS) if pipelined else plgpu.Barrier(num_arrivals=CONSUMERS),
  ]
  if not p_in_registers:
    scratch.append(plgpu.SMEM((CONSUMERS, ROWS, block_kv), dtype, transforms=_SWIZZLED))
  if items > 1:  # a second Q buffer: the next tile's Q loads while this one computes
    scratch.append(plgpu.SMEM((CONSUMERS, ROWS, h), dtype, transforms=_SWIZZLED))
    scratch.append(plgpu.Barrier(num_arrivals=CONSUMERS, num_barriers=2))
  out_type = [q, jax.ShapeDtypeStruct((b, n, t), jnp.float32)]
  # Mosaic GPU launches the last grid axis fastest: CTAs of one head's query
  # tiles run side by side and share its K/V tiles in L2.
  grid, grid_names = (b, n // 2 if head_pairs else n, num_q_tiles // items), ("batch", "heads", "q")
  if kv_split:
    scratch.append(plgpu.SMEM((CONSUMERS, ROWS, STAGE_COLS[h]), jnp.float32))
    out_type += [
      jax.ShapeDtypeStruct((parts, b, tail * cta_rows, n, h), jnp.float32),
      jax.ShapeDtypeStruct((parts, b, n, tail * cta_rows), jnp.float32),
    ]
    grid, grid_names = (b * n * (whole_per_pair + tail * parts),), ("cta",)
  kernel_call = plgpu.kernel(
    kernel,
    out_type=out_type,
    grid=grid,
    grid_names=grid_names,
    num_threads=CONSUMERS + 1,
    thread_name="wg",
    scratch_types=scratch,
    compiler_params=compiler_params(interpret),
    kernel_name="attention_fwd",  # in profiles (benchmarks/profile_step.py)
  )
  if not kv_split:
    return call(kernel_call, q, k, v, interpret=interpret)
  out, lse, o_parts, lse_parts = call(kernel_call, q, k, v, interpret=interpret)
  # XLA's GPU compiler would otherwise fuse the updates below into the kernel's call
  # (its dynamic-slice fusion) and then reject the graph for a cycle (jax 0.11.2).
  out, lse = lax.optimization_barrier((out, lse))
  o_tail, lse_tail = merge_parts(o_parts, lse_parts)
  out = lax.dynamic_update_slice(out, o_tail.astype(dtype), (0, 0, 0, 0))
  return out, lax.dynamic_update_slice(lse, lse_tail, (0, 0, 0))


def kv_split_fits(h: int, block_kv: int, stages: int, itemsize: int, p_in_registers=True) -> bool:
  """Whether a ``kv_split`` forward fits in shared memory: its parts stage their float32
  output, STAGE_COLS[h] columns at a time, beside the Q buffer and the key/value ring."""
  smem = _tile_smem(h, block_kv, stages, itemsize, p_in_registers) + CTA_ROWS * STAGE_COLS[h] * 4
  return smem + SMEM_SLACK <= SMEM_BYTES


def _tile_smem(h, block_kv, stages, itemsize, p_in_registers, q_buffers=1) -> int:
  """Shared memory of a forward CTA's tiles: its Q buffers, the key/value ring and (P
  not in registers) the P tiles."""
  smem = (q_buffers * CTA_ROWS + 2 * stages * block_kv) * h * itemsize
  return smem + (0 if p_in_registers else CTA_ROWS * block_kv * itemsize)


def merge_parts(o_parts, lse_parts):
  """Outputs over disjoint key ranges merged into one: ``o_parts [P, B, T, N, H]``, each
  normalised over its keys, and their base-2 LSE ``lse_parts [P, B, N, T]`` (-inf: no
  visible key) -> ``out [B, T, N, H]`` (float32) and LSE ``[B, N, T]``."""
  top = lse_parts.max(axis=0)
  top = jnp.where(jnp.isfinite(top), top, 0.0)
  weights = jnp.exp2(lse_parts - top)  # [P, B, N, T]; 0 for a part that saw no key
  total = weights.sum(axis=0)
  lse = jnp.where(total > 0, top + jnp.log2(jnp.where(total > 0, total, 1.0)), -jnp.inf)
  weights = weights / jnp.where(total > 0, total, 1.0)
  # Elementwise products summed (not a dot, which may round through TF32).
  out = (jnp.transpose(weights, (0, 1, 3, 2))[..., None] * o_parts).sum(axis=0)
  return out, lse

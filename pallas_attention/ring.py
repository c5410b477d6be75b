"""Ring attention: flash attention over a sequence sharded along a mesh axis.

Called inside ``jax.shard_map`` with the sequence axis of ``query, key, value``
sharded over ``axis_name`` (``P`` devices). Each device keeps its query shard;
the key/value shards travel around the ring (``lax.ppermute`` to the next
device), one hop per step, so after ``P`` steps every query shard has met every
key shard. Each step runs our flash kernels on the local block and merges its
``(out, lse)`` into the running result by the log-sum-exp rule::

    lse = log(exp(lse_a) + exp(lse_b)),
    out = exp(lse_a − lse) · out_a + exp(lse_b − lse) · out_b

The transfer of the next shard is issued before the current step's kernels, so
XLA can overlap the two. The backward is a ring as well: each device keeps its
``q, do, out, lse`` and accumulates ``dq``; key/value shards travel the same way
with their ``dk, dv`` accumulators and one last hop takes those home. Every block
runs the kernels' residual-based backward with the merged ``out`` and ``lse``
(core.backward), which gives exactly that block's term of the gradients. Memory
per device is O(T/P).

Masks are static: which part of a step's block is visible depends only on the
global positions of its queries and keys, which a static schedule works out per
(step, device) in Python. A device's work in a step is a few kernel calls with a
structural MaskSpec each (a window shifted off the diagonal where the block sits
at an offset), or nothing at all when the block is fully masked; devices with
different work pick theirs with ``lax.switch`` on ``axis_index``.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from pallas_attention import api, core, masks

LAYOUTS = ("contiguous", "zigzag")
_UNMASKED = masks.MaskSpec()

# The local kernels, looked up when a ring is traced so that
# benchmarks/ring_bench.py can swap in a no-op and time the communication alone.
_local_forward = core.forward
_local_backward = core.backward


def ring_attention(
  query,
  key,
  value,
  *,
  axis_name,
  is_causal: bool = False,
  q_segment_ids=None,
  kv_segment_ids=None,
  local_window_size: int | tuple[int | None, int | None] | None = None,
  scale: float | None = None,
  layout: str = "contiguous",
  implementation=None,
):
  r"""Flash attention over a sequence sharded along mesh axis ``axis_name``.

  Call it inside ``jax.shard_map`` with the sequence axis of every argument
  sharded over ``axis_name`` (``P`` devices); batch and heads may be sharded
  over other axes. The result is the shard of
  ``flash_attention(Q, K, V, ...)`` of the whole sequences, with the same
  semantics (causal and window on global positions, top-left aligned), and
  its gradients are those of that call.

  Args:
    query: this device's shard ``[B, T/P, N, H]`` (or unbatched ``[T/P, N, H]``).
    key: ``[B, S/P, K, H]``, same dtype, ``N % K == 0`` (GQA/MQA).
    value: same shape and dtype as key.
    axis_name: the mesh axis the sequence is sharded over; must be bound
      (inside ``shard_map``).
    is_causal: query ``i`` attends to keys ``j <= i`` (global positions).
    q_segment_ids: ``[B, T/P]`` ints (packed documents): attend iff the ids are
      equal. Give both or neither. Applied as a bool mask per block (flash
      attention takes no segment ids yet), so on Hopper those blocks run the
      ``triton`` kernels.
    kv_segment_ids: ``[B, S/P]`` ints; they travel around the ring with K/V.
    local_window_size: ``w`` or ``(left, right)`` on global positions, as in
      flash_attention.
    scale: logit scale; default ``1 / sqrt(H)``.
    layout: how the global sequence is split into shards. ``"contiguous"``:
      shard ``p`` holds positions ``[p·T/P, (p+1)·T/P)``. ``"zigzag"``: the
      sequence is cut into ``2P`` chunks and shard ``p`` holds chunks ``p`` and
      ``2P−1−p`` (zigzag_permute makes that order), which gives every device the
      same causal work; needs even shard lengths.
    implementation: as in flash_attention, for the local kernels.

  Returns:
    This device's shard of the output, shape and dtype of ``query``.

  Raises:
    ValueError, TypeError: bad arguments, naming the argument; ``axis_name``
      not bound to a mesh axis.
  """
  names = api._implementation_names(implementation)
  query, key, value = (
    api._as_float_array(x, name) for x, name in ((query, "query"), (key, "key"), (value, "value"))
  )
  unbatched = api._check_qkv(query, key, value)
  if unbatched:
    query, key, value = query[None], key[None], value[None]
  b, t, _, h = query.shape
  s = key.shape[1]
  num_shards = _axis_size(axis_name)
  if layout not in LAYOUTS:
    raise ValueError(f"layout: expected one of {LAYOUTS}, got {layout!r}")
  if num_shards == 1:
    layout = "contiguous"  # one shard: both layouts are the sequence in order
  if layout == "zigzag" and (t % 2 or s % 2):
    raise ValueError(
      f"query/key: the zigzag layout needs even shard lengths, got {t} and {s} "
      f"(the global sequence must be a multiple of 2·P = {2 * num_shards})"
    )
  q_segment_ids, kv_segment_ids = _segment_ids(q_segment_ids, kv_segment_ids, b, t, s, unbatched)
  plan = _Plan(
    axis_name=axis_name,
    num_shards=num_shards,
    layout=layout,
    spec=masks.MaskSpec(bool(is_causal), *api._window(local_window_size)),
    scale=api._scale(scale, h),
    implementation=names,
  )
  out = _ring(plan, query, key, value, q_segment_ids, kv_segment_ids)
  return out[0] if unbatched else out


def zigzag_permute(x, num_shards: int, axis: int = 1):
  """Reorders a global sequence into the zigzag layout of ring_attention.

  The sequence axis (length divisible by ``2 · num_shards``) is cut into
  ``2 · num_shards`` equal chunks and reordered to ``0, 2P−1, 1, 2P−2, …``, so
  that cutting the result into ``num_shards`` contiguous shards gives shard
  ``p`` the chunks ``p`` and ``2P−1−p``: under a causal mask every shard then has
  the same work. Apply it to everything laid out along the sequence (queries,
  keys, values, segment ids, position ids for RoPE) before sharding, and
  zigzag_unpermute to the output.

  Args:
    x: an array with the sequence on ``axis`` (``[B, T, ...]`` by default).
    num_shards: ``P``, the size of the mesh axis the sequence is sharded over.
    axis: the sequence axis.
  """
  return _reorder_chunks(x, num_shards, axis, _zigzag_order(num_shards))


def zigzag_unpermute(x, num_shards: int, axis: int = 1):
  """The inverse of zigzag_permute: the zigzag layout back to sequence order."""
  return _reorder_chunks(x, num_shards, axis, np.argsort(_zigzag_order(num_shards)))


def _zigzag_order(num_shards: int) -> list[int]:
  last = 2 * num_shards - 1
  return [chunk for shard in range(num_shards) for chunk in (shard, last - shard)]


def _reorder_chunks(x, num_shards, axis: int, order):
  if isinstance(num_shards, bool) or not isinstance(num_shards, (int, np.integer)):
    raise TypeError(f"num_shards: expected an int, got {num_shards!r}")
  if num_shards < 1:
    raise ValueError(f"num_shards: expected >= 1, got {num_shards}")
  x = jnp.asarray(x)
  if not -x.ndim <= axis < x.ndim:
    raise ValueError(f"axis: {axis} is out of range for shape {x.shape}")
  axis %= x.ndim
  length, num_chunks = x.shape[axis], 2 * num_shards
  if length % num_chunks:
    raise ValueError(
      f"x: sequence length {length} (axis {axis}) is not a multiple of "
      f"2 · num_shards = {num_chunks}"
    )
  chunks = x.reshape(*x.shape[:axis], num_chunks, length // num_chunks, *x.shape[axis + 1 :])
  return jnp.take(chunks, np.asarray(order), axis=axis).reshape(x.shape)


def _axis_size(axis_name) -> int:
  try:
    return lax.axis_size(axis_name)
  except NameError:
    raise ValueError(
      f"axis_name: {axis_name!r} is not a bound mesh axis; call ring_attention "
      "inside jax.shard_map over a mesh with that axis"
    ) from None


def _segment_ids(q_ids, kv_ids, batch: int, t: int, s: int, unbatched: bool):
  if (q_ids is None) != (kv_ids is None):
    raise ValueError("q_segment_ids, kv_segment_ids: give both or neither")
  if q_ids is None:
    return None, None
  checked = []
  for ids, name, length in ((q_ids, "q_segment_ids", t), (kv_ids, "kv_segment_ids", s)):
    ids = jnp.asarray(ids)
    if not jnp.issubdtype(ids.dtype, jnp.integer):
      raise TypeError(f"{name}: expected an integer dtype, got {ids.dtype}")
    if unbatched:
      ids = ids[None]
    if ids.shape != (batch, length):
      shown = (length,) if unbatched else (batch, length)
      raise ValueError(f"{name}: expected shape {shown} (this shard's), got {ids.shape}")
    checked.append(ids.astype(jnp.int32))
  return tuple(checked)


@dataclasses.dataclass(frozen=True)
class _Plan:
  """The static part of one ring_attention call."""

  axis_name: object
  num_shards: int
  layout: str
  spec: masks.MaskSpec  # on global positions
  scale: float
  implementation: tuple[str, ...]


# ---- The static schedule -----------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Block:
  """One kernel call in a ring step.

  Held query rows ``[q_start, q_start + q_size)`` against visiting key/value rows
  ``[kv_start, kv_start + kv_size)`` (local indices), with the structural mask
  ``spec`` in the block's own coordinates.
  """

  q_start: int
  q_size: int
  kv_start: int
  kv_size: int
  spec: masks.MaskSpec


# A device's work in one ring step: its kernel calls in order; () skips the step.
Work = tuple[_Block, ...]


@dataclasses.dataclass(frozen=True)
class _Schedule:
  """``works[table[step][device]]`` is what ``device`` computes at ring ``step``."""

  works: tuple[Work, ...]
  table: tuple[tuple[int, ...], ...]


def _chunks(layout: str, shard: int, num_shards: int, length: int):
  """``(global start, local start, size)`` of each chunk of a shard of ``length``."""
  if layout == "contiguous":
    return ((shard * length, 0, length),)
  half = length // 2
  return ((shard * half, 0, half), ((2 * num_shards - 1 - shard) * half, half, half))


def _shifted_spec(spec: masks.MaskSpec, offset: int, q_size: int, kv_size: int):
  """The mask of a block whose keys start ``offset`` positions after its queries.

  Query ``i`` sees key ``j`` globally iff ``lo <= j − i <= hi`` (``lo = −left``,
  ``hi = min(right, 0 if causal)``, None unbounded); locally that is
  ``lo − offset <= col − row <= hi − offset``. Returns None when no pair is
  visible, the unmasked spec when all are, else the shifted band.
  """
  lo = None if spec.window_left is None else -spec.window_left
  hi = spec.window_right
  if spec.causal:
    hi = 0 if hi is None else min(hi, 0)
  lo = None if lo is None else lo - offset
  hi = None if hi is None else hi - offset
  lowest, highest = -(q_size - 1), kv_size - 1  # the range of col − row in the block
  if (hi is not None and hi < lowest) or (lo is not None and lo > highest):
    return None
  lo = None if lo is None or lo <= lowest else lo  # a bound that never binds is dropped
  hi = None if hi is None or hi >= highest else hi
  left = None if lo is None else -lo
  if hi == 0:
    return masks.MaskSpec(True, left, None)
  return masks.MaskSpec(False, left, hi)


def _work(spec, layout, num_shards, device, source, t, s) -> Work:
  """The kernel calls of ``device``'s queries against the keys of shard ``source``."""
  windowed = spec.window_left is not None or spec.window_right is not None
  if layout == "zigzag" and device == source and t == s and not windowed:
    # Both sides list the same global positions in the same increasing order,
    # so the causal mask on local positions is exact: one call.
    return (_Block(0, t, 0, s, masks.MaskSpec(spec.causal)),)
  rows = []
  for q_global, q_local, q_size in _chunks(layout, device, num_shards, t):
    blocks = []
    for kv_global, kv_local, kv_size in _chunks(layout, source, num_shards, s):
      local = _shifted_spec(spec, kv_global - q_global, q_size, kv_size)
      if local is None:
        continue
      last = blocks[-1] if blocks else None
      if (
        local == _UNMASKED
        and last is not None
        and last.spec == _UNMASKED
        and last.kv_start + last.kv_size == kv_local
      ):
        blocks[-1] = dataclasses.replace(last, kv_size=last.kv_size + kv_size)
      else:
        blocks.append(_Block(q_local, q_size, kv_local, kv_size, local))
    if blocks:
      rows.append(blocks)
  # Query chunks that see the same keys, all unmasked, become one call.
  merged = []
  for blocks in rows:
    if merged and _stackable(merged[-1], blocks):
      merged[-1] = [
        dataclasses.replace(a, q_size=a.q_size + b.q_size)
        for a, b in zip(merged[-1], blocks, strict=True)
      ]
    else:
      merged.append(blocks)
  return tuple(block for blocks in merged for block in blocks)


def _stackable(upper, lower) -> bool:
  return len(upper) == len(lower) and all(
    a.spec == _UNMASKED
    and b.spec == _UNMASKED
    and (a.kv_start, a.kv_size) == (b.kv_start, b.kv_size)
    and a.q_start + a.q_size == b.q_start
    for a, b in zip(upper, lower, strict=True)
  )


@functools.lru_cache(maxsize=256)
def _schedule(spec: masks.MaskSpec, layout: str, num_shards: int, t: int, s: int) -> _Schedule:
  """At step ``k`` device ``p`` holds the key/value shard of device ``(p − k) mod P``."""
  works: dict[Work, int] = {}
  table = []
  for step in range(num_shards):
    row = []
    for device in range(num_shards):
      source = (device - step) % num_shards
      work = _work(spec, layout, num_shards, device, source, t, s)
      row.append(works.setdefault(work, len(works)))
    table.append(tuple(row))
  return _Schedule(tuple(works), tuple(table))


def _dispatch(schedule: _Schedule, steps: range, step, device, fn, *operands):
  """``fn(work, *operands)`` with this device's work at ``step`` (one of ``steps``).

  ``step`` is a Python int or, inside a loop over ``steps``, a traced one. Only
  the works that occur in ``steps`` are traced; when every device has the same
  work there is no switch at all.
  """
  used = sorted({w for k in steps for w in schedule.table[k]})
  if len(used) == 1:
    return fn(schedule.works[used[0]], *operands)
  branch = np.asarray([[used.index(w) for w in schedule.table[k]] for k in steps], np.int32)
  index = jnp.asarray(branch)[step - steps.start, device]
  branches = [functools.partial(fn, schedule.works[w]) for w in used]
  return lax.switch(index, branches, *operands)


# ---- The ring ----------------------------------------------------------------------


def _segment_mask(q_ids, kv_ids):
  """``[B, 1, T, S]`` bool from ``[B, T]`` and ``[B, S]`` segment ids."""
  if q_ids is None:
    return None
  return (q_ids[:, :, None] == kv_ids[:, None, :])[:, None]


def _rows(x, start: int, size: int, axis: int = 1):
  return None if x is None else lax.slice_in_dim(x, start, start + size, axis=axis)


def _block_args(plan: _Plan, block: _Block, q, kv, q_ids):
  """The problem and operands of one block's kernel call."""
  k, v, kv_ids = kv
  qb = _rows(q, block.q_start, block.q_size)
  kb, vb = (_rows(x, block.kv_start, block.kv_size) for x in (k, v))
  mask = _segment_mask(
    _rows(q_ids, block.q_start, block.q_size), _rows(kv_ids, block.kv_start, block.kv_size)
  )
  problem = api.select_problem(
    qb, kb, block.spec, scale=plan.scale, mask=mask, implementation=plan.implementation
  )
  b = q.shape[0]
  q_len = jnp.full((b,), block.q_size, jnp.int32)
  kv_len = jnp.full((b,), block.kv_size, jnp.int32)
  return problem, qb, kb, vb, mask, q_len, kv_len


def _add_rows(acc, part, start: int, axis: int, replace: bool):
  """``acc`` with ``part`` added at ``start`` along ``axis`` (or put there, replacing all)."""
  if replace:
    return part.astype(acc.dtype)
  rows = _rows(acc, start, part.shape[axis], axis)
  return lax.dynamic_update_slice_in_dim(acc, rows + part.astype(acc.dtype), start, axis)


def _merge(out, lse2, part_out, part_lse2, start: int, replace: bool):
  """Merges a block's ``(out [B, t, N, H], lse2 [B, N, t])`` into query rows ``start…``."""
  if replace:
    return part_out.astype(out.dtype), part_lse2
  size = part_out.shape[1]
  old_out, old_lse2 = _rows(out, start, size), _rows(lse2, start, size, axis=2)
  new_lse2 = jnp.logaddexp2(old_lse2, part_lse2)
  # Rows that nothing has been visible to yet keep lse −inf and weights 0.
  finite = jnp.where(new_lse2 == -jnp.inf, 0.0, new_lse2)

  def weighted(part, part_lse2):
    weight = jnp.exp2(part_lse2 - finite).transpose(0, 2, 1)[..., None]  # [B, t, N, 1]
    return part.astype(jnp.float32) * weight

  merged = weighted(old_out, old_lse2) + weighted(part_out, part_lse2)
  out = lax.dynamic_update_slice_in_dim(out, merged.astype(out.dtype), start, 1)
  return out, lax.dynamic_update_slice_in_dim(lse2, new_lse2, start, 2)


def _covers(block: _Block, t: int, s: int) -> tuple[bool, bool]:
  return block.q_size == t, block.kv_size == s


def _shift(plan: _Plan, x):
  """Sends ``x`` (a pytree) to the next device on the ring: device ``p`` to ``p + 1``."""
  if not jax.tree.leaves(x):
    return x
  perm = [(p, (p + 1) % plan.num_shards) for p in range(plan.num_shards)]
  return lax.ppermute(x, plan.axis_name, perm)


def _ring_loop(plan: _Plan, schedule: _Schedule, compute, acc, kv, carried=()):
  """Ring steps ``0 … P−1`` of ``compute(fresh, work, acc, carried, kv) -> (acc, carried)``.

  ``acc`` stays on the device. ``kv`` (the key/value shard) moves to the next
  device after each step; its transfer is issued before the step's kernels, so
  it can overlap them. ``carried`` (the backward's dK/dV) moves with it: the
  values a step adds to it leave at the start of the next step, which needs them
  only after its kernels, and a last hop after step ``P − 1`` takes them home.
  ``fresh`` is True at step 0, where ``acc`` holds nothing yet. Step 0 and step
  ``P − 1`` are peeled off the loop.
  """
  num_shards = plan.num_shards
  device = lax.axis_index(plan.axis_name)

  def step(k_step, steps: range, acc, carried, kv):
    fn = functools.partial(compute, steps.start == 0)
    return _dispatch(schedule, steps, k_step, device, fn, acc, carried, kv)

  following = _shift(plan, kv) if num_shards > 1 else None
  acc, carried = step(0, range(1), acc, carried, kv)
  kv = following
  if num_shards > 2:
    middle = range(1, num_shards - 1)

    def body(k_step, loop_carry):
      acc, carried, kv = loop_carry
      following = _shift(plan, kv)
      acc, carried = step(k_step, middle, acc, _shift(plan, carried), kv)
      return acc, carried, following

    acc, carried, kv = lax.fori_loop(middle.start, middle.stop, body, (acc, carried, kv))
  if num_shards > 1:
    last = range(num_shards - 1, num_shards)
    acc, carried = step(num_shards - 1, last, acc, _shift(plan, carried), kv)
    carried = _shift(plan, carried)  # home: shard p's dK/dV finished on device p − 1
  return acc, carried


def _accumulator_dtype(plan: _Plan, dtype):
  # One shard: a single kernel call writes every result; nothing to accumulate.
  return dtype if plan.num_shards == 1 else jnp.float32


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _ring(plan: _Plan, q, k, v, q_ids, kv_ids):
  return _ring_fwd(plan, q, k, v, q_ids, kv_ids)[0]


def _ring_fwd(plan: _Plan, q, k, v, q_ids, kv_ids):
  t, s = q.shape[1], k.shape[1]
  schedule = _schedule(plan.spec, plan.layout, plan.num_shards, t, s)

  def compute(fresh, work, acc, carried, kv):
    out, lse2 = acc
    for i, block in enumerate(work):
      problem, qb, kb, vb, mask, q_len, kv_len = _block_args(plan, block, q, kv, q_ids)
      part_out, part_lse2 = _local_forward(problem, qb, kb, vb, None, mask, q_len, kv_len)
      replace = fresh and i == 0 and _covers(block, t, s)[0]
      out, lse2 = _merge(out, lse2, part_out, part_lse2, block.q_start, replace)
    return (out, lse2), carried

  # Built from q so that they vary over q's shard_map axes, as the results do.
  out = jnp.zeros_like(q, _accumulator_dtype(plan, q.dtype))
  lse2 = jnp.full_like(q[..., 0], -jnp.inf, jnp.float32).transpose(0, 2, 1)
  (out, lse2), _ = _ring_loop(plan, schedule, compute, (out, lse2), (k, v, kv_ids))
  out = out.astype(q.dtype)
  return out, (q, k, v, q_ids, kv_ids, out, lse2)


def _ring_bwd(plan: _Plan, residuals, do):
  q, k, v, q_ids, kv_ids, out, lse2 = residuals
  t, s = q.shape[1], k.shape[1]
  schedule = _schedule(plan.spec, plan.layout, plan.num_shards, t, s)
  do = do.astype(q.dtype)
  delta = core.row_delta(out, do)

  def compute(fresh, work, dq, dkv, kv):
    dk, dv = dkv
    for i, block in enumerate(work):
      problem, qb, kb, vb, mask, q_len, kv_len = _block_args(plan, block, q, kv, q_ids)
      rows = lambda x, axis, block=block: _rows(x, block.q_start, block.q_size, axis)
      dqb, dkb, dvb, _ = _local_backward(
        problem, qb, kb, vb, None, mask, q_len, kv_len, rows(do, 1), rows(lse2, 2), rows(delta, 2)
      )
      all_q, all_kv = _covers(block, t, s)
      dq = _add_rows(dq, dqb, block.q_start, 1, fresh and i == 0 and all_q)
      dk = _add_rows(dk, dkb, block.kv_start, 1, fresh and i == 0 and all_kv)
      dv = _add_rows(dv, dvb, block.kv_start, 1, fresh and i == 0 and all_kv)
    return dq, (dk, dv)

  acc_dtype = _accumulator_dtype(plan, q.dtype)
  dq = jnp.zeros_like(q, acc_dtype)
  dkv = (jnp.zeros_like(k, acc_dtype), jnp.zeros_like(v, acc_dtype))
  dq, (dk, dv) = _ring_loop(plan, schedule, compute, dq, (k, v, kv_ids), dkv)
  return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None, None


_ring.defvjp(_ring_fwd, _ring_bwd)

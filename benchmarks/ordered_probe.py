"""The ordered (deterministic) fused backward's launch orders, and what its waiting costs.

Times forward+backward (TFLOP/s, the protocol's shapes) of ``mosaic`` with the ordered
fused backward forced at every length (``bench.py``'s ``mosaic-ordered``) under
launch-order variants, beside the unordered fused backward and cuDNN, one line per
point as it is measured, then a table:

- ``ord-headwise``: a (batch, kv head) pair's key blocks all launched together
  (``tuning.ORDERED_CHUNK = 0``);
- ``ord-chunk8`` / ``ord-chunk4``: chunks of 8 / 4 key blocks beside the same chunk of
  other pairs, at any key count and causal too (``tuning.ORDERED_CHUNK_MAX_KV`` and
  ``ORDERED_CHUNK_CAUSAL`` lifted);
- ``ord-nowait``: headwise with the semaphore waits traced out (a diagnostic: the adds
  are then in no fixed order; what the writer warp costs without the chain);
- ``ord-nosync``: ``ord-nowait`` with the semaphore signals traced out too (the writer
  warp still waits for each add to land before freeing its buffer);
- ``ord-noland``: ``ord-nosync`` with every wait for TMA stores relaxed to "read"
  (the writer frees its buffer once the adds have read it): what is left is the
  hand-over of the dQ slabs to the writer warp;
- ``ord-pP``: the package default with the adds into a query tile counted in P parts
  (``tuning.ORDERED_DQ_PARTS``: 2, one count per consumer slab; 4, per half slab);
- ``ord-cCwW``: chunks of C key blocks beside other pairs, about W CTAs together, at
  any key count, causal too (``ord-c64w128``: at 16k two pairs' halves start together);
  ``ord-pPcCwW`` both;
- ``ord-strideN``: the counts N 4-byte words apart (``tuning.ORDERED_SEM_STRIDE``; 32:
  one per 128-byte line, 1: packed);
- ``ord-downN``: causal, the last pairs (enough for N key blocks) launched heaviest
  block first, adding from the lowest block up (``tuning.ORDERED_DOWN_BLOCKS``;
  ``ord-down0``: none, ``ord-down1000000``: every pair);
- ``ord-pollfirst`` / ``ord-polllast``: the writer polls for its turn at a tile before /
  after the consumers' slabs of the tile are in (``tuning.ORDERED_POLL_FIRST``);
- ``ord-globalchunks``: the launch order of ``tuning.ORDERED_CHUNK`` for every head dim
  (``tuning.ORDERED_CHUNK_BY_HEAD_DIM`` emptied);
- ``ord-relaxed``: the counts' adds relaxed instead of release (a diagnostic: the order
  stays, but nothing then makes a block's dQ adds visible before its count);
- ``ord-readland``: every wait for TMA stores relaxed to "read" (a diagnostic: the
  writer counts its adds once they are read, not landed; the order may break);
- ``ord-poll0``: every wait polls for a count of 0, which holds at once (a diagnostic:
  the round trip stays, the order goes);
- ``ord-halfloads`` / ``fused-halfloads``: the ordered / unordered fused backward with
  only the first half of each Q and dO tile fetched (a diagnostic, the results are wrong).
  Meant to bound what halving the kernel's reads of those tiles from L2 would give; what
  it measures is mostly the data: the rows never fetched stay as shared memory held them,
  and with ``--zero-half`` (the same rows zero in the inputs, fetched whole) ours and
  cuDNN speed up alike (sixteenth session, RESULTS.md);
- ``mosaic``: the package default; ``mosaic-fused``: ``deterministic_backward=False``.

    python benchmarks/ordered_probe.py --head-dims 128 --causal no --seqlens 2048 4096 16384
"""

from __future__ import annotations

import argparse
import contextlib
import re
import sys
from unittest import mock

import bench
import jax
import jax.numpy as jnp
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_attention import tuning

VARIANTS = {
  "ord-headwise": lambda: _both(
    mock.patch.object(tuning, "ORDERED_CHUNK", 0),
    mock.patch.object(tuning, "ORDERED_CHUNK_BY_HEAD_DIM", {}),
  ),
  "ord-chunk8": lambda: _chunks(8),
  "ord-chunk4": lambda: _chunks(4),
  "ord-nowait": lambda: _no_wait(),
  "ord-nosync": lambda: _no_wait(signal=False),
  "ord-noland": lambda: _no_wait(signal=False, land=False),
  "ord-poll0": lambda: _poll_zero(),
  "ord-pollfirst": lambda: mock.patch.object(tuning, "ORDERED_POLL_FIRST", True),
  "ord-polllast": lambda: mock.patch.object(tuning, "ORDERED_POLL_FIRST", False),
  "ord-globalchunks": lambda: mock.patch.object(tuning, "ORDERED_CHUNK_BY_HEAD_DIM", {}),
  "ord-relaxed": lambda: _relaxed_signals(),
  "ord-readland": lambda: _read_only_stores(),
  "ord-halfloads": lambda: _half_loads(),
  "fused-halfloads": lambda: _half_loads(),
}


@contextlib.contextmanager
def _both(*contexts):
  with contextlib.ExitStack() as stack:
    for context in contexts:
      stack.enter_context(context)
    yield


@contextlib.contextmanager
def _poll_zero():
  """Each semaphore wait polls once for a count of 0 (which holds at once) and
  decrements nothing: the writer's round trip to the count stays, the order goes
  (a diagnostic, as ord-nowait)."""
  wait = plgpu.semaphore_wait

  def poll(sem, value, **kwargs):
    return wait(sem, 0, decrement=False, memory_scope=kwargs.get("memory_scope", "sys"))

  with mock.patch.object(plgpu, "semaphore_wait", poll):
    yield


@contextlib.contextmanager
def _relaxed_signals():
  """Every semaphore signal a relaxed add (Mosaic GPU's SemaphoreRef.signal, relaxed=True)."""
  from jax.experimental.mosaic.gpu import utils as mgpu_utils

  signal = mgpu_utils.SemaphoreRef.signal

  def relaxed(self, value, predicate=None, relaxed=False, memory_scope="sys"):
    del relaxed
    return signal(self, value, predicate, True, memory_scope)

  with mock.patch.object(mgpu_utils.SemaphoreRef, "signal", relaxed):
    yield


@contextlib.contextmanager
def _read_only_stores():
  """Every wait for TMA stores only waits until they are read."""
  wait_stores = plgpu.wait_smem_to_gmem

  def read_only(n, **_):
    return wait_stores(n, wait_read_only=True)

  with mock.patch.object(plgpu, "wait_smem_to_gmem", read_only):
    yield


@contextlib.contextmanager
def _half_loads():
  """The fused kernels' producer fetches the first half of the rows of each Q and dO tile
  (and whole lse and delta vectors); the other rows keep what the ring slot held."""
  from jax.experimental import pallas as pl

  from pallas_attention.mosaic import backward

  copy, produce = plgpu.copy_gmem_to_smem, backward._produce_query_tiles

  def half_copy(src, dst, barrier, **kwargs):
    if len(dst.shape) == 2:  # a Q or dO tile, not an lse or delta vector
      half = pl.ds(0, dst.shape[0] // 2)
      src, dst = src.at[half], dst.at[half]
    copy(src, dst, barrier, **kwargs)

  def half_produce(*args, **kwargs):
    with mock.patch.object(plgpu, "copy_gmem_to_smem", half_copy):
      produce(*args, **kwargs)

  with mock.patch.object(backward, "_produce_query_tiles", half_produce):
    yield


@contextlib.contextmanager
def _chunks(size: int, wave: int | None = None):
  with (
    mock.patch.object(tuning, "ORDERED_CHUNK", size),
    mock.patch.object(tuning, "ORDERED_CHUNK_MAX_KV", 1 << 20),
    mock.patch.object(tuning, "ORDERED_CHUNK_CAUSAL", True),
    mock.patch.object(tuning, "ORDERED_WAVE", wave or tuning.ORDERED_WAVE),
    mock.patch.object(tuning, "ORDERED_CHUNK_BY_HEAD_DIM", {}),
  ):
    yield


@contextlib.contextmanager
def _parts_and_chunks(parts: str, chunk: str, wave: str):
  with contextlib.ExitStack() as stack:
    if parts:
      stack.enter_context(mock.patch.object(tuning, "ORDERED_DQ_PARTS", int(parts)))
    if chunk:
      stack.enter_context(_chunks(int(chunk), int(wave)))
    yield


def variant(name: str):
  """The context of a probe variant, or None for a bench.py implementation."""
  if name in VARIANTS:
    return VARIANTS[name]()
  match = re.fullmatch(r"ord-stride(\d+)", name)
  if match:
    return mock.patch.object(tuning, "ORDERED_SEM_STRIDE", int(match.group(1)))
  match = re.fullmatch(r"ord-down(\d+)", name)
  if match:
    return mock.patch.object(tuning, "ORDERED_DOWN_BLOCKS", int(match.group(1)))
  match = re.fullmatch(r"ord-(?:p(\d+))?(?:c(\d+)w(\d+))?", name)
  if match and any(match.groups()):
    return _parts_and_chunks(*match.groups())
  return None


@contextlib.contextmanager
def _no_wait(signal: bool = True, land: bool = True):
  with contextlib.ExitStack() as stack:
    stack.enter_context(mock.patch.object(tuning, "ORDERED_CHUNK", 0))
    stack.enter_context(mock.patch.object(tuning, "ORDERED_CHUNK_BY_HEAD_DIM", {}))
    stack.enter_context(mock.patch.object(plgpu, "semaphore_wait", lambda *a, **k: None))
    if not signal:
      stack.enter_context(mock.patch.object(plgpu, "semaphore_signal", lambda *a, **k: None))
    if not land:
      stack.enter_context(_read_only_stores())
    yield


@contextlib.contextmanager
def applied(name: str):
  """``name``'s settings, yielding the bench.py implementation to call under them: a
  probe variant's (the ordered fused backward forced at every length, ``mosaic``), or
  bench.py's own (``bench._variant``)."""
  context = variant(name)
  if context is None:
    with bench._variant(name):
      yield name
    return
  jax.clear_caches()  # jit caches key on the Problem, not on the table
  try:
    if name.startswith("fused-"):  # the unordered fused backward
      with context:
        yield "mosaic-fused"
      return
    with bench._ordered_everywhere(), context:
      yield "mosaic"
  finally:
    jax.clear_caches()


def measure(name: str, seqlen: int, head_dim: int, causal: bool) -> float | str:
  if variant(name) is None:  # mosaic, mosaic-fused, cudnn, ...: failures become text
    return bench.measure(name, seqlen, head_dim, causal, True)
  args = bench.inputs(seqlen, head_dim)
  with applied(name) as impl:
    seconds = bench.time_fn(bench._fn(impl, causal, True), args)
  return bench.flops(seqlen, head_dim, causal, True) / seconds / 1e12


def _zero_half(inputs):
  def zeroed(*args, **kwargs):
    q, k, v, do = inputs(*args, **kwargs)
    keep = (jnp.arange(q.shape[1]) % 64 < 32)[None, :, None, None]
    return [q * keep, k, v, do * keep]

  return zeroed


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--head-dims", type=int, nargs="+", default=[128])
  parser.add_argument("--seqlens", type=int, nargs="+", default=[2048, 4096, 16384])
  parser.add_argument("--causal", choices=["no", "yes", "both"], default="no")
  parser.add_argument(
    "--impls",
    nargs="+",
    default=["ord-headwise", "ord-chunk8", "ord-chunk4", "ord-nowait", "mosaic-fused", "cudnn"],
    help=f"variants ({', '.join(VARIANTS)}) and bench.py implementations",
  )
  parser.add_argument(
    "--zero-half",
    action="store_true",
    help="Q and dO with the last 32 rows of every 64 zero (a diagnostic: the same work on "
    "data that costs the tensor cores less energy; ord-halfloads' tiles hold such rows)",
  )
  opts = parser.parse_args(argv)
  if opts.zero_half:
    bench.inputs = _zero_half(bench.inputs)
  causals = {"no": [False], "yes": [True], "both": [False, True]}[opts.causal]
  print(f"# {jax.devices()[0].device_kind}, jax {jax.__version__}, bf16, fwd+bwd TFLOP/s")
  results = []
  for head_dim in opts.head_dims:
    for causal in causals:
      for seqlen in opts.seqlens:
        row = {"head_dim": head_dim, "causal": causal, "pass": "fwd+bwd", "seqlen": seqlen}
        for name in opts.impls:
          row[name] = measure(name, seqlen, head_dim, causal)
          label = f"hd={head_dim} {'causal ' if causal else ''}{seqlen} {name}"
          print(f"{label} = {bench._number(row[name])}", file=sys.stderr, flush=True)
        results.append(row)
  print(bench.table(results, opts.impls))
  return 0


if __name__ == "__main__":
  sys.exit(main())

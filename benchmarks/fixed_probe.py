"""What the fused backward's fixed-point dQ adds cost, part by part.

A diagnostic for ``mosaic.backward._fused(adds="fixed")`` (benchmarks/RESULTS.md,
seventh session): times the backward kernels alone (``mosaic.backward.kernels``, bf16,
the protocol's shapes, XLA's scale and sum steps included) and prints ptxas' registers
and spills, for

- ``ordered``: the deterministic fused kernel with its adds ordered by semaphores;
- ``float``: deterministic_backward=False (float adds in any order);
- ``fixed``: fixed-point adds as built (``_fixed_point``: float additions and bit casts);
- ``fixed-cvt``: the same with the parts made by float-to-int conversions (three per
  element: the first version);
- ``fixed-bits``: the parts are the raw bits of the scaled share (wrong values): the
  adds' traffic and the row-scale loads without the arithmetic;
- ``fixed-bits-noload``: that, with the row scales a constant instead of loaded from
  global memory;
- ``fixed-bits-hi``: ``fixed-bits`` adding the high part only (half the traffic).

    python benchmarks/fixed_probe.py --head-dims 128 64 --seqlen 16384
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import os
import sys
from unittest import mock

os.environ["MOSAIC_GPU_DUMP_PTXAS"] = "1"  # before jax compiles anything

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from bench import flops, inputs  # noqa: E402
from compile_report import compile_and_time, summarize  # noqa: E402
from jax import lax  # noqa: E402

from pallas_attention import masks, tuning  # noqa: E402
from pallas_attention.mosaic import backward as bwd  # noqa: E402


def _converted(y):
  unit = float(1 << bwd._FIXED_LOW_BITS)
  hi = (y * (1.0 / unit)).astype(jnp.int32)
  return hi, (y - hi.astype(jnp.float32) * unit).astype(jnp.int32)


def _bits(y):
  bits = lax.bitcast_convert_type(y, jnp.int32)
  return bits, bits


VARIANTS = {
  "ordered": (True, "ordered", None),
  "float": (False, None, None),
  "fixed": (True, "fixed", None),
  "fixed-cvt": (True, "fixed", _converted),
  "fixed-bits": (True, "fixed", _bits),
  "fixed-bits-noload": (True, "fixed", _bits),
  "fixed-bits-hi": (True, "fixed", _bits),
}


def _no_scale_load():
  """plgpu.load of the row scales (the only unoptimized load) gives ones instead."""
  load = bwd.plgpu.load

  def patched(ref, idx=(), *, layout=None, optimized=True):
    if optimized is False:
      return bwd.plgpu.layout_cast(jnp.ones(ref.shape, jnp.float32), layout)
    return load(ref, idx, layout=layout, optimized=optimized)

  return mock.patch.object(bwd.plgpu, "load", patched)


def _high_part_only():
  """Every second int32 TMA add (the low parts: the kernel issues high, low) is left
  out."""
  copy, calls = bwd.plgpu.copy_smem_to_gmem, []

  def patched(src, dst, *args, **kwargs):
    if kwargs.get("reduction_op") == "add" and src.dtype == jnp.int32:
      calls.append(None)
      if len(calls) % 2 == 0:
        return None
    return copy(src, dst, *args, **kwargs)

  return mock.patch.object(bwd.plgpu, "copy_smem_to_gmem", patched)


PATCHES = {"fixed-bits-noload": _no_scale_load, "fixed-bits-hi": _high_part_only}


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--head-dims", type=int, nargs="+", default=[128])
  parser.add_argument("--seqlen", type=int, default=16384)
  parser.add_argument("--causal", choices=["no", "yes", "both"], default="both")
  parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
  opts = parser.parse_args(argv)
  t = opts.seqlen
  print(f"# {jax.devices()[0].device_kind}, jax {jax.__version__}, seqlen {t}")
  print("| head_dim | causal | dQ adds | TFLOP/s | ptxas (per kernel) |\n|---|---|---|---|---|")
  for h in opts.head_dims:
    q, k, v, do = inputs(t, h)
    b, _, n, _ = q.shape
    lse2 = jnp.full((b, n, t), 20.0, jnp.float32)  # sum p <= 1 for these inputs
    delta = jnp.full((b, n, t), 0.01, jnp.float32)
    for causal in {"no": [False], "yes": [True], "both": [False, True]}[opts.causal]:
      blocks = dataclasses.replace(tuning.mosaic_blocks(h, causal, t), **tuning._MOSAIC_FUSED[h])
      for name in opts.variants:
        deterministic, adds, parts = VARIANTS[name]
        options = dict(
          scale=h**-0.5,
          spec=masks.MaskSpec(causal),
          q_len=t,
          kv_len=t,
          blocks=blocks,
          p_in_registers=True,
          interpret=False,
          deterministic=deterministic,
          dq_adds=adds,
        )
        run = jax.jit(functools.partial(bwd.kernels, **options))
        work = flops(t, h, causal, True) / 3.5 * 2.5
        extra = PATCHES.get(name, contextlib.nullcontext)
        with mock.patch.object(bwd, "_fixed_point", parts or bwd._fixed_point), extra():
          tflops, text = compile_and_time(run, (q, k, v, do, lse2, delta), work)
        row = f"| {h} | {'yes' if causal else 'no'} | {name} | {tflops:.0f} |"
        print(f"{row} {' ; '.join(summarize(text))} |", flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())

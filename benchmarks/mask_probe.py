"""Does the masked-tile code cost the fused backward where almost nothing is masked?

A diagnostic for the causal backward's loss (benchmarks/RESULTS.md, fifth session): the
causal fused kernels spill registers that the non-causal ones do not. This times the
backward kernels alone (``mosaic.backward.kernels``; bf16, the protocol's shapes) at
one length, and prints ptxas' registers and spills for each, on three masks:

- ``full``: no mask, one loop over the query tiles;
- ``padded``: no causal mask, but one key fewer than the array holds (kv_len = S - 1):
  the masked-tile loops are compiled in and only the last key block's tiles are masked;
- ``causal``.

``ordered``: the deterministic fused kernel; ``unordered``: deterministic_backward=False.
TFLOP/s count the backward's 2.5 × 4·B·T·S·N·H FLOPs (halved when causal).

    python benchmarks/mask_probe.py --head-dim 128 --seqlen 16384
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

os.environ["MOSAIC_GPU_DUMP_PTXAS"] = "1"  # before jax compiles anything

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from bench import flops, inputs  # noqa: E402
from compile_report import compile_and_time, summarize  # noqa: E402

from pallas_attention import masks, tuning  # noqa: E402
from pallas_attention.mosaic import backward as bwd  # noqa: E402


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--head-dim", type=int, default=128)
  parser.add_argument("--seqlen", type=int, default=16384)
  opts = parser.parse_args(argv)
  h, t = opts.head_dim, opts.seqlen
  q, k, v, do = inputs(t, h)
  b, _, n, _ = q.shape
  lse2 = jnp.full((b, n, t), 20.0, jnp.float32)  # finite: the values do not matter here
  delta = jnp.full((b, n, t), 0.01, jnp.float32)
  print(f"# {jax.devices()[0].device_kind}, jax {jax.__version__}, head_dim {h}, seqlen {t}")
  print("| mask | backward | TFLOP/s | ptxas (per kernel) |\n|---|---|---|---|")
  for label, causal, kv_len in (("full", False, t), ("padded", False, t - 1), ("causal", True, t)):
    blocks = dataclasses.replace(tuning.mosaic_blocks(h, causal, t), **tuning._MOSAIC_FUSED[h])
    for deterministic in (True, False):
      run = jax.jit(
        lambda *a, causal=causal, kv_len=kv_len, blocks=blocks, det=deterministic: bwd.kernels(
          *a,
          scale=h**-0.5,
          spec=masks.MaskSpec(causal),
          q_len=t,
          kv_len=kv_len,
          blocks=blocks,
          p_in_registers=True,
          interpret=False,
          deterministic=det,
        )
      )
      work = flops(t, h, causal, True) / 3.5 * 2.5
      tflops, text = compile_and_time(run, (q, k, v, do, lse2, delta), work)
      name = "ordered" if deterministic else "unordered"
      print(f"| {label} | {name} | {tflops:.0f} | {' ; '.join(summarize(text))} |", flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())

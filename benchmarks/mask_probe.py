"""Does the masked-tile code cost the fused backward where almost nothing is masked?

A diagnostic for the causal backward's loss (benchmarks/RESULTS.md, fifth and sixth
sessions): the causal fused kernels spilled registers that the non-causal ones did not,
until masked and unmasked tiles shared one loop. This times the backward kernels alone
(``mosaic.backward.kernels``; bf16, the protocol's shapes) at one length, and prints
ptxas' registers and spills for each, on three masks:

- ``full``: no mask, no mask code compiled;
- ``padded``: no causal mask, but one key fewer than the array holds (kv_len = S - 1):
  the mask code is compiled in and only the last key block's tiles are masked;
- ``causal``.

``ordered``: the deterministic fused kernel; ``unordered``: deterministic_backward=False;
``two-kernel``: the dK/dV and dQ kernels (the default for causal head_dim 128 below 4k);
its ptxas entry lists the two kernels.
TFLOP/s count the backward's 2.5 × 4·B·T·S·N·H FLOPs (halved when causal).

    python benchmarks/mask_probe.py --head-dim 128 --seqlen 16384
    python benchmarks/mask_probe.py --masks full padded --backwards unordered --dump /tmp/d

``--dump DIR`` keeps each case's ptxas report with its PTX (and SASS, where an nvdisasm
is found: the device's CUDA packages had none, so the sixth session compiled the PTX
with a local ptxas and read it with PyPI's nvidia-cuda-nvdisasm) in
``DIR/<mask>_<backward>.txt``, for reading where the spills sit.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import sys

os.environ["MOSAIC_GPU_DUMP_PTXAS"] = "1"  # before jax compiles anything

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from bench import flops, inputs  # noqa: E402
from compile_report import _nvdisasm_root, compile_and_time, summarize  # noqa: E402

from pallas_attention import masks, tuning  # noqa: E402
from pallas_attention.mosaic import backward as bwd  # noqa: E402


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--head-dim", type=int, default=128)
  parser.add_argument("--seqlen", type=int, default=16384)
  parser.add_argument("--masks", nargs="+", default=["full", "padded", "causal"])
  parser.add_argument("--backwards", nargs="+", default=["ordered", "unordered", "two-kernel"])
  parser.add_argument("--dump", help="keep each case's ptxas report, PTX and SASS here")
  opts = parser.parse_args(argv)
  if opts.dump:
    from jax.experimental.mosaic import gpu as _  # noqa: F401 -- sets MOSAIC_GPU_CUDA_ROOT

    os.makedirs(opts.dump, exist_ok=True)
    os.environ["MOSAIC_GPU_DUMP_PTX"] = "1"
    root = _nvdisasm_root()
    if root is None:
      print("no nvdisasm found: no SASS", file=sys.stderr)
    else:
      os.environ["MOSAIC_GPU_CUDA_ROOT"] = root
      os.environ["MOSAIC_GPU_DUMP_SASS"] = "1"
  h, t = opts.head_dim, opts.seqlen
  q, k, v, do = inputs(t, h)
  b, _, n, _ = q.shape
  lse2 = jnp.full((b, n, t), 20.0, jnp.float32)  # finite: the values do not matter here
  delta = jnp.full((b, n, t), 0.01, jnp.float32)
  print(f"# {jax.devices()[0].device_kind}, jax {jax.__version__}, head_dim {h}, seqlen {t}")
  print("| mask | backward | TFLOP/s | ptxas (per kernel) |\n|---|---|---|---|")
  cases = (("full", False, t), ("padded", False, t - 1), ("causal", True, t))
  for label, causal, kv_len in (case for case in cases if case[0] in opts.masks):
    table = tuning.mosaic_blocks(h, causal, t)
    fused = dataclasses.replace(table, **tuning._MOSAIC_FUSED[h])
    two = dataclasses.replace(table, bwd_fused=False)
    for name, blocks, deterministic in (
      ("ordered", fused, True),
      ("unordered", fused, False),
      ("two-kernel", two, True),
    ):
      if name not in opts.backwards:
        continue
      options = dict(
        scale=h**-0.5,
        spec=masks.MaskSpec(causal),
        q_len=t,
        kv_len=kv_len,
        blocks=blocks,
        p_in_registers=True,
        interpret=False,
        deterministic=deterministic,
      )
      run = jax.jit(functools.partial(bwd.kernels, **options))
      work = flops(t, h, causal, True) / 3.5 * 2.5
      tflops, text = compile_and_time(run, (q, k, v, do, lse2, delta), work)
      print(f"| {label} | {name} | {tflops:.0f} | {' ; '.join(summarize(text))} |", flush=True)
      if opts.dump:
        with open(os.path.join(opts.dump, f"{label}_{name}.txt"), "w") as f:
          f.write(text)
  return 0


if __name__ == "__main__":
  sys.exit(main())

"""The fused mosaic backward (``bwd_fused``) against the two-kernel one and cuDNN.

Forward+backward TFLOP/s (protocol shapes and FLOP count of bench.py, bf16), one
jitted ``jax.vjp`` each, for: the mosaic default (deterministic, dK/dV and dQ
kernels), each fused variant below, and cuDNN, all in this process on this card.
Prints a Markdown table with each one's ratio to cuDNN.

    python benchmarks/fused_bench.py --head-dims 64 128 --seqlens 2048 4096 8192 16384
"""

from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp
from bench import _fn, flops, inputs, time_fn

from pallas_attention import core, masks, tuning
from pallas_attention.problem import Problem


def variants(head_dim: int) -> dict[str, tuning.MosaicBlocks]:
  """Fused blocks to time: a name -> blocks (the table's fused entry). Earlier runs
  also tried 3 stages (results/fused_1), a grid with key blocks outermost
  (results/fused_2) and causal key blocks paired in one CTA (results/fused_5); none
  won, and none is in the package."""
  if head_dim not in (64, 128):
    return {}
  return {"fused": tuning.mosaic_blocks(head_dim, fused=True)}


def _fused_fn(blocks, causal: bool, head_dim: int, seqlen: int):
  problem = Problem(head_dim**-0.5, masks.MaskSpec(causal=causal), "mosaic", blocks)

  def attn(q, k, v):
    lengths = jnp.full((q.shape[0],), seqlen, jnp.int32)
    return core.attention(problem, q, k, v, None, None, lengths, lengths)[0]

  def fwd_bwd(q, k, v, do):
    out, vjp = jax.vjp(attn, q, k, v)
    return out, vjp(do)

  return jax.jit(fwd_bwd)


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--head-dims", type=int, nargs="+", default=[64, 128])
  parser.add_argument("--seqlens", type=int, nargs="+", default=[2048, 4096, 8192, 16384])
  parser.add_argument("--causal", choices=["no", "yes", "both"], default="both")
  parser.add_argument("--json", help="write the rows here")
  opts = parser.parse_args()
  causals = {"no": [False], "yes": [True], "both": [False, True]}[opts.causal]
  device = jax.devices()[0].device_kind
  rows = []
  for head_dim in opts.head_dims:
    names = list(variants(head_dim))
    print(f"\n{device}, jax {jax.__version__}, fwd+bwd TFLOP/s (x cuDNN), head_dim {head_dim}")
    print("| causal | seqlen | cuDNN | mosaic | " + " | ".join(names) + " |")
    print("|---|---|---|---|" + "---|" * len(names), flush=True)
    for causal in causals:
      for seqlen in opts.seqlens:
        args = inputs(seqlen, head_dim)
        work = flops(seqlen, head_dim, causal, True)
        fns = {"cuDNN": _fn("cudnn", causal, True), "mosaic": _fn("mosaic", causal, True)}
        for name, blocks in variants(head_dim).items():
          fns[name] = _fused_fn(blocks, causal, head_dim, seqlen)
        row = dict(head_dim=head_dim, causal=causal, seqlen=seqlen, device=device)
        for name, fn in fns.items():
          try:
            row[name] = work / time_fn(fn, args) / 1e12
          except Exception as err:  # noqa: BLE001 -- record and go on
            row[name] = f"error: {str(err).splitlines()[0][:80]}"
        rows.append(row)
        base = row["cuDNN"]
        cells = [f"{row['cuDNN']:.0f}" if isinstance(base, float) else base]
        for name in ["mosaic", *names]:
          x = row[name]
          cells.append(
            f"{x:.0f} ({x / base:.2f})" if isinstance(x, float) and isinstance(base, float) else x
          )
        print(f"| {'yes' if causal else 'no'} | {seqlen} | " + " | ".join(cells) + " |", flush=True)
  if opts.json:
    with open(opts.json, "w") as f:
      json.dump(rows, f, indent=1)


if __name__ == "__main__":
  main()

"""How much the last, partly filled wave of CTAs costs: the same length at several head counts.

At head_dim 128 the protocol's shapes launch 2048 forward CTAs (128 query rows each) and
2048 backward CTAs (128 key rows each) at every length: 15.5 waves on the H100's and the
H200's 132 SMs (one CTA an SM), so the last wave runs half full. With 33 heads (4224
CTAs, 32 waves) it is full. This times ours and cuDNN at head counts around 16 and
prints TFLOP/s (forward, backward alone = fwd+bwd minus forward, fwd+bwd) with the wave
count of each kernel, one line per point as measured, then a table.

    python benchmarks/waves_probe.py --seqlens 16384 4096 --heads 16 33 --impls mosaic cudnn
"""

from __future__ import annotations

import argparse
import sys

import bench
import jax


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--seqlens", type=int, nargs="+", default=[16384, 4096])
  parser.add_argument("--heads", type=int, nargs="+", default=[16, 33])
  parser.add_argument("--head-dim", type=int, default=128)
  parser.add_argument("--causal", choices=["no", "yes"], default="no")
  parser.add_argument("--impls", nargs="+", default=["mosaic", "cudnn"])
  parser.add_argument("--tokens", type=int, default=bench.TOKENS)
  args = parser.parse_args(argv)
  bench.TOKENS = args.tokens
  causal = args.causal == "yes"
  sms = jax.devices()[0].core_count if hasattr(jax.devices()[0], "core_count") else 132
  rows = []
  for seqlen in args.seqlens:
    batch = bench.batch_size(seqlen)
    for heads in args.heads:
      data = bench.inputs(seqlen, args.head_dim, heads=heads)
      fwd_flops = bench.flops(seqlen, args.head_dim, causal, False, heads=heads)
      ctas = batch * heads * seqlen // 128
      row = dict(seqlen=seqlen, heads=heads, batch=batch, waves=ctas / sms)
      for impl in args.impls:
        with bench._variant(impl):
          fwd = bench.time_fn(bench._fn(impl, causal, False), data)
          both = bench.time_fn(bench._fn(impl, causal, True), data)
        row[impl] = (fwd_flops / fwd / 1e12, 2.5 * fwd_flops / (both - fwd) / 1e12)
        row[impl] += (3.5 * fwd_flops / both / 1e12,)
        print(seqlen, heads, impl, *(f"{x:.0f}" for x in row[impl]), file=sys.stderr, flush=True)
      rows.append(row)
  device = jax.devices()[0].device_kind
  print(f"# {device}, jax {jax.__version__}, bf16, head_dim {args.head_dim}, causal {causal}")
  print("TFLOP/s fwd / bwd (fwd+bwd minus fwd) / fwd+bwd; waves = CTAs of 128 rows / SMs")
  head = ["seqlen", "batch", "heads", "waves"] + args.impls
  if "cudnn" in args.impls:
    head += [f"{impl}/cuDNN" for impl in args.impls if impl != "cudnn"]
  print("| " + " | ".join(head) + " |")
  print("|" + "---|" * len(head))
  for row in rows:
    cells = [row["seqlen"], row["batch"], row["heads"], f"{row['waves']:.2f}"]
    cells += [" / ".join(f"{x:.0f}" for x in row[impl]) for impl in args.impls]
    if "cudnn" in args.impls:
      base = row["cudnn"]
      for impl in args.impls:
        if impl != "cudnn":
          cells.append(" / ".join(f"{a / b:.3f}" for a, b in zip(row[impl], base, strict=True)))
    print("| " + " | ".join(str(c) for c in cells) + " |")
  return 0


if __name__ == "__main__":
  sys.exit(main())

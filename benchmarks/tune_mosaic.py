"""Sweep the Mosaic GPU kernels' blocks on the current GPU: forward and backward timed alone.

The candidates are tuning.mosaic_candidates (the same the opt-in autotuner tries).
Prints, per head dim and causal, each candidate's TFLOP/s (protocol shapes, bf16),
best first, then a line ``BEST ...`` per part. Winners go into tuning.py by hand.

    python benchmarks/tune_mosaic.py --head-dims 64 128 256 --seqlen 4096
"""

from __future__ import annotations

import argparse

import jax
from bench import flops, inputs, time_fn

from pallas_attention import core, masks, tiles, tuning
from pallas_attention.mosaic import attention as mosaic
from pallas_attention.problem import Problem


def _timer(blocks, seqlen, head_dim, causal, part):
  q, k, v, do = inputs(seqlen, head_dim)
  problem = Problem(head_dim**-0.5, masks.MaskSpec(causal=causal), "mosaic", blocks)
  forward = jax.jit(lambda q, k, v: mosaic.forward(problem, q, k, v, None, None, None, None))
  if part == "fwd":
    return time_fn(forward, (q, k, v))
  out, lse2 = forward(q, k, v)
  delta = core.row_delta(out, do)
  lse2 = tiles.backward_lse(lse2)
  backward = jax.jit(lambda *a: mosaic.backward(problem, q, k, v, None, None, None, None, *a))
  return time_fn(backward, (do, lse2, delta))


def split_times(head_dim, seqlen, causal):
  """Milliseconds of the forward, the dK/dV kernel and the dQ kernel with the table's blocks."""
  from pallas_attention.mosaic import backward as bwd
  from pallas_attention.mosaic import forward as fwd

  q, k, v, do = inputs(seqlen, head_dim)
  blocks = tuning.mosaic_blocks(head_dim, causal, seqlen)
  spec = masks.MaskSpec(causal=causal)
  static = dict(scale=head_dim**-0.5, spec=spec, q_len=seqlen, kv_len=seqlen)
  options = blocks.forward_options()
  forward = jax.jit(lambda q, k, v: fwd.forward(q, k, v, **static, **options))
  out, lse2 = forward(q, k, v)
  delta = core.row_delta(out, do)
  args = (q, k, v, do, lse2, delta)
  common = (static["scale"], spec, seqlen, seqlen, blocks, True)
  dkv_kernel = bwd._dkv_split if blocks.dkv_split else bwd._dkv
  dkv = jax.jit(lambda *a: dkv_kernel(*a, *common))
  dq = jax.jit(lambda *a: bwd._dq(*a, *common))
  return {
    "fwd": time_fn(forward, (q, k, v)) * 1e3,
    "dkv": time_fn(dkv, args) * 1e3,
    "dq": time_fn(dq, args) * 1e3,
  }


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--head-dims", type=int, nargs="+", default=[64, 128, 256])
  parser.add_argument("--seqlen", type=int, default=4096)
  parser.add_argument("--causal", choices=["no", "yes", "both"], default="both")
  parser.add_argument("--parts", nargs="+", default=["fwd", "bwd"])
  parser.add_argument(
    "--fwd-kv",
    type=int,
    nargs="+",
    help="forward key-tile rows to try (default: tuning.mosaic_candidates')",
  )
  opts = parser.parse_args()
  causals = {"no": [False], "yes": [True], "both": [False, True]}[opts.causal]
  if opts.parts == ["split"]:
    for head_dim in opts.head_dims:
      for causal in causals:
        ms = split_times(head_dim, opts.seqlen, causal)
        # Tile products each kernel runs, each 2·B·T·S·N·H FLOPs (halved when causal):
        # forward QKᵀ, PV; dK/dV KQᵀ, VdOᵀ, PᵀdO, dSᵀQ; dQ QKᵀ, dOVᵀ, dSK.
        product = flops(opts.seqlen, head_dim, causal, False) / 2
        products = {"fwd": 2, "dkv": 4, "dq": 3}
        cells = ", ".join(
          f"{name} {t:.2f} ms ({products[name] * product / t / 1e9:.0f} TFLOP/s of products)"
          for name, t in ms.items()
        )
        print(f"SPLIT hd={head_dim} causal={causal} seqlen={opts.seqlen}: {cells}", flush=True)
    return
  print(f"# {jax.devices()[0].device_kind}, jax {jax.__version__}, seqlen {opts.seqlen}")
  for head_dim in opts.head_dims:
    for causal in causals:
      for part in opts.parts:
        work = flops(opts.seqlen, head_dim, causal, False) * (1.0 if part == "fwd" else 2.5)
        rows = []
        extra = {"fwd_kv": tuple(opts.fwd_kv)} if opts.fwd_kv else {}
        for blocks in tuning.mosaic_candidates(head_dim, part, **extra):
          try:
            seconds = _timer(blocks, opts.seqlen, head_dim, causal, part)
            rows.append((work / seconds / 1e12, blocks))
          except Exception as err:  # noqa: BLE001 -- a sweep records failures and goes on
            print(f"  fail {blocks}: {str(err).splitlines()[0][:100]}", flush=True)
        rows.sort(key=lambda r: -r[0])
        for tflops, blocks in rows:
          print(f"  {part} hd={head_dim} causal={causal}: {tflops:6.1f} TFLOP/s {blocks}")
        if rows:
          print(f"BEST {part} hd={head_dim} causal={causal}: {rows[0][0]:.1f} {rows[0][1]}")
          print(f"  table entry {tuning.mosaic_blocks(head_dim)}", flush=True)


if __name__ == "__main__":
  main()

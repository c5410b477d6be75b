"""GQA forward on Hopper: the mosaic forward with and without ``fwd_head_pairs`` against cuDNN.

``fwd_head_pairs`` (tuning.MosaicBlocks) gives one CTA two query heads that share a
key/value head, so each K/V tile it loads serves both. Protocol shapes (bf16,
batch·seqlen = 16384, N = 2048 / head_dim query heads) with K = N / group key/value
heads; forward FLOPs as in bench.py (the query heads' work). Prints a Markdown table.

    python benchmarks/gqa_bench.py --head-dims 64 128 --seqlens 4096 16384 --groups 4 8
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

import jax
import jax.numpy as jnp
from bench import TOKENS, flops, time_fn

from pallas_attention import masks, tuning
from pallas_attention.mosaic import attention as mosaic
from pallas_attention.problem import Problem


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--head-dims", type=int, nargs="+", default=[64, 128])
  parser.add_argument("--seqlens", type=int, nargs="+", default=[4096, 16384])
  parser.add_argument("--groups", type=int, nargs="+", default=[4, 8])
  parser.add_argument("--causal", choices=["no", "yes", "both"], default="both")
  opts = parser.parse_args(argv)
  causals = {"no": [False], "yes": [True], "both": [False, True]}[opts.causal]
  print(f"# {jax.devices()[0].device_kind}, jax {jax.__version__}: GQA forward, TFLOP/s")
  print()
  print(
    "| head_dim | group | causal | seqlen | mosaic | mosaic, head pairs | cuDNN "
    "| pairs / plain | pairs / cuDNN | max abs diff |"
  )
  print("|---|---|---|---|---|---|---|---|---|---|")
  for head_dim in opts.head_dims:
    heads = 2048 // head_dim
    for group in opts.groups:
      for causal in causals:
        for seqlen in opts.seqlens:
          batch = max(1, TOKENS // seqlen)
          keys = jax.random.split(jax.random.key(seqlen + group), 3)
          q = jax.random.normal(keys[0], (batch, seqlen, heads, head_dim), jnp.bfloat16)
          k, v = (
            jax.random.normal(x, (batch, seqlen, heads // group, head_dim), jnp.bfloat16)
            for x in keys[1:]
          )
          work = flops(seqlen, head_dim, causal, False)
          base = tuning.mosaic_blocks(head_dim, causal, seqlen)
          outs, rates = [], []
          for pairs in (False, True):
            blocks = dataclasses.replace(base, fwd_head_pairs=pairs)
            problem = Problem(head_dim**-0.5, masks.MaskSpec(causal=causal), "mosaic", blocks)
            fn = jax.jit(
              lambda q, k, v, p=problem: mosaic.forward(p, q, k, v, None, None, None, None)[0]
            )
            outs.append(fn(q, k, v))
            rates.append(work / time_fn(fn, (q, k, v)) / 1e12)
          cudnn = jax.jit(
            lambda q, k, v, c=causal: jax.nn.dot_product_attention(
              q, k, v, is_causal=c, implementation="cudnn"
            )
          )
          rates.append(work / time_fn(cudnn, (q, k, v)) / 1e12)
          diff = float(jnp.max(jnp.abs(outs[0].astype(jnp.float32) - outs[1].astype(jnp.float32))))
          print(
            f"| {head_dim} | {group} | {'yes' if causal else 'no'} | {seqlen} | "
            f"{rates[0]:.0f} | {rates[1]:.0f} | {rates[2]:.0f} | {rates[1] / rates[0]:.3f} | "
            f"{rates[1] / rates[2]:.2f} | {diff:.3g} |",
            flush=True,
          )
  return 0


if __name__ == "__main__":
  sys.exit(main())

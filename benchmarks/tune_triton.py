"""Sweep Triton block sizes on the current GPU: forward and backward kernels timed alone.

Prints, per head dim, each candidate's time and TFLOP/s (protocol shapes, bf16),
best first. The winners go into pallas_attention/tuning.py by hand.

    python benchmarks/tune_triton.py --head-dims 64 128 --seqlen 16384
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools

import jax
import jax.numpy as jnp
from bench import flops, inputs, time_fn

from pallas_attention import core, masks, tiles, tuning
from pallas_attention.problem import Problem
from pallas_attention.triton import attention as triton_attention


def _problem(head_dim, causal, blocks):
  return Problem(1.0 / head_dim**0.5, masks.MaskSpec(causal=causal), "triton", blocks)


def time_forward(blocks, seqlen, head_dim, causal):
  q, k, v, _ = inputs(seqlen, head_dim)
  b = q.shape[0]
  lens = jnp.full((b,), seqlen, jnp.int32)
  problem = _problem(head_dim, causal, blocks)
  fn = jax.jit(lambda q, k, v: triton_attention.forward(problem, q, k, v, None, None, lens, lens))
  return time_fn(fn, (q, k, v))


def time_backward(blocks, seqlen, head_dim, causal):
  q, k, v, do = inputs(seqlen, head_dim)
  b, _, n, _ = q.shape
  lens = jnp.full((b,), seqlen, jnp.int32)
  problem = _problem(head_dim, causal, blocks)
  out, lse2 = jax.jit(
    lambda q, k, v: triton_attention.forward(problem, q, k, v, None, None, lens, lens)
  )(q, k, v)
  delta = core.row_delta(out, do)
  lse2 = tiles.backward_lse(lse2)
  fn = jax.jit(
    lambda q, k, v, do, lse2, delta: triton_attention.backward(
      problem, q, k, v, None, None, lens, lens, do, lse2, delta
    )
  )
  return time_fn(fn, (q, k, v, do, lse2, delta))


def sweep(label, candidates, timer, seqlen, head_dim, causal, fwd_flops):
  rows = []
  for blocks in candidates:
    try:
      seconds = timer(blocks, seqlen, head_dim, causal)
      rows.append((seconds, blocks))
    except Exception as err:  # noqa: BLE001 -- a sweep records failures and goes on
      print(f"  {label} {blocks}: {type(err).__name__}: {str(err).splitlines()[0][:100]}")
  rows.sort(key=lambda r: r[0])
  for seconds, blocks in rows:
    print(f"  {label} {seconds * 1e3:8.3f} ms {fwd_flops / seconds / 1e12:6.0f} TFLOP/s  {blocks}")
  return rows[0][1] if rows else None


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--head-dims", type=int, nargs="+", default=[64, 128])
  parser.add_argument("--seqlen", type=int, default=16384)
  parser.add_argument("--causal", action="store_true")
  opts = parser.parse_args()
  print(f"# {jax.devices()[0].device_kind}, jax {jax.__version__}")
  for head_dim in opts.head_dims:
    base = tuning.triton_blocks(head_dim)
    fwd = flops(opts.seqlen, head_dim, opts.causal, False)
    print(f"head_dim {head_dim}, seqlen {opts.seqlen}, causal {opts.causal}")
    fwd_candidates = [
      dataclasses.replace(base, fwd_q=bq, fwd_k=bk, fwd_warps=w, fwd_stages=st)
      for bq, bk, w, st in itertools.product((64, 128), (64, 128), (4, 8), (2, 3))
      if bq * bk * head_dim <= 128 * 128 * 128
    ]
    best_fwd = sweep("fwd", fwd_candidates, time_forward, opts.seqlen, head_dim, opts.causal, fwd)
    dkv_candidates = [
      dataclasses.replace(base, dkv_q=bq, dkv_k=bk, dkv_warps=w, dkv_stages=st)
      for bq, bk, w, st in itertools.product((32, 64, 128), (64, 128), (4, 8), (2, 3))
      if bq * bk * head_dim <= 64 * 128 * 128
    ]
    best_dkv = sweep(
      "dkv+dq", dkv_candidates, time_backward, opts.seqlen, head_dim, opts.causal, 2.5 * fwd
    )
    if best_dkv is None:
      continue
    dq_candidates = [
      dataclasses.replace(best_dkv, dq_q=bq, dq_k=bk, dq_warps=w, dq_stages=st)
      for bq, bk, w, st in itertools.product((64, 128), (32, 64, 128), (4, 8), (2, 3))
      if bq * bk * head_dim <= 128 * 64 * 128
    ]
    best_bwd = sweep(
      "dkv+dq", dq_candidates, time_backward, opts.seqlen, head_dim, opts.causal, 2.5 * fwd
    )
    print(f"BEST head_dim {head_dim}: fwd {best_fwd}\n  bwd {best_bwd}")


if __name__ == "__main__":
  main()

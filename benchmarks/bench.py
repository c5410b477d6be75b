"""Attention throughput on the current device: ours against cuDNN and XLA, same run.

Protocol (FlashAttention papers, shared/DESIGN.md): bf16, batch·seqlen = 16384,
heads = 2048 / head_dim; forward FLOPs 4·B·T·S·N·H (halved when causal),
forward+backward 3.5× that. Prints a Markdown table of TFLOP/s and the ratio to
cuDNN; ``--json`` also writes every number.

    python benchmarks/bench.py --seqlens 1024 4096 16384 --head-dims 64 128
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from pallas_attention import flash_attention


def _fn(impl: str, causal: bool, backward: bool):
  """A jitted function of (q, k, v, do) for one implementation and pass."""
  if impl in ("cudnn", "xla-dense"):
    name = "cudnn" if impl == "cudnn" else "xla"

    def attn(q, k, v):
      return jax.nn.dot_product_attention(q, k, v, is_causal=causal, implementation=name)
  else:

    def attn(q, k, v):
      return flash_attention(q, k, v, is_causal=causal, implementation=impl)

  if not backward:
    return jax.jit(lambda q, k, v, do: attn(q, k, v))

  def fwd_bwd(q, k, v, do):
    out, vjp = jax.vjp(attn, q, k, v)
    return out, vjp(do)

  return jax.jit(fwd_bwd)


def time_fn(fn, args, rounds: int = 5, round_seconds: float = 0.1) -> float:
  """Median seconds per call: calls queued back to back, timed per round.

  Each round queues enough calls to last about ``round_seconds`` (at most 20),
  so slow baselines cost a few calls and fast kernels hide dispatch overhead.
  """
  jax.block_until_ready(fn(*args))
  start = time.perf_counter()
  jax.block_until_ready(fn(*args))
  reps = int(min(20, max(1, round_seconds / (time.perf_counter() - start))))
  per_call = []
  for _ in range(rounds):
    start = time.perf_counter()
    out = None
    for _ in range(reps):
      out = fn(*args)
    jax.block_until_ready(out)
    per_call.append((time.perf_counter() - start) / reps)
  return statistics.median(per_call)


def inputs(seqlen: int, head_dim: int, seed: int = 0):
  batch = max(1, 16384 // seqlen)
  heads = 2048 // head_dim
  keys = jax.random.split(jax.random.key(seed), 4)
  shape = (batch, seqlen, heads, head_dim)
  return [jax.random.normal(key, shape, jnp.bfloat16) for key in keys]


def flops(seqlen: int, head_dim: int, causal: bool, backward: bool) -> float:
  batch, heads = max(1, 16384 // seqlen), 2048 // head_dim
  fwd = 4.0 * batch * seqlen * seqlen * heads * head_dim / (2 if causal else 1)
  return fwd * (3.5 if backward else 1.0)


def measure(impl, seqlen, head_dim, causal, backward) -> float | str:
  """TFLOP/s, or a short reason it did not run."""
  args = inputs(seqlen, head_dim)
  try:
    seconds = time_fn(_fn(impl, causal, backward), args)
  except Exception as err:  # noqa: BLE001 -- a benchmark records failures and goes on
    text = str(err).split("\n")[0]
    if "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower():
      return "OOM"
    return f"error: {type(err).__name__}: {text[:80]}"
  return flops(seqlen, head_dim, causal, backward) / seconds / 1e12


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--seqlens", type=int, nargs="+", default=[1024, 4096, 16384])
  parser.add_argument("--head-dims", type=int, nargs="+", default=[64, 128])
  parser.add_argument("--causal", choices=["no", "yes", "both"], default="both")
  parser.add_argument("--passes", choices=["fwd", "fwd+bwd", "both"], default="both")
  parser.add_argument("--impls", nargs="+", default=["triton", "cudnn", "xla-dense"])
  parser.add_argument("--json", help="write all results to this file")
  opts = parser.parse_args(argv)

  causals = {"no": [False], "yes": [True], "both": [False, True]}[opts.causal]
  passes = {"fwd": [False], "fwd+bwd": [True], "both": [False, True]}[opts.passes]
  device = jax.devices()[0]
  print(f"# {device.device_kind}, jax {jax.__version__}, bf16, TFLOP/s", flush=True)
  results = []
  for head_dim in opts.head_dims:
    for causal in causals:
      for backward in passes:
        for seqlen in opts.seqlens:
          row = {
            "head_dim": head_dim,
            "causal": causal,
            "pass": "fwd+bwd" if backward else "fwd",
            "seqlen": seqlen,
          }
          for impl in opts.impls:
            row[impl] = measure(impl, seqlen, head_dim, causal, backward)
          results.append(row)
          print(json.dumps(row), file=sys.stderr, flush=True)

  print(table(results, opts.impls))
  if opts.json:
    with open(opts.json, "w") as f:
      json.dump(
        {"device": device.device_kind, "jax": jax.__version__, "results": results}, f, indent=1
      )
  return 0


def table(results, impls) -> str:
  lines = [
    "| head_dim | causal | pass | seqlen | "
    + " | ".join(impls)
    + " | "
    + " | ".join(f"{i}/cuDNN" for i in impls if i != "cudnn")
    + " |"
  ]
  lines.append("|" + "---|" * (4 + len(impls) + len([i for i in impls if i != "cudnn"])))
  for row in results:
    cells = [row[i] for i in impls]
    shown = [f"{c:.0f}" if isinstance(c, float) else c for c in cells]
    ratios = []
    for impl in impls:
      if impl == "cudnn":
        continue
      a, c = row[impl], row.get("cudnn")
      ratios.append(f"{a / c:.2f}" if isinstance(a, float) and isinstance(c, float) else "-")
    lines.append(
      f"| {row['head_dim']} | {'yes' if row['causal'] else 'no'} | {row['pass']} | "
      f"{row['seqlen']} | " + " | ".join(shown) + " | " + " | ".join(ratios) + " |"
    )
  return "\n".join(lines)


if __name__ == "__main__":
  np.set_printoptions(precision=3)
  sys.exit(main())

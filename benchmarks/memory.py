"""Peak device memory of one forward+backward against sequence length.

Each measurement runs in its own process so that the allocator's peak belongs to
that call alone. B = 1, N = 16, H = 128, bf16, non-causal, as in the issue.

    python benchmarks/memory.py --seqlens 4096 16384 32768
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys


def child(impl: str, seqlen: int) -> None:
  import jax
  import jax.numpy as jnp

  from pallas_attention import flash_attention

  shape = (1, seqlen, 16, 128)
  keys = jax.random.split(jax.random.key(0), 4)
  q, k, v, do = (jax.random.normal(key, shape, jnp.bfloat16) for key in keys)
  if impl == "xla-dense":
    attn = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, implementation="xla")  # noqa: E731
  else:
    attn = lambda q, k, v: flash_attention(q, k, v, implementation=impl)  # noqa: E731

  @jax.jit
  def fwd_bwd(q, k, v, do):
    out, vjp = jax.vjp(attn, q, k, v)
    return out, vjp(do)

  try:
    jax.block_until_ready(fwd_bwd(q, k, v, do))
    peak = jax.devices()[0].memory_stats()["peak_bytes_in_use"]
    print(json.dumps({"peak_bytes": peak}))
  except Exception as err:  # noqa: BLE001 -- reported to the parent
    kind = "OOM" if "RESOURCE_EXHAUSTED" in str(err) else type(err).__name__
    print(json.dumps({"error": kind}))


def main() -> int:
  parser = argparse.ArgumentParser()
  parser.add_argument("--seqlens", type=int, nargs="+", default=[4096, 16384, 32768])
  parser.add_argument("--impls", nargs="+", default=["triton", "xla", "xla-dense"])
  parser.add_argument("--child", nargs=2, metavar=("IMPL", "SEQLEN"))
  opts = parser.parse_args()
  if opts.child:
    child(opts.child[0], int(opts.child[1]))
    return 0
  rows = []
  for seqlen in opts.seqlens:
    row = {"seqlen": seqlen}
    for impl in opts.impls:
      proc = subprocess.run(
        [sys.executable, __file__, "--child", impl, str(seqlen)],
        capture_output=True,
        text=True,
        check=False,
      )
      lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
      result = json.loads(lines[-1]) if lines else {"error": f"exit {proc.returncode}"}
      row[impl] = (
        f"{result['peak_bytes'] / 2**30:.2f} GiB" if "peak_bytes" in result else result["error"]
      )
      print(json.dumps({"seqlen": seqlen, "impl": impl, **result}), file=sys.stderr, flush=True)
    rows.append(row)
  print("| seqlen | " + " | ".join(opts.impls) + " |")
  print("|---|" + "---|" * len(opts.impls))
  for row in rows:
    print(f"| {row['seqlen']} | " + " | ".join(row[i] for i in opts.impls) + " |")
  return 0


if __name__ == "__main__":
  sys.exit(main())

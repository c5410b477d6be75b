"""Peak device memory of one forward+backward against sequence length: ours against XLA's
dense attention (linear against quadratic), up to the longest length that fits.

Each measurement runs in its own process so that the allocator's peak belongs to that
call alone. B = 1, N = 16 heads, head_dim 128, bf16, non-causal. Lengths double from
``--start`` until every implementation has run out of memory or ``--max`` is reached;
after an implementation runs out it is not tried at longer lengths.

    python benchmarks/memory.py --out results/        # memory.json, memory.md, memory.png
    python benchmarks/memory.py --seqlens 4096 16384  # chosen lengths only
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

SHAPE_NOTE = "B=1, N=16, head_dim 128, bf16, forward+backward"


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
    name = None if impl == "ours" else impl
    attn = lambda q, k, v: flash_attention(q, k, v, implementation=name)  # noqa: E731

  @jax.jit
  def fwd_bwd(q, k, v, do):
    out, vjp = jax.vjp(attn, q, k, v)
    return out, vjp(do)

  stats = jax.devices()[0].memory_stats() or {}
  try:
    jax.block_until_ready(fwd_bwd(q, k, v, do))
    stats = jax.devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" not in stats:
      print(json.dumps({"error": "no memory_stats on this device"}))
      return
    print(json.dumps({"peak_bytes": stats["peak_bytes_in_use"], "limit": stats.get("bytes_limit")}))
  except Exception as err:  # noqa: BLE001 -- reported to the parent
    text = str(err)
    oom = "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower()
    print(
      json.dumps({"error": "OOM" if oom else type(err).__name__, "limit": stats.get("bytes_limit")})
    )


def measure(impl: str, seqlen: int) -> dict:
  proc = subprocess.run(
    [sys.executable, __file__, "--child", impl, str(seqlen)],
    capture_output=True,
    text=True,
    check=False,
  )
  lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
  return json.loads(lines[-1]) if lines else {"error": f"exit {proc.returncode}"}


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--seqlens", type=int, nargs="+", help="default: doubling from --start")
  parser.add_argument("--start", type=int, default=1024)
  parser.add_argument("--max", type=int, default=1 << 20)
  parser.add_argument(
    "--impls", nargs="+", default=["ours", "xla-dense"], help="ours = implementation=None"
  )
  parser.add_argument("--out", help="write memory.json, memory.md and memory.png here")
  parser.add_argument("--child", nargs=2, metavar=("IMPL", "SEQLEN"))
  opts = parser.parse_args()
  if opts.child:
    child(opts.child[0], int(opts.child[1]))
    return 0
  import jax

  device = jax.devices()[0].device_kind
  seqlens = opts.seqlens or []
  if not seqlens:
    n = opts.start
    while n <= opts.max:
      seqlens.append(n)
      n *= 2
  rows, done, limit = [], set(), None
  for seqlen in seqlens:
    if done >= set(opts.impls):
      break
    row = {"seqlen": seqlen}
    for impl in opts.impls:
      if impl in done:
        continue
      result = measure(impl, seqlen)
      limit = result.get("limit") or limit
      if "peak_bytes" in result:
        row[impl] = result["peak_bytes"]
      else:
        row[impl] = result["error"]
        done.add(impl)
      print(json.dumps({"seqlen": seqlen, "impl": impl, **result}), file=sys.stderr, flush=True)
    rows.append(row)
  lines = [f"# {device}, jax {jax.__version__}: peak memory, {SHAPE_NOTE}", ""]
  lines += ["| seqlen | " + " | ".join(opts.impls) + " |", "|---|" + "---|" * len(opts.impls)]
  for row in rows:
    cells = [row.get(i, "-") for i in opts.impls]
    cells = [f"{c / 2**30:.2f} GiB" if isinstance(c, int) else c for c in cells]
    lines.append(f"| {row['seqlen']} | " + " | ".join(cells) + " |")
  text = "\n".join(lines)
  print(text)
  if opts.out:
    os.makedirs(opts.out, exist_ok=True)
    record = {
      "kind": "memory",
      "device": device,
      "jax": jax.__version__,
      "date": time.strftime("%Y-%m-%d"),
      "command": " ".join(["python", *sys.argv]),
      "shape_note": SHAPE_NOTE,
      "impls": opts.impls,
      "results": rows,
    }
    if limit:
      record["capacity_bytes"] = limit
    with open(os.path.join(opts.out, "memory.json"), "w") as f:
      json.dump(record, f, indent=1)
    with open(os.path.join(opts.out, "memory.md"), "w") as f:
      f.write(text + "\n")
    try:
      import plot
    except ImportError as err:
      print(f"no plot ({err}); run benchmarks/plot.py on memory.json", file=sys.stderr)
    else:
      plot.memory(record, os.path.join(opts.out, "memory.png"))
  return 0


if __name__ == "__main__":
  sys.exit(main())

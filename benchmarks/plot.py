"""Plots of the benchmarks' JSON files (matplotlib).

    python benchmarks/plot.py results/bench.json            # -> results/bench.png
    python benchmarks/plot.py results/memory.json           # -> results/memory.png

bench.json (benchmarks/bench.py): TFLOP/s against sequence length, one panel per
head_dim × causal × pass, one line per implementation. memory.json
(benchmarks/memory.py): peak device memory of forward+backward against sequence length,
log-log, with the point where each implementation ran out of memory marked.
"""

from __future__ import annotations

import argparse
import json
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

STYLE = {
  "cudnn": "k--",
  "cudnn-det": "k-.",
  "xla-dense": "k:",
  "mosaic": "C0-",
  "mosaic-fused": "C0:",
  "triton": "C1-",
  "xla": "C2-",
}


def _style(impl: str, index: int) -> str:
  """One line style per implementation, the same in every panel (others: by position)."""
  return STYLE.get(impl, f"C{3 + index % 7}-")


def throughput(record: dict, path: str) -> None:
  rows = record["results"]
  head_dims = sorted({r["head_dim"] for r in rows})
  columns = [(c, p) for c in (False, True) for p in ("fwd", "fwd+bwd")]
  columns = [col for col in columns if any((r["causal"], r["pass"]) == col for r in rows)]
  fig, axes = plt.subplots(
    len(head_dims), len(columns), figsize=(4 * len(columns), 3 * len(head_dims)), squeeze=False
  )
  for i, head_dim in enumerate(head_dims):
    for j, (causal, pass_) in enumerate(columns):
      ax = axes[i][j]
      panel = [
        r for r in rows if (r["head_dim"], r["causal"], r["pass"]) == (head_dim, causal, pass_)
      ]
      for index, impl in enumerate(record["impls"]):
        points = [(r["seqlen"], r[impl]) for r in panel if isinstance(r.get(impl), float)]
        if points:
          xs, ys = zip(*sorted(points), strict=True)
          ax.plot(xs, ys, _style(impl, index), marker="o", markersize=3, label=impl)
      ax.set_xscale("log", base=2)
      ax.set_title(
        f"head_dim {head_dim}, {'causal' if causal else 'non-causal'}, {pass_}", fontsize=9
      )
      ax.set_xlabel("sequence length")
      ax.set_ylabel("TFLOP/s")
      ax.set_ylim(bottom=0)
      ax.grid(alpha=0.3)
  legend = {}  # every implementation, from whichever panels it appears in
  for ax in axes.flat:
    for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
      legend.setdefault(label, handle)
  axes[0][0].legend(legend.values(), legend.keys(), fontsize=8)
  fig.suptitle(f"{record['device']}, jax {record['jax']}, bf16 ({record.get('date', '')})")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def memory(record: dict, path: str) -> None:
  rows = record["results"]
  fig, ax = plt.subplots(figsize=(6, 4))
  for index, impl in enumerate(record["impls"]):
    points = [(r["seqlen"], r[impl] / 2**30) for r in rows if isinstance(r.get(impl), (int, float))]
    if points:
      xs, ys = zip(*sorted(points), strict=True)
      ax.plot(xs, ys, _style(impl, index), marker="o", label=impl)
    failed = [r["seqlen"] for r in rows if isinstance(r.get(impl), str)]
    if failed:
      ax.axvline(min(failed), color="r", alpha=0.3)
      ax.annotate(
        f"{impl}: {r_kind(rows, impl)} from {min(failed)}",
        (min(failed), 0.5),
        rotation=90,
        fontsize=8,
        xycoords=("data", "axes fraction"),
      )
  if "capacity_bytes" in record:
    ax.axhline(record["capacity_bytes"] / 2**30, color="gray", alpha=0.5, label="device memory")
  ax.set_xscale("log", base=2)
  ax.set_yscale("log", base=2)
  ax.set_xlabel("sequence length")
  ax.set_ylabel("peak memory of forward+backward (GiB)")
  ax.set_title(
    f"{record['device']}, jax {record['jax']}\n{record.get('shape_note', '')}", fontsize=9
  )
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def r_kind(rows, impl) -> str:
  return next(r[impl] for r in rows if isinstance(r.get(impl), str))


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("json")
  parser.add_argument("--out", help="PNG path (default: the JSON's path with .png)")
  opts = parser.parse_args(argv)
  with open(opts.json) as f:
    record = json.load(f)
  out = opts.out or os.path.splitext(opts.json)[0] + ".png"
  (memory if record.get("kind") == "memory" else throughput)(record, out)
  print(out)
  return 0


if __name__ == "__main__":
  raise SystemExit(main())

"""Where one jitted forward+backward spends its GPU time, kernel by kernel (jax.profiler).

Runs ``--calls`` calls of each implementation's fwd+bwd (bench.py's functions, the
protocol's shapes) under ``jax.profiler.trace`` with a Perfetto trace, reads the trace
back and prints, per implementation, every GPU kernel's time per call (µs), its share of
the kernels' sum and its spread over launches, largest first: the attention kernels
beside XLA's fusions around them (the delta reduction, the dQ conversion, any copy).
Kernels run at the card's burst clock here (a few calls); bench.py's sustained timing
runs into the power cap.

    python benchmarks/profile_step.py --seqlen 16384 --head-dim 128 --impls mosaic cudnn

``--impls`` takes bench.py's implementations and ordered_probe.py's ``ord-*`` variants.
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import pathlib
import statistics
import sys
import tempfile

import bench
import jax
import ordered_probe


def _kernel_times(log_dir: pathlib.Path, rows: str, stream: str) -> dict[str, list[float]]:
  """Every duration (µs) per event name on the trace's rows whose process name has
  ``rows`` and thread name ``stream`` (the GPU streams, not the XLA op/module rows)."""
  [path] = sorted(log_dir.rglob("perfetto_trace.json.gz"))
  with gzip.open(path) as fp:
    trace = json.load(fp)
  events = trace["traceEvents"] if isinstance(trace, dict) else trace
  names = {
    e["pid"]: e.get("args", {}).get("name", "")
    for e in events
    if e.get("ph") == "M" and e.get("name") == "process_name"
  }
  threads = {
    (e["pid"], e["tid"]): e.get("args", {}).get("name", "")
    for e in events
    if e.get("ph") == "M" and e.get("name") == "thread_name"
  }
  print("trace rows:", sorted(set(names.values())), file=sys.stderr)
  print("trace threads:", sorted(set(threads.values()))[:40], file=sys.stderr)
  gpu = {pid for pid, name in names.items() if rows in name}
  totals = collections.defaultdict(list)
  for e in events:
    thread = threads.get((e.get("pid"), e.get("tid")), "")
    if e.get("ph") == "X" and e.get("pid") in gpu and stream in thread and "dur" in e:
      totals[e["name"]].append(float(e["dur"]))
  return totals


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  bench.point_arguments(parser)
  parser.add_argument("--calls", type=int, default=5)
  parser.add_argument("--top", type=int, default=12)
  parser.add_argument("--rows", default="/device:GPU", help="trace rows to sum (process name)")
  parser.add_argument("--stream", default="Stream", help="trace threads to sum")
  parser.add_argument("--tokens", type=int, default=bench.TOKENS)
  args = parser.parse_args(argv)
  bench.TOKENS = args.tokens
  data = bench.inputs(args.seqlen, args.head_dim)
  device = jax.devices()[0].device_kind
  print(f"# {device}, jax {jax.__version__}, bf16, seqlen {args.seqlen}, head_dim")
  print(f"# {args.head_dim}, causal {args.causal}: GPU time per fwd+bwd call, µs")
  for impl in args.impls:
    with ordered_probe.applied(impl) as name:
      fn = bench._fn(name, args.causal, True)
      jax.block_until_ready(fn(*data))
      jax.block_until_ready(fn(*data))
      with tempfile.TemporaryDirectory() as tmp:
        with jax.profiler.trace(tmp, create_perfetto_trace=True):
          for _ in range(args.calls):
            out = fn(*data)
          jax.block_until_ready(out)
        totals = _kernel_times(pathlib.Path(tmp), args.rows, args.stream)
    whole = sum(map(sum, totals.values())) / args.calls
    if not whole:
      print(f"\n## {impl}: no events on rows named {args.rows!r}")
      continue
    print(f"\n## {impl}: {whole:.0f} µs of kernels a call\n")
    print("| kernel | µs a call | share | launches a call | µs a launch: min / median / max |")
    print("|---|---|---|---|---|")
    ranked = sorted(totals.items(), key=lambda item: -sum(item[1]))
    for name, times in ranked[: args.top]:
      per_call = sum(times) / args.calls
      spread = f"{min(times):.1f} / {statistics.median(times):.1f} / {max(times):.1f}"
      row = [name[:70], f"{per_call:.1f}", f"{per_call / whole:.1%}"]
      row += [f"{len(times) / args.calls:g}", spread]
      print("| " + " | ".join(row) + " |")
    print(f"{impl}: {whole:.0f} us", file=sys.stderr, flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())

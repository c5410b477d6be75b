"""Burst against sustained speed: each implementation's fwd+bwd run back to back for some
seconds with the SM clock and board power sampled beside it (nvidia-smi every 100 ms).

bench.py's protocol times 5 rounds of up to 20 calls after two warm-up calls: at 16k a
second or more of back-to-back work, long enough for the board to reach its power cap and
lower its clock. This runs each implementation (after a few idle seconds) for
``--seconds``, in turn ``--repeats`` times, and prints per run the TFLOP/s over its first
``--burst`` seconds and over the rest, with the median SM clock and power of each part.

    python benchmarks/sustained_probe.py --seqlen 16384 --impls mosaic cudnn
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import subprocess
import sys
import tempfile
import time

import bench
import jax

FIELDS = "timestamp,clocks.sm,power.draw"


def _samples(path: str) -> list[tuple[float, int, float]]:
  """(unix seconds, SM MHz, watts) per line of the sampler's CSV."""
  rows = []
  with open(path) as f:
    for line in f:
      parts = [p.strip() for p in line.split(",")]
      try:
        stamp = datetime.datetime.strptime(parts[0], "%Y/%m/%d %H:%M:%S.%f")
        rows.append((stamp.timestamp(), int(parts[1]), float(parts[2])))
      except (IndexError, ValueError):
        continue
  return rows


def _window(samples, start, stop) -> tuple[str, str]:
  inside = [(mhz, watts) for t, mhz, watts in samples if start <= t <= stop]
  if not inside:
    return "–", "–"
  return (
    f"{statistics.median(m for m, _ in inside):.0f}",
    f"{statistics.median(w for _, w in inside):.0f}",
  )


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  bench.point_arguments(parser)
  parser.add_argument("--seconds", type=float, default=8.0)
  parser.add_argument("--burst", type=float, default=0.5)
  parser.add_argument("--idle", type=float, default=3.0)
  parser.add_argument("--repeats", type=int, default=2)
  args = parser.parse_args(argv)
  data = bench.inputs(args.seqlen, args.head_dim)
  work = bench.flops(args.seqlen, args.head_dim, args.causal, True)
  log = tempfile.NamedTemporaryFile("w", suffix=".csv", delete=False)
  sampler = subprocess.Popen(
    ["nvidia-smi", f"--query-gpu={FIELDS}", "--format=csv,noheader,nounits", "-lms", "100"],
    stdout=log,
    stderr=subprocess.DEVNULL,
  )
  runs = []
  try:
    fns = {}
    for impl in args.impls:
      with bench._variant(impl):
        fns[impl] = bench._fn(impl, args.causal, True)
        jax.block_until_ready(fns[impl](*data))  # compiled; variants traced in their context
    for _ in range(args.repeats):
      for impl in args.impls:
        time.sleep(args.idle)
        marks = [time.time()]  # a call's end, every call (block_until_ready on each)
        while marks[-1] - marks[0] < args.seconds:
          jax.block_until_ready(fns[impl](*data))
          marks.append(time.time())
        runs.append((impl, marks))
        print(impl, f"{len(marks) - 1} calls", file=sys.stderr, flush=True)
  finally:
    sampler.terminate()
    sampler.wait()
    log.close()
  samples = _samples(log.name)
  print(f"# {jax.devices()[0].device_kind}, jax {jax.__version__}, bf16, seqlen {args.seqlen},")
  print(f"# head_dim {args.head_dim}, causal {args.causal}, fwd+bwd; calls back to back")
  print(
    f"| impl | TFLOP/s first {args.burst:g} s | after | SM MHz first / after | W first / after |"
  )
  print("|---|---|---|---|---|")
  for impl, marks in runs:
    start = marks[0]
    split = next(i for i, t in enumerate(marks) if t - start >= args.burst or i == len(marks) - 1)
    first = work * split / (marks[split] - start) / 1e12
    rest = len(marks) - 1 - split
    after = work * rest / (marks[-1] - marks[split]) / 1e12 if rest else float("nan")
    mhz0, w0 = _window(samples, start, marks[split])
    mhz1, w1 = _window(samples, marks[split], marks[-1])
    print(f"| {impl} | {first:.0f} | {after:.0f} | {mhz0} / {mhz1} | {w0} / {w1} |")
  return 0


if __name__ == "__main__":
  sys.exit(main())

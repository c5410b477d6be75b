"""Summarise an nvidia-smi clock log taken beside a benchmark: per GPU, the SM clock while busy.

    python benchmarks/clocks.py --sample FILE &   # nvidia-smi, one line per GPU a second
    python benchmarks/clocks.py FILE             # the Markdown summary

A sample is "busy" when the board draws more than ``--busy-watts``. Throttle reasons are
nvidia-smi's bit mask (0x4: software power cap, 0x20/0x40: thermal slowdown).
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import sys

FIELDS = "index,timestamp,clocks.sm,power.draw,temperature.gpu,clocks_throttle_reasons.active"


def sample(path: str) -> None:
  """Replace this process by nvidia-smi writing FIELDS to ``path`` each second (same pid,
  so the caller's ``kill`` stops it)."""
  fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
  os.dup2(fd, 1)
  os.dup2(fd, 2)
  os.execvp("nvidia-smi", ["nvidia-smi", f"--query-gpu={FIELDS}", "--format=csv", "-l", "1"])


def summarise(path: str, busy_watts: float) -> list[str]:
  with open(path) as f:
    rows = [r for r in csv.reader(f) if r and not r[0].startswith("index")]
  per_gpu: dict[str, list[tuple[int, float, int, str]]] = {}
  for r in rows:
    try:
      gpu, clock, watts = r[0].strip(), int(r[2].split()[0]), float(r[3].split()[0])
      temp, reasons = int(r[4].strip()), r[5].strip()
    except (IndexError, ValueError):
      continue
    if watts > busy_watts:
      per_gpu.setdefault(gpu, []).append((clock, watts, temp, reasons))
  lines = [
    f"GPU clocks while busy (> {busy_watts:.0f} W), one sample a second",
    "",
    "| GPU | busy samples | SM MHz median | SM MHz min | W median | max °C | throttle reasons |",
    "|---|---|---|---|---|---|---|",
  ]
  for gpu, samples in sorted(per_gpu.items()):
    clocks = [s[0] for s in samples]
    lines.append(
      f"| {gpu} | {len(samples)} | {statistics.median(clocks):.0f} | {min(clocks)} | "
      f"{statistics.median(s[1] for s in samples):.0f} | {max(s[2] for s in samples)} | "
      f"{' '.join(sorted({s[3] for s in samples}))} |"
    )
  return lines


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("path")
  parser.add_argument("--busy-watts", type=float, default=400.0)
  parser.add_argument("--sample", action="store_true", help="write samples to path instead")
  opts = parser.parse_args(argv)
  if opts.sample:
    sample(opts.path)
  print("\n".join(summarise(opts.path, opts.busy_watts)))
  return 0


if __name__ == "__main__":
  sys.exit(main())

"""The parsers of the GPU diagnostics in benchmarks/ (profile_step.py, sustained_probe.py),
on synthetic inputs: what RESULTS.md's profiles and clock tables are read with."""

from __future__ import annotations

import datetime
import gzip
import json
import pathlib
import sys

import pytest

BENCHMARKS = pathlib.Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.fixture
def tools(monkeypatch):
  monkeypatch.syspath_prepend(str(BENCHMARKS))  # the scripts import bench, ordered_probe
  import profile_step
  import sustained_probe

  yield profile_step, sustained_probe
  for name in ("profile_step", "sustained_probe", "ordered_probe", "bench"):
    sys.modules.pop(name, None)


def test_kernel_times_sums_gpu_streams_only(tools, tmp_path):
  profile_step, _ = tools
  meta = [
    dict(ph="M", name="process_name", pid=1, args=dict(name="/device:GPU:0")),
    dict(ph="M", name="process_name", pid=2, args=dict(name="/host:CPU")),
    dict(ph="M", name="thread_name", pid=1, tid=7, args=dict(name="Stream #14(Compute)")),
    dict(ph="M", name="thread_name", pid=1, tid=8, args=dict(name="XLA Ops")),
    dict(ph="M", name="thread_name", pid=2, tid=9, args=dict(name="Stream-like host thread")),
  ]
  kernels = [
    dict(ph="X", pid=1, tid=7, name="attention_fwd", ts=0, dur=30.0),
    dict(ph="X", pid=1, tid=7, name="attention_fwd", ts=50, dur=32.0),
    dict(ph="X", pid=1, tid=7, name="convert", ts=90, dur=2.5),
    dict(ph="X", pid=1, tid=8, name="attention_fwd", ts=0, dur=999.0),  # an op row: not a kernel
    dict(ph="X", pid=2, tid=9, name="attention_fwd", ts=0, dur=777.0),  # the host
    dict(ph="i", pid=1, tid=7, name="marker", ts=5),  # no duration
  ]
  run = tmp_path / "plugins" / "profile" / "run1"
  run.mkdir(parents=True)
  with gzip.open(run / "perfetto_trace.json.gz", "wt") as f:
    json.dump({"traceEvents": meta + kernels}, f)
  times = profile_step._kernel_times(tmp_path, "/device:GPU", "Stream")
  assert dict(times) == {"attention_fwd": [30.0, 32.0], "convert": [2.5]}


def test_sustained_samples_and_windows(tools, tmp_path):
  _, sustained_probe = tools
  start = datetime.datetime(2026, 11, 29, 5, 0, 0)
  lines = ["garbage line\n"]
  for i, (mhz, watts) in enumerate([(1980, 250.0), (1950, 400.0), (1800, 690.0), (1750, 691.0)]):
    stamp = (start + datetime.timedelta(milliseconds=100 * i)).strftime("%Y/%m/%d %H:%M:%S.%f")
    lines.append(f"{stamp[:-3]}, {mhz}, {watts}\n")
  path = tmp_path / "clocks.csv"
  path.write_text("".join(lines))
  samples = sustained_probe._samples(str(path))
  assert [(m, w) for _, m, w in samples] == [(1980, 250), (1950, 400), (1800, 690), (1750, 691)]
  t0 = samples[0][0]
  assert samples[1][0] - t0 == pytest.approx(0.1, abs=1e-3)
  assert sustained_probe._window(samples, t0, t0 + 0.15) == ("1965", "325")
  assert sustained_probe._window(samples, t0 + 0.15, t0 + 1) == ("1775", "690")
  assert sustained_probe._window(samples, t0 + 5, t0 + 6) == ("–", "–")

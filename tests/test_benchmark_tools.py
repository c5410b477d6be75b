"""The parsers of the GPU diagnostics in benchmarks/ (profile_step.py, sustained_probe.py,
timeline_probe.py), on synthetic inputs: what RESULTS.md's profiles, clock tables and
kernel timelines are read with."""

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
  import timeline_probe

  yield profile_step, sustained_probe, timeline_probe
  for name in ("profile_step", "sustained_probe", "timeline_probe", "ordered_probe", "bench"):
    sys.modules.pop(name, None)


def test_kernel_times_sums_gpu_streams_only(tools, tmp_path):
  profile_step, *_ = tools
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
  _, sustained_probe, _ = tools
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


def test_timeline_relative_ns_across_a_wrap(tools):
  *_, timeline = tools
  import numpy as np

  base = (1 << 32) - 1000
  raw = (np.array([base, base + 500, base + 1500, base + 4000]) % (1 << 32)).astype(np.uint32)
  got = timeline.relative_ns(raw.view(np.int32), raw.view(np.int32)[0])
  assert got.tolist() == [0, 500, 1500, 4000]


def test_timeline_analyse_synthetic_chain(tools):
  """Three key blocks of one pair start together (block 2 first in the chain); each
  waits for the block above to land a tile's adds, then 0.5 µs more (the link)."""
  import numpy as np

  *_, timeline = tools
  events = timeline.EVENTS
  steps, link = 4, 0.5
  stall = [0.0, 1.0, 2.0]  # µs a tile, consumers waiting for a slab buffer
  turn = [0.0, 3.0 + link, 2 * (3.0 + link)]  # writer waits: the chain's offset
  us = np.zeros((3, steps, len(events)))
  for c in range(3):
    for st in range(steps):
      row = us[c, st]
      row[events["consumer_start"]] = 10 * st
      row[events["consumer_wait"]] = 10 * st + 5
      row[events["consumer_handed"]] = 10 * st + 5 + stall[c]
      row[events["writer_start"]] = 10 * st + 1
      row[events["writer_turn"]] = 10 * st + 1 + turn[c]
      row[events["writer_slabs"]] = 10 * st + 2 + turn[c]
      row[events["writer_landed"]] = 10 * st + 4 + turn[c]
      row[events["writer_done"]] = 10 * st + 4.5 + turn[c]
    us[c, 0, events["consumer_end"]] = us[c, steps - 1, events["writer_done"]]
  base = (1 << 32) - 20_000  # the 32-bit clock wraps during the kernel
  stamps = ((np.round(us * 1000).astype(np.int64) + base) % (1 << 32)).astype(np.uint32)
  pair, block, down = np.zeros(3, int), np.array([2, 1, 0]), np.zeros(3, bool)
  s = timeline.analyse(
    stamps.view(np.int32), np.arange(3), np.full(3, steps), pair, block, down, causal=False
  )
  life = np.array([34.5, 38.0, 41.5])
  assert s["ctas"] == 3 and s["sms"] == 3
  assert s["span"] == pytest.approx(41.5)
  assert s["life"] == pytest.approx(life.mean())
  assert s["occupancy"] == pytest.approx(life.sum() / (3 * 41.5))
  assert s["shares"]["consumer stalled (slab buffer)"] == pytest.approx(
    np.mean(4 * np.array(stall) / life)
  )
  assert s["shares"]["writer: turn"] == pytest.approx(np.mean(4 * np.array(turn) / life))
  assert s["shares"]["writer: landing"] == pytest.approx(np.mean(8 / life))
  assert s["landing median"] == pytest.approx(2.0)
  assert s["tile median"] == pytest.approx(10.0)
  assert s["link median"] == pytest.approx(link) and s["links"] == 2 * steps
  assert {k: v["ctas"] for k, v in s["depth"].items()} == {"0": 1, "1-7": 2}
  # The unordered kernel: consumer stamps only.
  u = timeline.analyse(
    stamps.view(np.int32),
    np.arange(3),
    np.full(3, steps),
    pair,
    block,
    down,
    causal=False,
    ordered=False,
  )
  assert list(u["shares"]) == ["consumer stalled (slab buffer)"] and "link median" not in u
  assert u["life"] == pytest.approx(life.mean())


@pytest.fixture
def hashes_tool(monkeypatch):
  monkeypatch.syspath_prepend(str(BENCHMARKS))
  import kernel_hashes

  yield kernel_hashes
  sys.modules.pop("kernel_hashes", None)


def test_kernel_hashes_follow_the_traced_kernels(hashes_tool, monkeypatch):
  """benchmarks/kernel_hashes.py (for changes that should leave the kernels alone): the
  same tree hashes the same; a tuning switch that changes the ordered backward's traced
  code changes that case's hash and no other."""
  from pallas_attention import tuning

  kernel_hashes = hashes_tool
  selection = dict(head_dims=(128,), seqlens=(2048,), heads=((2, 2),), parts=("fwd", "bwd"))
  before = kernel_hashes.hashes(**selection)
  assert sorted(before) == ["bwd h=128 causal=0 t=2048 heads=2/2",
    "bwd h=128 causal=1 t=2048 heads=2/2", "fwd h=128 causal=0 t=2048 heads=2/2",
    "fwd h=128 causal=1 t=2048 heads=2/2"]  # fmt: skip
  assert len(set(before.values())) == 4
  assert kernel_hashes.hashes(**selection) == before
  # Non-causal 2048 keys: the ordered fused backward, whose writer polls before or after
  # the slabs are in; causal 2048: the two-kernel backward, which has no writer.
  monkeypatch.setattr(tuning, "ORDERED_POLL_FIRST", not tuning.ORDERED_POLL_FIRST)
  after = kernel_hashes.hashes(**selection)
  assert kernel_hashes.compare(after, before) == ["bwd h=128 causal=0 t=2048 heads=2/2"]

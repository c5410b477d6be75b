"""Profile the Mosaic GPU kernels with Mosaic GPU's profiler, and time them at chosen shapes.

The kernels mark regions with ``jax.named_scope`` (forward: c_qk, c_vwait, c_pv, ...;
dK/dV: b_s, b_dv_dp, b_dk, ...). With ``forward.PROFILE`` set, each call writes a
Chrome trace; this script sums each region per warpgroup 0 of every CTA and prints the
mean per key/query-tile step (k-cycles), which is how RESULTS.md's profiles were made.

    python benchmarks/profile_mosaic.py time          # forward at several (B, T), with cuDNN
    python benchmarks/profile_mosaic.py fwd dkv       # profiles (head_dim 128, 2k and 4k)
    python benchmarks/profile_mosaic.py dkv dkv-causal   # the dK/dV kernel, causal or not
"""

from __future__ import annotations

import collections
import glob
import json
import os
import statistics
import sys
import tempfile

import jax
import jax.numpy as jnp
from bench import flops, inputs, time_fn

from pallas_attention import core, masks, tuning
from pallas_attention.mosaic import backward as bwd
from pallas_attention.mosaic import forward as fwd


def _normal(b, t, n, h):
  keys = jax.random.split(jax.random.key(0), 3)
  return [jax.random.normal(key, (b, t, n, h), jnp.bfloat16) for key in keys]


def _forward(t, h, causal, blocks):
  """The forward with the table's key tile, stages and loop (serial or pipelined)."""
  spec = masks.MaskSpec(causal=causal)
  options = blocks.forward_options()
  return jax.jit(
    lambda q, k, v: fwd.forward(q, k, v, scale=h**-0.5, spec=spec, q_len=t, kv_len=t, **options)[0]
  )


def timing():
  """Forward TFLOP/s at shapes that separate sequence length from batch, with cuDNN."""
  print("| B | T | N | H | key tile | mosaic | cuDNN |\n|---|---|---|---|---|---|---|")
  cases = [(8, 2048, 16, 128), (32, 2048, 16, 128), (1, 2048, 16, 128), (16, 1024, 16, 128)]
  cases += [(4, 4096, 16, 128), (1, 16384, 16, 128), (16, 1024, 8, 256), (8, 2048, 8, 256)]
  for b, t, n, h in cases:
    blocks = tuning.mosaic_blocks(h, False, t)
    q, k, v = _normal(b, t, n, h)
    work = 4 * b * t * t * n * h

    def cudnn(q, k, v):
      return jax.nn.dot_product_attention(q, k, v, implementation="cudnn")

    ours = work / time_fn(_forward(t, h, False, blocks), (q, k, v))
    theirs = work / time_fn(jax.jit(cudnn), (q, k, v))
    print(f"| {b} | {t} | {n} | {h} | {blocks.fwd_kv} | {ours / 1e12:.0f} | {theirs / 1e12:.0f} |")


def summarize(trace: str, steps: int, warpgroups: int) -> None:
  """Mean span and per-region time of warpgroup 0 per CTA, per step (k-cycles)."""
  events = collections.defaultdict(list)
  for event in json.load(open(trace))["traceEvents"]:
    events[event["tid"]].append(event)
  spans, regions = [], collections.defaultdict(list)
  for tid, evs in events.items():
    if (tid - 1) % warpgroups:  # keep warpgroup 0 of each CTA
      continue
    stack, total = [], collections.defaultdict(float)
    for event in evs:
      if event["ph"] == "B":
        stack.append(event)
      else:
        begin = stack.pop()
        total[begin["name"]] += event["ts"] - begin["ts"]
    spans.append(evs[-1]["ts"] - evs[0]["ts"])
    for name, value in total.items():
      regions[name].append(value)
  print(f"  span per step {statistics.mean(spans) / steps:.3f} ({len(spans)} CTAs, {steps} steps)")
  for name, values in sorted(regions.items()):
    print(f"    {name:12s} {statistics.mean(values) / steps:.3f}")


def _profiled(fn, args, space):
  path = tempfile.mkdtemp(prefix="mosaic_profile_")
  fwd.PROFILE = (space, path)
  try:
    jax.block_until_ready(fn(*args))  # a new compile: PROFILE is read while lowering
  finally:
    fwd.PROFILE = None
  return sorted(glob.glob(os.path.join(path, "*.json")))[-1]


def profile_forward(b, t, h=128):
  blocks = tuning.mosaic_blocks(h, False, t)
  steps = t // blocks.fwd_kv
  fn = _forward(t, h, False, blocks)
  trace = _profiled(fn, _normal(b, t, 2048 // h, h), 4 * steps + 16)
  print(f"## forward B={b} T={t} H={h}, k-cycles per key tile")
  summarize(trace, steps, 3)


def profile_dkv(t, h=128, causal=False):
  """The dK/dV kernel's regions per query tile; causal: averaged over the CTAs' tiles
  (key block j visits T / bq - j · bk / bq of them), so the two can be compared."""
  q, k, v, do = inputs(t, h)
  blocks = tuning.mosaic_blocks(h, causal, t)
  spec = masks.MaskSpec(causal)
  out, lse2 = fwd.forward(q, k, v, scale=h**-0.5, spec=spec, q_len=t, kv_len=t)
  delta = core.row_delta(out, do)
  args = (q, k, v, do, lse2, delta)
  common = (h**-0.5, spec, t, t, blocks, True)
  fn = jax.jit(lambda *a: bwd._dkv(*a, *common))
  steps = t // blocks.dkv_q
  trace = _profiled(fn, args, 6 * steps + 16)
  mean_steps = steps
  if causal:
    per_block = [steps - j * blocks.dkv_kv // blocks.dkv_q for j in range(t // blocks.dkv_kv)]
    mean_steps = statistics.mean(per_block)
  print(f"## dK/dV T={t} H={h} causal={causal} {blocks}, k-cycles per query tile")
  summarize(trace, mean_steps, blocks.dkv_kv // bwd.ROWS + 1)
  seconds = time_fn(jax.jit(lambda *a: bwd._dkv(*a, *common)), args)
  print(f"  {4 * flops(t, h, causal, False) / 2 / seconds / 1e12:.0f} TFLOP/s of its 4 products")


if __name__ == "__main__":
  print(f"# {jax.devices()[0].device_kind}, jax {jax.__version__}")
  for what in sys.argv[1:] or ["time", "fwd", "dkv"]:
    if what == "time":
      timing()
    elif what == "fwd":
      profile_forward(8, 2048)
      profile_forward(4, 4096)
    elif what == "dkv":
      profile_dkv(4096)
    elif what == "dkv-causal":
      profile_dkv(4096, causal=True)

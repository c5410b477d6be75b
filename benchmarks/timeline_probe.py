"""Inside the ordered (deterministic) fused backward: where its CTAs' time goes, tile by tile.

Runs the ordered fused backward kernel alone (``mosaic/backward.py::_fused`` with
``timeline=True``, the package's blocks and launch order) at one protocol point. Each
CTA's dQ writer warp and its first consumer warpgroup store the GPU's nanosecond clock
(``%globaltimer``) at every query tile (``backward.TIMELINE_EVENTS``) and the CTA its SM.
Prints, per call after a warm-up:

- the kernel's time with and without the stamps (what they cost);
- per CTA, as a share of its lifetime: the consumers stalled for a free dQ slab buffer
  (the writer two tiles behind), and the writer waiting for its turn (the block above to
  land its adds), for the consumers' slabs, and for its own adds to land;
- the same by the block's depth in its chain (how many blocks of its (batch, kv head)
  pair above it were running when it started);
- the link: from the block above landing a tile's adds to this block's writer seeing its
  turn, where it was waiting for it (non-causal);
- the occupancy: the CTAs' lifetimes over SMs × the kernel's span, and the tail (the part
  of the span with fewer CTAs running than SMs).

    python benchmarks/timeline_probe.py --seqlen 16384 --head-dim 128

``--impls`` takes ``mosaic`` (the package's settings), ``unordered`` (the fused kernel with
deterministic_backward=False: consumer stamps only) and ordered_probe.py's ``ord-*``
variants that change the launch order or the writer (``ord-c1w4``, ``ord-pollfirst``, ...).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time

import bench
import jax
import jax.numpy as jnp
import numpy as np
import ordered_probe

from pallas_attention import core, masks, tuning
from pallas_attention.mosaic import backward as mbwd
from pallas_attention.mosaic import forward as mfwd

EVENTS = {name: i for i, name in enumerate(mbwd.TIMELINE_EVENTS)}


def relative_ns(stamps: np.ndarray, reference: int) -> np.ndarray:
  """Stamps (the low 32 bits of a nanosecond clock) as signed int64 ns from ``reference``
  (one of them), across a wrap of the 32 bits."""
  x = stamps.astype(np.int64) & 0xFFFFFFFF
  return (x - (int(reference) & 0xFFFFFFFF) + (1 << 31)) % (1 << 32) - (1 << 31)


def cta_layout(b, kv_heads, num_kv, causal, head_dim, ordered=True):
  """(pair, key block, down) of each CTA in launch order (ordered: ``_ordered_cta``;
  unordered: the grid's own order)."""
  launch = np.arange(b * kv_heads * num_kv, dtype=np.int32)
  if not ordered:
    return launch // num_kv, launch % num_kv, np.zeros(launch.shape, bool)
  with jax.ensure_compile_time_eval():
    axes = (
      jnp.asarray(launch // (kv_heads * num_kv)),
      jnp.asarray(launch // num_kv % kv_heads),
      jnp.asarray(launch % num_kv),
    )
    batch, head, block, down = mbwd._ordered_cta(*axes, b, kv_heads, num_kv, causal, head_dim)
    down = np.broadcast_to(np.asarray(down), launch.shape)
    return np.asarray(batch) * kv_heads + np.asarray(head), np.asarray(block), down


def chain_depth(pair, block, down, start, end) -> np.ndarray:
  """For each CTA, the blocks it waits for (the same pair, added before it: above it, or
  below it for ``down`` pairs) that were running when it started."""
  depth = np.zeros(len(pair), np.int64)
  for p in np.unique(pair):
    idx = np.flatnonzero(pair == p)
    for c in idx:
      before = idx[(block[idx] < block[c]) if down[c] else (block[idx] > block[c])]
      depth[c] = int(np.sum((start[before] <= start[c]) & (end[before] > start[c])))
  return depth


def analyse(stamps, sm, steps, pair, block, down, causal: bool, ordered: bool = True) -> dict:
  """Summaries of one call's stamps (``int32 [CTAs, steps, events]``), SMs ``[CTAs]``,
  steps per CTA ``[CTAs]`` and the chain layout (``cta_layout``). Times in µs. The
  unordered kernel has no writer warp: only its consumers' parts."""
  ctas = stamps.shape[0]
  valid = np.arange(stamps.shape[1])[None, :] < steps[:, None]  # [CTAs, steps]
  t = relative_ns(stamps, stamps[0, 0, EVENTS["consumer_start"]]) / 1e3
  t = np.where(valid[..., None], t, np.nan)
  ev = {name: t[..., i] for name, i in EVENTS.items()}
  start = ev["consumer_start"][:, 0]
  end = ev["consumer_end"][:, 0]
  life = end - start
  parts = {
    "consumer stalled (slab buffer)": np.nansum(ev["consumer_handed"] - ev["consumer_wait"], 1),
  }
  if ordered:
    parts |= {
      "writer: turn": np.nansum(ev["writer_turn"] - ev["writer_start"], 1),
      "writer: slabs": np.nansum(ev["writer_slabs"] - ev["writer_turn"], 1),
      "writer: landing": np.nansum(ev["writer_landed"] - ev["writer_slabs"], 1),
      "writer: release": np.nansum(ev["writer_done"] - ev["writer_landed"], 1),
    }
  span = np.nanmax(end) - np.nanmin(start)
  sms = len(np.unique(sm))
  # Running CTAs over time: the tail is the span's end with fewer running than SMs.
  moments = np.concatenate([start, end])
  change = np.concatenate([np.ones(ctas), -np.ones(ctas)])
  order = np.argsort(moments, kind="stable")
  running = np.cumsum(change[order])
  full = moments[order][running >= sms]
  tail = np.nanmax(end) - (full.max() if full.size else np.nanmin(start))
  depth = chain_depth(pair, block, down, start, end) if ordered else np.zeros(ctas, int)
  landing = ev["writer_landed"] - ev["writer_slabs"] if ordered else None
  summary = {
    "ctas": ctas,
    "sms": sms,
    "span": span,
    "life": float(np.mean(life)),
    "occupancy": float(np.sum(life) / (sms * span)),
    "tail": float(tail),
    "shares": {k: float(np.mean(v / life)) for k, v in parts.items()},
    "landing median": float(np.nanmedian(landing)) if ordered else float("nan"),
    "landing p90": float(np.nanpercentile(landing, 90)) if ordered else float("nan"),
    "tile median": float(np.nanmedian(np.diff(ev["consumer_start"], axis=1))),
    "tile p90": float(np.nanpercentile(np.diff(ev["consumer_start"], axis=1), 90)),
    "stall median": float(np.nanmedian(ev["consumer_handed"] - ev["consumer_wait"])),
    "depth": {},
  }
  buckets = [(0, 0), (1, 7), (8, 31), (32, 63), (64, 1 << 30)]
  for lo, hi in buckets:
    sel = (depth >= lo) & (depth <= hi)
    if not sel.any():
      continue
    label = f"{lo}" if lo == hi else (f"{lo}+" if hi >= 1 << 30 else f"{lo}-{hi}")
    summary["depth"][label] = {
      "ctas": int(sel.sum()),
      "life": float(np.mean(life[sel])),
      **{k: float(np.mean(v[sel] / life[sel])) for k, v in parts.items()},
    }
  if ordered and not causal:  # every block visits the tiles in one order: step st is a tile
    index = {(int(p), int(k)): c for c, (p, k) in enumerate(zip(pair, block, strict=True))}
    gaps = []
    for c in range(ctas):
      above = index.get((int(pair[c]), int(block[c]) + (-1 if down[c] else 1)))
      if above is None:
        continue
      waited = (ev["writer_turn"][c] - ev["writer_start"][c]) > 0.2
      gap = ev["writer_turn"][c] - ev["writer_landed"][above]
      gaps.append(gap[waited & np.isfinite(gap)])
    gaps = np.concatenate(gaps) if gaps else np.array([])
    if gaps.size:
      summary["link median"] = float(np.median(gaps))
      summary["link p90"] = float(np.percentile(gaps, 90))
      summary["links"] = int(gaps.size)
  return summary


def report(summary: dict) -> str:
  """A markdown block of ``analyse``'s summary."""
  s = summary
  lines = [
    f"- {s['ctas']} CTAs on {s['sms']} SMs; span {s['span']:.0f} µs, mean CTA life "
    f"{s['life']:.1f} µs, occupancy {s['occupancy']:.3f}, tail (fewer CTAs than SMs) "
    f"{s['tail']:.0f} µs",
    f"- consumer tile median {s['tile median']:.3f} µs, p90 {s['tile p90']:.3f}; stall "
    f"median {s['stall median']:.3f} µs; writer landing median {s['landing median']:.2f} "
    f"µs, p90 {s['landing p90']:.2f}",
  ]
  if "link median" in s:
    lines.append(
      f"- link (block above landed → turn seen, where waiting): median "
      f"{s['link median']:.2f} µs, p90 {s['link p90']:.2f} ({s['links']} tiles)"
    )
  lines.append("")
  names = list(s["shares"])
  lines.append("| depth | CTAs | life µs | " + " | ".join(names) + " |")
  lines.append("|---" * (3 + len(names)) + "|")
  shares = " | ".join(f"{100 * s['shares'][k]:.1f}%" for k in names)
  lines.append(f"| all | {s['ctas']} | {s['life']:.1f} | {shares} |")
  for label, row in s["depth"].items():
    shares = " | ".join(f"{100 * row[k]:.1f}%" for k in names)
    lines.append(f"| {label} | {row['ctas']} | {row['life']:.1f} | {shares} |")
  return "\n".join(lines)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  bench.point_arguments(parser)
  parser.set_defaults(impls=["mosaic"])
  parser.add_argument("--calls", type=int, default=3)
  parser.add_argument("--save", help="an .npz for the first implementation's last call's stamps")
  opts = parser.parse_args(argv)
  seqlen, h, causal = opts.seqlen, opts.head_dim, opts.causal
  print(
    f"# {jax.devices()[0].device_kind}, jax {jax.__version__}, bf16, seqlen {seqlen}, "
    f"head_dim {h}, {'causal' if causal else 'non-causal'}"
  )
  q, k, v, do = bench.inputs(seqlen, h)
  b, t, n, _ = q.shape
  spec = masks.MaskSpec(causal, None, None)
  scale = h**-0.5
  blocks = tuning.mosaic_blocks(h, causal, seqlen, fused=True)
  if not blocks.bwd_fused:
    print(f"no fused backward at head_dim {h}", file=sys.stderr)
    return 1
  out, lse2 = jax.jit(
    lambda q, k, v: mfwd.forward(
      q, k, v, scale=scale, spec=spec, q_len=t, kv_len=t, **blocks.forward_options()
    )
  )(q, k, v)
  delta = core.row_delta(out, do)
  bq, bk = blocks.dkv_q, blocks.dkv_kv
  kv_heads, num_kv, group = k.shape[2], t // bk, n // k.shape[2]
  for name in opts.impls:
    ordered = name != "unordered"
    with ordered_probe.variant(name) or contextlib.nullcontext():  # mosaic, unordered: None
      jax.clear_caches()
      pair, block, down = cta_layout(b, kv_heads, num_kv, causal, h, ordered)
      lo, hi = mbwd.query_tiles_of_key_blocks(spec, t, t, t, bq, bk)
      steps = (group * (hi - lo))[block]  # a CTA's steps: its query tiles times the group

      def kernel(timeline, q, k, v, do, lse2, delta, ordered=ordered):
        return mbwd._fused(
          q, k, v, do, lse2, delta, scale, spec, t, t, blocks, True, True, ordered, timeline
        )

      plain = jax.jit(lambda *a: kernel(False, *a)[:3])
      stamped = jax.jit(lambda *a: kernel(True, *a))
      args = (q, k, v, do, lse2, delta)
      times = {}
      for label, fn in (("plain", plain), ("stamped", stamped)):
        times[label] = bench.time_fn(fn, args, rounds=5, round_seconds=0.2) * 1e6
      print(
        f"\n## {name}\n\nbackward kernel µs (median of 5 rounds): without stamps "
        f"{times['plain']:.0f}, with {times['stamped']:.0f}\n"
      )
      for call in range(opts.calls):
        time.sleep(0.5)
        *_, stamps, sm = jax.block_until_ready(stamped(*args))
        stamps, sm = np.asarray(stamps), np.asarray(sm)
        summary = analyse(stamps, sm, steps, pair, block, down, causal, ordered)
        print(f"### call {call + 1}\n\n{report(summary)}\n", flush=True)
      if opts.save and name == opts.impls[0]:
        np.savez_compressed(
          opts.save,
          stamps=stamps,
          sm=sm,
          steps=steps,
          pair=pair,
          block=block,
          down=down,
        )
  return 0


if __name__ == "__main__":
  sys.exit(main())

"""Ring attention: one-device overhead, scaling over devices, and a correctness check.

Three modes (any combination; default: overhead on one device, scaling on several):

- ``--overhead`` (issue 6): a mesh of ONE device, ring_attention against plain
  flash_attention, forward and forward+backward, at the protocol's shapes
  (batch·seqlen = 16384, heads = 2048 / head_dim).
- ``--scaling`` (issue 7): all devices (or ``--devices P``) in one ring, batch 1,
  forward+backward time and TFLOP/s per device at the given GLOBAL seqlens (causal,
  zigzag by default), the same ring with the local kernels replaced by no-ops (what
  is left is communication and bookkeeping: if the ring hides its transfers, the
  real ring costs about max(compute, no-op) rather than their sum), and one device's
  flash_attention rate at ``--ref-seqlen`` for the efficiency
  ``(ring TFLOP/s per device) / (one device's TFLOP/s)``.
- ``--correctness``: ring forward and gradients against single-device
  flash_attention on the gathered sequence (a size that fits one device), causal
  and not, both layouts; relative L2 errors and PASS/FAIL (bf16: < 2e-2).

FLOPs: forward 4·B·T²·N·H (halved when causal), forward+backward 3.5× that. Times are
medians of back-to-back calls (bench.time_fn). The Markdown table comes last;
``--json`` also writes every row.

    python benchmarks/ring_bench.py --overhead --seqlens 4096 16384
    python benchmarks/ring_bench.py --scaling --seqlens 65536 262144 --rounds 3
    python benchmarks/ring_bench.py --correctness --seqlens 8192
    # on CPU, tiny:
    XLA_FLAGS=--xla_force_host_platform_device_count=4 \\
      python benchmarks/ring_bench.py --scaling --correctness --seqlens 256 --head-dim 32
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from bench import time_fn
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from pallas_attention import flash_attention, ring, ring_attention

AXIS = "sp"
DTYPES = {"bf16": jnp.bfloat16, "f16": jnp.float16, "f32": jnp.float32}


def flops(batch, seqlen, heads, head_dim, causal: bool, backward: bool) -> float:
  fwd = 4.0 * batch * seqlen * seqlen * heads * head_dim / (2 if causal else 1)
  return fwd * (3.5 if backward else 1.0)


def make_inputs(shape, dtype, sharding=None, seed: int = 0):
  """q, k, v, do: random normal, on ``sharding`` (or the default device)."""
  keys = jax.random.split(jax.random.key(seed), 4)
  make = jax.jit(lambda key: jax.random.normal(key, shape, dtype), out_shardings=sharding)
  return [make(key) for key in keys]


def ring_fn(mesh, causal: bool, layout: str, backward: bool, implementation=None):
  """A jitted ``(q, k, v, do) -> out | (out, grads)`` of ring_attention over ``mesh``.

  Inputs are whole arrays sharded along the sequence; they are taken to be in the
  layout's order already (zigzag_permute is not timed).
  """

  def local(q, k, v):
    return ring_attention(
      q, k, v, axis_name=AXIS, is_causal=causal, layout=layout, implementation=implementation
    )

  spec = P(None, AXIS)
  attn = jax.shard_map(local, mesh=mesh, in_specs=spec, out_specs=spec)
  return _with_pass(attn, backward)


def flash_fn(causal: bool, backward: bool, implementation=None):
  return _with_pass(
    lambda q, k, v: flash_attention(q, k, v, is_causal=causal, implementation=implementation),
    backward,
  )


def _with_pass(attn, backward: bool):
  if not backward:
    return jax.jit(lambda q, k, v, do: attn(q, k, v))

  def fwd_bwd(q, k, v, do):
    out, vjp = jax.vjp(attn, q, k, v)
    return out, vjp(do)

  return jax.jit(fwd_bwd)


@contextlib.contextmanager
def noop_kernels():
  """Traces rings whose local kernels do nothing but write outputs of the right shapes.

  Each output depends on one element of K and V, so XLA keeps the transfers.
  """

  def touch(q, k, v):
    return (k[:, :1, :1, :1].astype(jnp.float32) + v[:, :1, :1, :1].astype(jnp.float32)) * 0

  def forward(problem, q, k, v, bias, mask, q_len, kv_len):
    del problem, bias, mask, q_len, kv_len
    scalar = touch(q, k, v)
    b, t, n, _ = q.shape
    out = jnp.broadcast_to(scalar.astype(q.dtype), q.shape)
    return out, jnp.broadcast_to(scalar[:, :, 0], (b, n, t))

  def backward(problem, q, k, v, bias, mask, q_len, kv_len, do, lse2, delta):
    del problem, bias, mask, q_len, kv_len, do, lse2, delta
    scalar = touch(q, k, v)
    return (*(jnp.broadcast_to(scalar.astype(x.dtype), x.shape) for x in (q, k, v)), None)

  saved = ring._local_forward, ring._local_backward
  ring._local_forward, ring._local_backward = forward, backward
  try:
    yield
  finally:
    ring._local_forward, ring._local_backward = saved


def _seconds(fn, args, rounds: int) -> float | str:
  try:
    return time_fn(fn, args, rounds=rounds)
  except Exception as err:  # noqa: BLE001 -- a benchmark records failures and goes on
    text = str(err).split("\n")[0]
    if "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower():
      return "OOM"
    return f"error: {type(err).__name__}: {text[:100]}"


def _ms(x) -> str:
  return f"{x * 1e3:.2f}" if isinstance(x, float) else str(x)


def _num(x, fmt="{:.4g}") -> str:
  return fmt.format(x) if isinstance(x, float) else str(x)


def _ratio(a, b) -> float | str:
  return a / b if isinstance(a, float) and isinstance(b, float) else "–"


def overhead(opts, dtype) -> tuple[str, list[dict]]:
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:1]), (AXIS,))
  heads = 2048 // opts.head_dim
  rows = []
  for seqlen in opts.seqlens:
    batch = opts.batch or max(1, 16384 // seqlen)
    args = make_inputs((batch, seqlen, heads, opts.head_dim), dtype)
    for causal in opts.causals:
      for backward in opts.passes:
        flash = _seconds(flash_fn(causal, backward, opts.implementation), args, opts.rounds)
        ringed = _seconds(
          ring_fn(mesh, causal, opts.layout, backward, opts.implementation), args, opts.rounds
        )
        work = flops(batch, seqlen, heads, opts.head_dim, causal, backward)
        row = dict(
          seqlen=seqlen,
          batch=batch,
          causal=causal,
          backward=backward,
          flash_s=flash,
          ring_s=ringed,
          flash_tflops=_ratio(work / 1e12, flash),
          ring_tflops=_ratio(work / 1e12, ringed),
          ring_over_flash=_ratio(ringed, flash),
        )
        rows.append(row)
        print(f"overhead {row}", file=sys.stderr, flush=True)
  lines = [
    f"One-device mesh: ring_attention vs flash_attention, {opts.dtype}, head_dim "
    f"{opts.head_dim}, {heads} heads, "
    + ("batch·seqlen = 16384" if opts.batch is None else f"batch {opts.batch}"),
    "",
    "| seqlen | causal | pass | flash ms | ring ms | flash TFLOP/s | ring TFLOP/s | ring / flash |",
    "|---|---|---|---|---|---|---|---|",
  ]
  for r in rows:
    lines.append(
      f"| {r['seqlen']} | {'yes' if r['causal'] else 'no'} | "
      f"{'fwd+bwd' if r['backward'] else 'fwd'} | {_ms(r['flash_s'])} | {_ms(r['ring_s'])} | "
      f"{_num(r['flash_tflops'])} | {_num(r['ring_tflops'])} | "
      f"{_num(r['ring_over_flash'], '{:.3f}')} |"
    )
  return "\n".join(lines), rows


def scaling(opts, dtype, devices) -> tuple[str, list[dict]]:
  num = len(devices)
  mesh = jax.sharding.Mesh(np.asarray(devices), (AXIS,))
  sharding = NamedSharding(mesh, P(None, AXIS))
  heads, batch = 2048 // opts.head_dim, opts.batch or 1
  rows = []
  for causal in opts.causals:
    for backward in opts.passes:
      # One device, plain flash_attention, at the reference length: the rate to keep.
      ref_args = make_inputs((batch, opts.ref_seqlen, heads, opts.head_dim), dtype)
      ref = _seconds(flash_fn(causal, backward, opts.implementation), ref_args, opts.rounds)
      ref_rate = _ratio(
        flops(batch, opts.ref_seqlen, heads, opts.head_dim, causal, backward) / 1e12, ref
      )
      del ref_args
      for seqlen in opts.seqlens:
        if seqlen % (2 * num):
          print(f"skip seqlen {seqlen}: not a multiple of 2·{num}", file=sys.stderr)
          continue
        args = make_inputs((batch, seqlen, heads, opts.head_dim), dtype, sharding)
        fn = ring_fn(mesh, causal, opts.layout, backward, opts.implementation)
        seconds = _seconds(fn, args, opts.rounds)
        with noop_kernels():
          noop_fn = ring_fn(mesh, causal, opts.layout, backward, opts.implementation)
          noop = _seconds(noop_fn, args, opts.rounds)
        del args
        per_device = _ratio(
          flops(batch, seqlen, heads, opts.head_dim, causal, backward) / 1e12 / num, seconds
        )
        row = dict(
          devices=num,
          seqlen=seqlen,
          batch=batch,
          causal=causal,
          backward=backward,
          layout=opts.layout,
          ring_s=seconds,
          tflops_per_device=per_device,
          noop_s=noop,
          noop_over_ring=_ratio(noop, seconds),
          ref_seqlen=opts.ref_seqlen,
          ref_tflops=ref_rate,
          efficiency=_ratio(per_device, ref_rate),
        )
        rows.append(row)
        print(f"scaling {row}", file=sys.stderr, flush=True)
  lines = [
    f"Ring over {num} devices, {opts.layout}, {opts.dtype}, head_dim {opts.head_dim}, "
    f"{heads} heads, batch {batch}; one device's flash_attention at seqlen "
    f"{opts.ref_seqlen} for the efficiency",
    "",
    "| devices | seqlen | causal | pass | ring ms | TFLOP/s per device | one device TFLOP/s "
    "| efficiency | no-op kernels ms | no-op / ring |",
    "|---|---|---|---|---|---|---|---|---|---|",
  ]
  for r in rows:
    lines.append(
      f"| {r['devices']} | {r['seqlen']} | {'yes' if r['causal'] else 'no'} | "
      f"{'fwd+bwd' if r['backward'] else 'fwd'} | {_ms(r['ring_s'])} | "
      f"{_num(r['tflops_per_device'])} | {_num(r['ref_tflops'])} | "
      f"{_num(r['efficiency'], '{:.2f}')} | {_ms(r['noop_s'])} | "
      f"{_num(r['noop_over_ring'], '{:.2f}')} |"
    )
  return "\n".join(lines), rows


def _rel_err(actual, expected) -> float:
  actual, expected = (jnp.asarray(x, jnp.float32) for x in (actual, expected))
  return float(jnp.linalg.norm(actual - expected) / jnp.linalg.norm(expected))


def correctness(opts, dtype, devices) -> tuple[str, list[dict]]:
  num = len(devices)
  mesh = jax.sharding.Mesh(np.asarray(devices), (AXIS,))
  heads = 2048 // opts.head_dim
  tolerance = 2e-3 if dtype == jnp.float32 else 2e-2
  rows = []
  for seqlen in opts.seqlens:
    args = make_inputs((opts.batch or 1, seqlen, heads, opts.head_dim), dtype)
    for causal in (False, True):
      want = flash_fn(causal, True, opts.implementation)(*args)
      want = jax.tree.leaves(want)
      for layout in ("contiguous", "zigzag"):
        reorder = functools.partial(ring.zigzag_permute, num_shards=num)
        restore = functools.partial(ring.zigzag_unpermute, num_shards=num)
        if layout == "contiguous":
          reorder = restore = lambda x: x
        fn = ring_fn(mesh, causal, layout, True, opts.implementation)
        sharding = NamedSharding(mesh, P(None, AXIS))
        got = fn(*(jax.device_put(reorder(x), sharding) for x in args))
        got = [restore(x) for x in jax.tree.leaves(got)]
        errors = [_rel_err(g, w) for g, w in zip(got, want, strict=True)]
        row = dict(
          devices=num,
          seqlen=seqlen,
          causal=causal,
          layout=layout,
          **dict(zip(("out", "dq", "dk", "dv"), errors, strict=True)),
          ok=max(errors) < tolerance,
        )
        rows.append(row)
        print(f"correctness {row}", file=sys.stderr, flush=True)
  lines = [
    f"Ring over {num} devices vs one device's flash_attention: relative L2 error, "
    f"{opts.dtype}, head_dim {opts.head_dim}, {heads} heads, batch {opts.batch or 1} "
    f"(PASS: all < {tolerance:g})",
    "",
    "| devices | seqlen | causal | layout | out | dq | dk | dv | |",
    "|---|---|---|---|---|---|---|---|---|",
  ]
  for r in rows:
    errs = " | ".join(f"{r[name]:.1e}" for name in ("out", "dq", "dk", "dv"))
    lines.append(
      f"| {r['devices']} | {r['seqlen']} | {'yes' if r['causal'] else 'no'} | {r['layout']} | "
      f"{errs} | {'PASS' if r['ok'] else 'FAIL'} |"
    )
  return "\n".join(lines), rows


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--overhead", action="store_true", help="one-device mesh vs flash")
  parser.add_argument("--scaling", action="store_true", help="all devices: time, TFLOP/s, no-op")
  parser.add_argument("--correctness", action="store_true", help="ring vs one device")
  parser.add_argument("--seqlens", type=int, nargs="+", help="global sequence lengths")
  parser.add_argument("--head-dim", type=int, default=128)
  parser.add_argument(
    "--batch", type=int, help="default: 16384 // seqlen for --overhead (protocol), else 1"
  )
  parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
  parser.add_argument("--causal", choices=["no", "yes", "both"])
  parser.add_argument("--passes", choices=["fwd", "fwd+bwd", "both"])
  parser.add_argument("--layout", choices=ring.LAYOUTS, default="zigzag")
  parser.add_argument("--devices", type=int, help="ring size for --scaling/--correctness")
  parser.add_argument("--ref-seqlen", type=int, default=16384, help="one device's reference")
  parser.add_argument("--rounds", type=int, default=5, help="timing rounds (bench.time_fn)")
  parser.add_argument("--implementation", nargs="+", help="local kernels (default: best)")
  parser.add_argument("--json", help="write all rows to this file")
  opts = parser.parse_args(argv)

  devices = jax.devices()[: opts.devices] if opts.devices else jax.devices()
  if not (opts.overhead or opts.scaling or opts.correctness):
    opts.overhead, opts.scaling = len(devices) == 1, len(devices) > 1
  dtype = DTYPES[opts.dtype]
  if opts.implementation:
    opts.implementation = tuple(opts.implementation)

  header = (
    f"# {devices[0].device_kind} × {len(devices)}, jax {jax.__version__}, "
    f"{time.strftime('%Y-%m-%d')}"
  )
  print(header, flush=True)
  tables, record = [], {"header": header, "command": " ".join(["python", *sys.argv])}
  if opts.correctness:
    opts_c = argparse.Namespace(**vars(opts))
    opts_c.seqlens = opts.seqlens or [2048 * len(devices)]
    text, record["correctness"] = correctness(opts_c, dtype, devices)
    tables.append(text)
  if opts.overhead:
    opts_o = argparse.Namespace(**vars(opts))
    opts_o.seqlens = opts.seqlens or [4096, 16384]
    opts_o.causals = _choices(opts.causal or "both", {"no": [False], "yes": [True]})
    opts_o.passes = _choices(opts.passes or "both", {"fwd": [False], "fwd+bwd": [True]})
    text, record["overhead"] = overhead(opts_o, dtype)
    tables.append(text)
  if opts.scaling:
    opts_s = argparse.Namespace(**vars(opts))
    opts_s.seqlens = opts.seqlens or [65536, 131072, 262144]
    opts_s.causals = _choices(opts.causal or "yes", {"no": [False], "yes": [True]})
    opts_s.passes = _choices(opts.passes or "fwd+bwd", {"fwd": [False], "fwd+bwd": [True]})
    text, record["scaling"] = scaling(opts_s, dtype, devices)
    tables.append(text)
  if opts.json:
    with open(opts.json, "w") as f:
      json.dump(record, f, indent=1, default=str)
  print("\n\n".join(tables))
  return 0


def _choices(name: str, table: dict) -> list:
  """``table[name]``, or every value in order for ``"both"``."""
  return [x for values in table.values() for x in values] if name == "both" else table[name]


if __name__ == "__main__":
  sys.exit(main())

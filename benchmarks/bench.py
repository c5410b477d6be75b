"""Attention throughput on the current device: ours against cuDNN and XLA, same run.

Protocol (FlashAttention papers, shared/DESIGN.md): bf16, batch·seqlen = 16384,
heads = 2048 / head_dim; forward FLOPs 4·B·T·S·N·H (halved when causal),
forward+backward 3.5× that. By default every implementation that runs compiled on
this device is timed (on a GPU: ours plus cuDNN and XLA's dense attention; on a CPU:
our blockwise XLA path and XLA's dense attention), over the whole protocol, with a
progress bar on stderr. Prints a Markdown table of TFLOP/s and ratios to cuDNN;
``--out DIR`` also writes bench.json, bench.md and bench.png (plots, if matplotlib is
installed; ``benchmarks/plot.py`` makes them later from the JSON).

    python benchmarks/bench.py --out results/                       # everything
    python benchmarks/bench.py --seqlens 1024 4096 --head-dims 128 --passes fwd
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import statistics
import sys
import time
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np

from pallas_attention import available_implementations, flash_attention, tuning

PROTOCOL_SEQLENS = [512, 1024, 2048, 4096, 8192, 16384]
PROTOCOL_HEAD_DIMS = [64, 128, 256]
TOKENS = 16384  # batch·seqlen (--tokens changes it, for small runs on a CPU)


def default_impls() -> list[str]:
  """What runs compiled here: ours (not the CPU interpreters), then the baselines."""
  ours = available_implementations()
  if jax.default_backend() == "gpu":
    return ours + ["cudnn", "xla-dense"]
  return [name for name in ours if name == "xla"] + ["xla-dense"]


class Progress:
  """A one-line progress bar on stderr (a plain line per step when not a terminal)."""

  def __init__(self, total: int):
    self.total, self.done, self.start = total, 0, time.perf_counter()
    self.tty = sys.stderr.isatty()

  def step(self, label: str) -> None:
    self.done += 1
    elapsed = time.perf_counter() - self.start
    left = elapsed / self.done * (self.total - self.done)
    filled = int(30 * self.done / self.total)
    bar = f"[{'#' * filled}{'.' * (30 - filled)}] {self.done}/{self.total}"
    line = f"{bar} {elapsed:4.0f}s, ~{left:.0f}s left  {label}"
    print(
      ("\r" + line.ljust(100)) if self.tty else line,
      end="" if self.tty else "\n",
      file=sys.stderr,
      flush=True,
    )
    if self.tty and self.done == self.total:
      print(file=sys.stderr)


def _fn(impl: str, causal: bool, backward: bool):
  """A jitted function of (q, k, v, do) for one implementation and pass."""
  if impl == "cudnn-det":  # cuDNN with XLA's deterministic ops: its ordered backward
    jitted = _fn("cudnn", causal, backward)
    return _compiled(jitted, {"xla_gpu_deterministic_ops": True})
  if impl in ("cudnn", "xla-dense"):
    name = "cudnn" if impl == "cudnn" else "xla"

    def attn(q, k, v):
      return jax.nn.dot_product_attention(q, k, v, is_causal=causal, implementation=name)
  else:
    # "mosaic-fused": mosaic with deterministic_backward=False (the fused backward, dQ
    # added in no fixed order). "mosaic-twokernel", "mosaic-ordered", "mosaic-serial",
    # "mosaic-pipelined": the default with one table setting changed (see _variant).
    name, _, variant = impl.partition("-")
    deterministic = variant != "fused"

    def attn(q, k, v):
      return flash_attention(
        q, k, v, is_causal=causal, implementation=name, deterministic_backward=deterministic
      )

  if not backward:
    return jax.jit(lambda q, k, v, do: attn(q, k, v))

  def fwd_bwd(q, k, v, do):
    out, vjp = jax.vjp(attn, q, k, v)
    return out, vjp(do)

  return jax.jit(fwd_bwd)


def _compiled(jitted, options):
  """``jitted``, compiled on its first call with these XLA options."""
  cache = {}

  def call(*args):
    if "exe" not in cache:
      cache["exe"] = jitted.lower(*args).compile(compiler_options=options)
    return cache["exe"](*args)

  return call


def time_fn(fn, args, rounds: int = 5, round_seconds: float = 0.1) -> float:
  """Median seconds per call: calls queued back to back, timed per round.

  Each round queues enough calls to last about ``round_seconds`` (at most 20),
  so slow baselines cost a few calls and fast kernels hide dispatch overhead.
  """
  jax.block_until_ready(fn(*args))
  start = time.perf_counter()
  jax.block_until_ready(fn(*args))
  reps = int(min(20, max(1, round_seconds / (time.perf_counter() - start))))
  per_call = []
  for _ in range(rounds):
    start = time.perf_counter()
    out = None
    for _ in range(reps):
      out = fn(*args)
    jax.block_until_ready(out)
    per_call.append((time.perf_counter() - start) / reps)
  return statistics.median(per_call)


def batch_size(seqlen: int) -> int:
  """The protocol's batch at a length: batch·seqlen = TOKENS."""
  return max(1, TOKENS // seqlen)


def inputs(seqlen: int, head_dim: int, seed: int = 0, heads: int | None = None):
  """q, k, v, dO of the protocol's shape (``heads``: 2048 / head_dim unless given)."""
  heads = heads or 2048 // head_dim
  keys = jax.random.split(jax.random.key(seed), 4)
  shape = (batch_size(seqlen), seqlen, heads, head_dim)
  return [jax.random.normal(key, shape, jnp.bfloat16) for key in keys]


def flops(
  seqlen: int, head_dim: int, causal: bool, backward: bool, heads: int | None = None
) -> float:
  heads = heads or 2048 // head_dim
  fwd = 4.0 * batch_size(seqlen) * seqlen * seqlen * heads * head_dim / (2 if causal else 1)
  return fwd * (3.5 if backward else 1.0)


def point_arguments(parser: argparse.ArgumentParser) -> None:
  """The options of the one-point GPU probes (profile_step.py, sustained_probe.py)."""
  parser.add_argument("--seqlen", type=int, default=16384)
  parser.add_argument("--head-dim", type=int, default=128)
  parser.add_argument("--causal", action="store_true")
  parser.add_argument("--impls", nargs="+", default=["mosaic", "cudnn"])


@contextlib.contextmanager
def _variant(impl: str):
  """mosaic with one table setting changed, traced apart from the other implementations'
  calls (jit caches key on the Problem, not on the table): "mosaic-twokernel",
  tuning.DETERMINISTIC_FUSED off; "mosaic-ordered", the ordered fused backward wherever
  the head dim has one, at every key length, causal or not; "mosaic-serial" /
  "mosaic-pipelined", every head dim's forward with fwd_pipelined off / on; "mosaic-qN",
  every forward with N query tiles a CTA (tuning.forward_q_tiles); "mosaic-nosplit", the
  forward's last wave left as it is (tuning.FWD_KV_SPLIT off)."""
  patches = {
    "mosaic-twokernel": lambda: mock.patch.object(tuning, "DETERMINISTIC_FUSED", False),
    "mosaic-ordered": _ordered_everywhere,
    "mosaic-serial": lambda: _forward_pipelined(False),
    "mosaic-pipelined": lambda: _forward_pipelined(True),
    "mosaic-nosplit": lambda: mock.patch.object(tuning, "FWD_KV_SPLIT", False),
  }
  if impl.startswith("mosaic-q") and impl[len("mosaic-q") :].isdigit():
    q_tiles = int(impl[len("mosaic-q") :])
    patches[impl] = lambda: mock.patch.object(tuning, "forward_q_tiles", lambda *_: q_tiles)
  if impl not in patches:
    yield
    return
  jax.clear_caches()
  try:
    with patches[impl]():
      yield
  finally:
    jax.clear_caches()


@contextlib.contextmanager
def _ordered_everywhere():
  """The ordered fused backward at every key length (and its blocks, which the table
  keeps from short causal calls at head dim 128)."""
  everywhere = {key: 0 for key in tuning._ORDERED_MIN_KV}
  with (
    mock.patch.dict(tuning._ORDERED_MIN_KV, everywhere),
    mock.patch.object(tuning, "_FUSED_MIN_CAUSAL_KV", 0),
  ):
    yield


@contextlib.contextmanager
def _forward_pipelined(on: bool):
  """Every head dim's forward with one loop, at every key length."""
  table = {
    hd: dataclasses.replace(blocks, fwd_pipelined=on) for hd, blocks in tuning._MOSAIC.items()
  }
  with mock.patch.dict(tuning._MOSAIC, table), mock.patch.object(tuning, "_PIPELINED_MIN_KV", 0):
    yield


def measure(impl, seqlen, head_dim, causal, backward) -> float | str:
  """TFLOP/s, or a short reason it did not run."""
  args = inputs(seqlen, head_dim)
  try:
    with _variant(impl):
      seconds = time_fn(_fn(impl, causal, backward), args)
  except Exception as err:  # noqa: BLE001 -- a benchmark records failures and goes on
    text = str(err).split("\n")[0]
    if "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower():
      return "OOM"
    return f"error: {type(err).__name__}: {text[:80]}"
  return flops(seqlen, head_dim, causal, backward) / seconds / 1e12


def main(argv=None) -> int:
  global TOKENS
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--seqlens", type=int, nargs="+", default=PROTOCOL_SEQLENS)
  parser.add_argument("--head-dims", type=int, nargs="+", default=PROTOCOL_HEAD_DIMS)
  parser.add_argument("--causal", choices=["no", "yes", "both"], default="both")
  parser.add_argument("--passes", choices=["fwd", "fwd+bwd", "both"], default="both")
  parser.add_argument(
    "--impls",
    nargs="+",
    help="default: every implementation that runs compiled here; also mosaic-fused "
    "(mosaic with deterministic_backward=False), mosaic-twokernel (the deterministic "
    "backward as two kernels), mosaic-ordered (the ordered fused backward at every "
    "length, causal or not), mosaic-serial / mosaic-pipelined (every forward with "
    "that consumer loop), mosaic-qN (every forward with N query tiles a CTA) and "
    "mosaic-nosplit (the forward's last wave not split, tuning.FWD_KV_SPLIT off); "
    "cudnn-det: cuDNN with xla_gpu_deterministic_ops (its backward then adds dQ in a "
    "fixed order; by default it does not)",
  )
  parser.add_argument("--json", help="write all results to this file")
  parser.add_argument("--out", help="write bench.json, bench.md and bench.png into this folder")
  parser.add_argument("--tokens", type=int, default=TOKENS, help="batch·seqlen (protocol: 16384)")
  opts = parser.parse_args(argv)
  impls = opts.impls or default_impls()
  TOKENS = opts.tokens

  causals = {"no": [False], "yes": [True], "both": [False, True]}[opts.causal]
  passes = {"fwd": [False], "fwd+bwd": [True], "both": [False, True]}[opts.passes]
  device = jax.devices()[0]
  header = f"# {device.device_kind}, jax {jax.__version__}, bf16, TFLOP/s"
  print(header, flush=True)
  results = []
  progress = Progress(
    len(opts.head_dims) * len(causals) * len(passes) * len(opts.seqlens) * len(impls)
  )
  for head_dim in opts.head_dims:
    for causal in causals:
      for backward in passes:
        for seqlen in opts.seqlens:
          row = {
            "head_dim": head_dim,
            "causal": causal,
            "pass": "fwd+bwd" if backward else "fwd",
            "seqlen": seqlen,
          }
          for impl in impls:
            row[impl] = measure(impl, seqlen, head_dim, causal, backward)
            # The value goes into the progress line too: a run cut off by a time limit
            # keeps what it measured in its log.
            progress.step(
              f"hd={head_dim} {'causal ' if causal else ''}{row['pass']} {seqlen} {impl}"
              f" = {_number(row[impl])}"
            )
          results.append(row)

  text = table(results, impls)
  print(text)
  record = {
    "device": device.device_kind,
    "jax": jax.__version__,
    "date": time.strftime("%Y-%m-%d"),
    "command": " ".join(["python", *sys.argv]),
    "tokens": TOKENS,
    "impls": impls,
    "results": results,
  }
  paths = [opts.json] if opts.json else []
  if opts.out:
    os.makedirs(opts.out, exist_ok=True)
    paths.append(os.path.join(opts.out, "bench.json"))
    with open(os.path.join(opts.out, "bench.md"), "w") as f:
      f.write(f"{header}\n\n{text}\n")
  for path in paths:
    with open(path, "w") as f:
      json.dump(record, f, indent=1)
  if opts.out:
    try:
      import plot
    except ImportError as err:  # matplotlib missing: the JSON can be plotted later
      print(f"no plot ({err}); run benchmarks/plot.py on bench.json", file=sys.stderr)
    else:
      plot.throughput(record, os.path.join(opts.out, "bench.png"))
  return 0


def _number(x) -> str:
  if not isinstance(x, float):
    return x  # OOM or an error
  return f"{x:.0f}" if x >= 10 else f"{x:.2g}"


def table(results, impls) -> str:
  """Markdown: TFLOP/s per implementation, then each one's ratio to cuDNN (if timed)."""
  others = [i for i in impls if i != "cudnn"] if "cudnn" in impls else []
  head = ["head_dim", "causal", "pass", "seqlen", *impls, *(f"{i}/cuDNN" for i in others)]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for row in results:
    shown = [_number(row[i]) for i in impls]
    ratios = []
    for impl in others:
      a, c = row[impl], row["cudnn"]
      ratios.append(f"{a / c:.2f}" if isinstance(a, float) and isinstance(c, float) else "-")
    causal = "yes" if row["causal"] else "no"
    cells = [str(row["head_dim"]), causal, row["pass"], str(row["seqlen"]), *shown, *ratios]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


if __name__ == "__main__":
  np.set_printoptions(precision=3)
  sys.exit(main())

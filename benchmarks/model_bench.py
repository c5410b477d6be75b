"""Whole-model training speed and memory: examples/train_lm.py's transformer LM with our
attention, Flax's default attention and cuDNN's, in one run.

Defaults are GPT-2 small: 12 layers, width 768, 12 heads (head_dim 64), vocab 50304
(GPT-2's 50257 padded to a multiple of 64), tied embeddings, learned positions (so
``seqlen × width`` parameters more at longer sequences: 124M at 1k, 136M at 16k);
bfloat16 compute with float32 parameters and Adam state (mixed precision). Every step
sees the same number of tokens (``--tokens``, default 16384), so
``batch = tokens // seqlen``. Causal self-attention, no dropout.

Each (seqlen, attention) runs in a fresh process, so that the allocator's peak
(``memory_stats()["peak_bytes_in_use"]``) belongs to that configuration alone and a
crash or out-of-memory ends only that row ("OOM" in the table). Reported: tokens/s
over ``--steps`` timed steps after one warm-up step, peak device memory, compile time.
A configuration costs 15-35 s of wall time on an H100, mostly process start and
compilation (the 16k row of three took 75 s), so the default 3 × 3 run takes about 4
minutes.

    python benchmarks/model_bench.py                      # GPU: 3 seqlens x 3 attentions
    python benchmarks/model_bench.py --layers 2 --width 64 --heads 2 --vocab 256 \\
        --seqlens 64 128 --tokens 256 --steps 2 --dtype float32   # CPU smoke run
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import pathlib
import subprocess
import sys
import time

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"
ATTENTIONS = ("ours", "flax", "cudnn")


def load_train_lm():
  spec = importlib.util.spec_from_file_location("train_lm", EXAMPLES / "train_lm.py")
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module  # dataclasses look their module up there
  spec.loader.exec_module(module)
  return module


def is_oom(err: BaseException) -> bool:
  text = str(err)
  return "RESOURCE_EXHAUSTED" in text or "Out of memory" in text or "out of memory" in text


def child(config: dict) -> dict:
  """Compiles and times one configuration in this process; returns a result row."""
  import jax
  import jax.numpy as jnp

  train_lm = load_train_lm()
  steps = config.pop("steps")
  cfg = train_lm.Config(**config, steps=steps)
  device = jax.devices()[0]
  row = dict(config, steps=steps, device=device.device_kind, backend=jax.default_backend())
  try:
    graphdef, params, rest, opt_state = train_lm.init(cfg)
    row["params_M"] = round(sum(x.size for x in jax.tree.leaves(params)) / 1e6, 1)
    tokens = jax.random.randint(jax.random.key(0), (cfg.batch, cfg.seqlen + 1), 0, cfg.vocab)
    start = time.perf_counter()
    train_step = (
      train_lm.make_train_step(graphdef, cfg).lower(params, rest, opt_state, tokens).compile()
    )
    row["compile_s"] = round(time.perf_counter() - start, 1)
    params, opt_state, loss = train_step(params, rest, opt_state, tokens)  # warm-up
    jax.block_until_ready(loss)
    start = time.perf_counter()
    for _ in range(steps):
      params, opt_state, loss = train_step(params, rest, opt_state, tokens)
    jax.block_until_ready(loss)
    step_s = (time.perf_counter() - start) / steps
    row.update(step_ms=round(1e3 * step_s, 2), tokens_per_s=round(cfg.batch * cfg.seqlen / step_s))
    row["loss"] = round(float(loss), 4)
    if not jnp.isfinite(loss):
      row["error"] = "non-finite loss"
  except Exception as err:  # noqa: BLE001 -- one failed row must not end the run
    row["error"] = "OOM" if is_oom(err) else f"{type(err).__name__}: {str(err)[:300]}"
  stats = device.memory_stats() or {}
  if "peak_bytes_in_use" in stats:
    row["peak_GiB"] = round(stats["peak_bytes_in_use"] / 2**30, 2)
  return row


def run_config(config: dict, timeout: float) -> dict:
  argv = [sys.executable, __file__, "--child", json.dumps(config)]
  try:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
  except subprocess.TimeoutExpired:
    return dict(config, error=f"timeout ({timeout:.0f} s)")
  for line in reversed(proc.stdout.splitlines()):
    if line.startswith("{"):
      return json.loads(line)
  tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
  error = "OOM" if any("RESOURCE_EXHAUSTED" in line for line in tail) else " | ".join(tail)
  return dict(config, error=f"exit {proc.returncode}: {error}"[:300])


def cell(row: dict | None, key: str, fmt: str) -> str:
  if row is None:
    return "-"
  if "error" in row:
    return "OOM" if row["error"] == "OOM" else "error"
  return fmt.format(row[key]) if key in row else "n/a"


def markdown(rows: list[dict], attentions: list[str]) -> str:
  by_key = {(r["seqlen"], r["attention"]): r for r in rows}
  seqlens = sorted({r["seqlen"] for r in rows})
  head = ["seqlen", "batch"]
  head += [f"{a} tokens/s" for a in attentions]
  ratios = [(a, b) for a, b in (("ours", "cudnn"), ("ours", "flax")) if {a, b} <= set(attentions)]
  head += [f"{a}/{b}" for a, b in ratios]
  head += [f"{a} peak GiB" for a in attentions]
  head += [f"{a} compile s" for a in attentions]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for seqlen in seqlens:
    row_of = {a: by_key.get((seqlen, a)) for a in attentions}
    batch = next(r["batch"] for r in row_of.values() if r is not None)
    cells = [str(seqlen), str(batch)]
    cells += [cell(row_of[a], "tokens_per_s", "{:,}") for a in attentions]
    for a, b in ratios:
      ra, rb = row_of[a], row_of[b]
      ok = all(r is not None and "tokens_per_s" in r and "error" not in r for r in (ra, rb))
      cells.append(f"{ra['tokens_per_s'] / rb['tokens_per_s']:.2f}" if ok else "-")
    cells += [cell(row_of[a], "peak_GiB", "{:.2f}") for a in attentions]
    cells += [cell(row_of[a], "compile_s", "{:.0f}") for a in attentions]
    lines.append("| " + " | ".join(cells) + " |")
  errors = [r for r in rows if r.get("error", "OOM") != "OOM"]
  lines += [""] * bool(errors)
  lines += [f"- error, seqlen {r['seqlen']}, {r['attention']}: {r['error']}" for r in errors]
  return "\n".join(lines)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--seqlens", type=int, nargs="+", default=[1024, 4096, 16384])
  parser.add_argument("--attention", nargs="+", default=list(ATTENTIONS), choices=ATTENTIONS)
  parser.add_argument("--tokens", type=int, default=16384, help="tokens per step (batch*seqlen)")
  parser.add_argument("--layers", type=int, default=12)
  parser.add_argument("--width", type=int, default=768)
  parser.add_argument("--heads", type=int, default=12)
  parser.add_argument("--vocab", type=int, default=50304)
  parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
  parser.add_argument("--steps", type=int, default=10, help="timed steps after one warm-up")
  parser.add_argument("--timeout", type=float, default=150, help="seconds per configuration")
  parser.add_argument("--json", help="also write the rows to this file")
  parser.add_argument("--child", help=argparse.SUPPRESS)
  opts = parser.parse_args(argv)
  if opts.child:
    print(json.dumps(child(json.loads(opts.child))), flush=True)
    return 0

  rows = []
  for seqlen in opts.seqlens:
    for attention in opts.attention:
      config = dict(
        vocab=opts.vocab,
        layers=opts.layers,
        width=opts.width,
        heads=opts.heads,
        seqlen=seqlen,
        batch=max(1, opts.tokens // seqlen),
        attention=attention,
        dtype=opts.dtype,
        steps=opts.steps,
      )
      start = time.perf_counter()
      row = run_config(config, opts.timeout)
      row["wall_s"] = round(time.perf_counter() - start, 1)
      rows.append(row)
      print(json.dumps(row), flush=True)
  if opts.json:
    pathlib.Path(opts.json).write_text(json.dumps(rows, indent=1) + "\n")
  device = next((r["device"] for r in rows if "device" in r), "unknown device")
  print(
    f"\n{device}: {opts.layers} layers, width {opts.width}, {opts.heads} heads, vocab "
    f"{opts.vocab}, {opts.dtype} compute / float32 params, {opts.tokens} tokens per step, "
    f"mean of {opts.steps} steps\n"
  )
  print(markdown(rows, opts.attention))
  return 0


if __name__ == "__main__":
  sys.exit(main())

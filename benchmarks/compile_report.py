"""What ptxas made of the Mosaic GPU kernels: registers, spills, serialized wgmma, time.

Each kernel is compiled with MOSAIC_GPU_DUMP_PTXAS, so ptxas prints its resource report
and warnings, and then timed at protocol shapes (bf16, batch·seqlen = 16k). One line
per kernel compile: TFLOP/s of the call, registers, spill bytes, and whether ptxas
serialized the kernel's wgmma instructions, with its code (info C7513: a register operand
of a wgmma defined while one is in flight; C7512: too few registers). The raw dumps are
kept under ``--out``.

    python benchmarks/compile_report.py --out /tmp/report                 # forward variants
    python benchmarks/compile_report.py --out /tmp/report --part bwd      # backward kernels

``--sass`` also dumps each kernel's SASS (MOSAIC_GPU_DUMP_SASS) and counts local-memory
loads and stores (where spills go), HGMMA and warpgroup waits per kernel. Mosaic GPU runs
nvdisasm from MOSAIC_GPU_CUDA_ROOT/bin, which jax points at the CUDA pip packages (no
nvdisasm there); when it is missing there but on the PATH or in /usr/local/cuda, a
shadow root with it is made for the run.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import re
import sys
import tempfile

from bench import flops, inputs, time_fn

FORWARD_VARIANTS = {  # name -> forward options
  "serial": dict(pipelined=False),
  "pipelined": dict(pipelined=True),
  "serial-nosched": dict(pipelined=False, schedule=False),
  "pipelined-nosched": dict(pipelined=True, schedule=False),
}


@contextlib.contextmanager
def _captured_fds():
  """Collect what native code writes to stdout and stderr (ptxas reports go there)."""
  buf = tempfile.TemporaryFile(mode="w+b")
  saved = [os.dup(1), os.dup(2)]
  sys.stdout.flush()
  sys.stderr.flush()
  os.dup2(buf.fileno(), 1)
  os.dup2(buf.fileno(), 2)
  text = io.StringIO()
  try:
    yield text
  finally:
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(saved[0], 1)
    os.dup2(saved[1], 2)
    buf.seek(0)
    text.write(buf.read().decode(errors="replace"))


SASS_OPS = ("LDL", "STL", "HGMMA", "WARPGROUP.DEPBAR", "WARPGROUP.ARRIVE")


def _nvdisasm_root() -> str | None:
  """A CUDA root whose bin/ holds nvdisasm, for Mosaic GPU's SASS dumps (see above)."""
  import shutil

  root = os.environ.get("MOSAIC_GPU_CUDA_ROOT", "")
  if os.path.exists(os.path.join(root, "bin", "nvdisasm")):
    return root
  tool = shutil.which("nvdisasm") or "/usr/local/cuda/bin/nvdisasm"
  if not os.path.exists(tool) or not os.path.isdir(root):
    return None
  shadow = tempfile.mkdtemp(prefix="cuda_root_")
  for name in os.listdir(root):
    if name != "bin":
      os.symlink(os.path.join(root, name), os.path.join(shadow, name))
  os.mkdir(os.path.join(shadow, "bin"))
  bin_dir = os.path.join(root, "bin")
  for name in os.listdir(bin_dir) if os.path.isdir(bin_dir) else []:
    os.symlink(os.path.join(bin_dir, name), os.path.join(shadow, "bin", name))
  os.symlink(tool, os.path.join(shadow, "bin", "nvdisasm"))
  return shadow


def summarize(text: str) -> list[str]:
  """One entry per kernel compile in a ptxas dump: registers, spills, serialization."""
  kernels = []
  for block in re.split(r"(?<=Compile time = )[\d.]+ ms", text)[:-1]:
    regs = re.search(r"Used (\d+) registers", block)
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", block)
    serial = re.search(r"\((C75\d\d)\)[^\n]*wgmma[^\n]*serialized", block)
    kernels.append(
      f"regs={regs.group(1) if regs else '?'} "
      f"spill={spill.group(1) + '/' + spill.group(2) if spill else '?'}"
      f"{f' SERIALIZED-WGMMA ({serial.group(1)})' if serial else ''}"
    )
  sass = [op for op in SASS_OPS if re.search(rf"\b{re.escape(op)}\b", text)]
  if sass:  # SASS follows the ptxas reports; counted over the whole dump
    counts = " ".join(f"{op}={len(re.findall(rf'\b{re.escape(op)}\b', text))}" for op in SASS_OPS)
    kernels.append(f"sass: {counts}")
  return kernels


def compile_and_time(run, args, work: float) -> tuple[float, str]:
  """Compile ``run`` on ``args`` (what native code prints meanwhile: the ptxas reports,
  when MOSAIC_GPU_DUMP_PTXAS was set before jax compiled anything), then time it:
  ``(TFLOP/s for `work` FLOPs, the printed text)``. Clears jax's caches after, so the
  next case compiles (and reports) afresh."""
  import jax

  with _captured_fds() as dump:
    jax.block_until_ready(run(*args))
  tflops = work / time_fn(run, args) / 1e12
  jax.clear_caches()
  return tflops, dump.getvalue()


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--out", required=True)
  parser.add_argument("--part", choices=["fwd", "bwd"], default="fwd")
  parser.add_argument("--head-dims", type=int, nargs="+", default=[128])
  parser.add_argument("--seqlen", type=int, default=4096)
  parser.add_argument("--variants", nargs="+", default=list(FORWARD_VARIANTS))
  parser.add_argument("--causal", choices=["no", "yes", "both"], default="no")
  parser.add_argument("--sass", action="store_true", help="also dump and count SASS")
  opts = parser.parse_args()
  os.makedirs(opts.out, exist_ok=True)
  os.environ["MOSAIC_GPU_DUMP_PTXAS"] = "1"
  import jax
  from jax.experimental.mosaic import gpu as _  # noqa: F401 -- sets MOSAIC_GPU_CUDA_ROOT

  if opts.sass:
    root = _nvdisasm_root()  # after the import above, which would overwrite it
    if root is None:
      print("no nvdisasm found: no SASS", file=sys.stderr)
    else:
      os.environ["MOSAIC_GPU_CUDA_ROOT"] = root
      os.environ["MOSAIC_GPU_DUMP_SASS"] = "1"

  from pallas_attention import core, masks, tiles, tuning
  from pallas_attention.mosaic import attention as mosaic
  from pallas_attention.mosaic import forward as fwd
  from pallas_attention.problem import Problem

  causals = {"no": [False], "yes": [True], "both": [False, True]}[opts.causal]
  cases = []  # (tag, function, args, flops)
  for head_dim in opts.head_dims:
    q, k, v, do = inputs(opts.seqlen, head_dim)
    for causal in causals:
      spec = masks.MaskSpec(causal=causal)
      tag = f"hd{head_dim}_{'causal' if causal else 'full'}"
      if opts.part == "fwd":
        blocks = tuning.mosaic_blocks(head_dim, causal, opts.seqlen)
        for name in opts.variants:
          options = {
            **dict(scale=head_dim**-0.5, spec=spec, q_len=opts.seqlen, kv_len=opts.seqlen),
            **blocks.forward_options(),
            **FORWARD_VARIANTS[name],  # the variant's loop, not the table's
          }
          run = jax.jit(lambda q, k, v, options=options: fwd.forward(q, k, v, **options))
          cases.append(
            (f"{tag}_{name}", run, (q, k, v), flops(opts.seqlen, head_dim, causal, False))
          )
        continue
      for deterministic in (True, False):
        problem = Problem(head_dim**-0.5, spec, "mosaic", deterministic_backward=deterministic)
        out, lse2 = jax.jit(lambda q, k, v, p=problem: mosaic.forward(p, q, k, v, *[None] * 4))(
          q, k, v
        )
        delta = core.row_delta(out, do)
        args = (do, tiles.backward_lse(lse2), delta)
        run = jax.jit(
          lambda *a, p=problem, q=q, k=k, v=v: mosaic.backward(p, q, k, v, *[None] * 4, *a)
        )
        kind = "det" if deterministic else "nondet"
        cases.append(
          (f"{tag}_bwd_{kind}", run, args, flops(opts.seqlen, head_dim, causal, True) / 3.5 * 2.5)
        )
  lines = []
  for tag, run, args, work in cases:
    tflops, text = compile_and_time(run, args, work)
    with open(os.path.join(opts.out, f"{tag}.txt"), "w") as f:
      f.write(text)
    lines.append(f"{tag}: {tflops:.0f} TFLOP/s | " + " ; ".join(summarize(text)))
    print(lines[-1], flush=True)
  with open(os.path.join(opts.out, "report.txt"), "w") as f:
    f.write("\n".join(lines) + "\n")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())

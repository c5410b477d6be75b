"""Hashes of the Mosaic GPU kernels a GPU would run, lowered for CUDA here (no GPU needed).

For a change that should leave the kernels alone (a refactor, a new option that is off
by default): save the hashes before it, compare after.

    python benchmarks/kernel_hashes.py --save /tmp/kernels.txt
    # ... the change ...
    python benchmarks/kernel_hashes.py --compare /tmp/kernels.txt   # exit 1 if any differ

One line a case: the part (fwd; bwd with the deterministic default or the opt-in
unordered backward), head_dim, causal, seqlen, query / kv heads, and a SHA-256 prefix of
the Mosaic GPU modules it lowers to, printed without source locations (moving code
leaves a hash alone; changing what is traced does not). The blocks are the package
table's for that call on a GPU (``mosaic.attention.default_blocks``), P in registers as
on a GPU; batch 1. Lowering runs Mosaic GPU's checks (layouts, shared memory) but not
ptxas: equal hashes mean the same kernel source for the GPU compiler.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import itertools
import re
import sys

import jax
import jax.numpy as jnp
from jax.experimental.mosaic.gpu import core as mgpu_core

from pallas_attention import masks
from pallas_attention.mosaic import attention
from pallas_attention.mosaic import backward as mosaic_bwd
from pallas_attention.mosaic import forward as mosaic_fwd

HEAD_DIMS = (64, 128, 256)
SEQLENS = (1024, 4096, 16384)
HEADS = ((2, 2), (4, 2))  # (query heads, kv heads): plain and GQA


# A per-process counter in each module's dump file name (attention_fwd_0, _1, ...).
_DUMP_NAME = re.compile(r'mosaic_gpu\.dump_basename = "[^"]*"')


@contextlib.contextmanager
def _modules():
  """Collect the text (no locations) of every Mosaic GPU module lowered inside."""
  texts: list[str] = []
  original = mgpu_core._run_serde_pass

  def spy(module, **kwargs):
    text = module.operation.get_asm(enable_debug_info=False)
    texts.append(_DUMP_NAME.sub("", text))
    return original(module, **kwargs)

  mgpu_core._run_serde_pass = spy
  try:
    yield texts
  finally:
    mgpu_core._run_serde_pass = original


def case_hash(part: str, head_dim: int, causal: bool, seqlen: int, heads: int, kv_heads: int):
  """SHA-256 prefix of the Mosaic GPU modules of one case; ``part``: "fwd", "bwd"
  (deterministic) or "bwd-unordered"."""
  deterministic = part != "bwd-unordered"
  blocks = attention.default_blocks(head_dim, causal, seqlen, deterministic, interpreter=False)
  q = jax.ShapeDtypeStruct((1, seqlen, heads, head_dim), jnp.bfloat16)
  k = jax.ShapeDtypeStruct((1, seqlen, kv_heads, head_dim), jnp.bfloat16)
  vec = jax.ShapeDtypeStruct((1, heads, seqlen), jnp.float32)
  static = dict(scale=0.125, spec=masks.MaskSpec(causal), q_len=seqlen, kv_len=seqlen)
  if part == "fwd":
    pairs = blocks.fwd_head_pairs and (heads // kv_heads) % 2 == 0
    options = dict(blocks.forward_options(), head_pairs=pairs)

    def call(q, k, v):
      return mosaic_fwd.forward(q, k, v, **static, **options, p_in_registers=True, interpret=False)

    args = (q, k, k)
  else:

    def call(q, k, v, do, lse2, delta):
      return mosaic_bwd.kernels(
        q, k, v, do, lse2, delta, **static, blocks=blocks, p_in_registers=True,
        interpret=False, deterministic=deterministic,
      )  # fmt: skip

    args = (q, k, k, q, vec, vec)
  jax.clear_caches()  # lower again: a cached kernel would not reach _modules
  with _modules() as texts:
    jax.jit(call).trace(*args).lower(lowering_platforms=("cuda",))
  if not texts:
    raise RuntimeError(f"{part} {head_dim} {causal} {seqlen}: no Mosaic GPU module lowered")
  return hashlib.sha256("\n".join(texts).encode()).hexdigest()[:16]


def cases(head_dims=HEAD_DIMS, seqlens=SEQLENS, heads=HEADS, parts=("fwd", "bwd", "bwd-unordered")):
  for part, h, causal, t, (n, kvh) in itertools.product(
    parts, head_dims, (False, True), seqlens, heads
  ):
    if (
      part == "bwd-unordered" and not attention.default_blocks(h, causal, t, False, False).bwd_fused
    ):
      continue  # the opt-in runs the deterministic default's kernels here
    yield part, h, causal, t, n, kvh


def hashes(**selection) -> dict[str, str]:
  """``{case label: hash}`` for the selected cases (``cases``' arguments)."""
  out = {}
  for part, h, causal, t, n, kvh in cases(**selection):
    label = f"{part} h={h} causal={int(causal)} t={t} heads={n}/{kvh}"
    out[label] = case_hash(part, h, causal, t, n, kvh)
  return out


def compare(now: dict[str, str], before: dict[str, str]) -> list[str]:
  """The cases of ``now`` whose hash differs from ``before`` or that ``before`` lacks
  (the file may hold more cases than were selected now: those are not compared)."""
  return sorted(k for k in now if now[k] != before.get(k))


def read(path: str) -> dict[str, str]:
  with open(path) as f:
    return dict(line.rstrip("\n").rsplit(" ", 1) for line in f if line.strip())


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--head-dims", type=int, nargs="+", default=HEAD_DIMS)
  parser.add_argument("--seqlens", type=int, nargs="+", default=SEQLENS)
  parser.add_argument("--save", help="write the hashes to this file")
  parser.add_argument("--compare", help="compare with a file --save wrote; exit 1 on a difference")
  opts = parser.parse_args(argv)
  now = hashes(head_dims=tuple(opts.head_dims), seqlens=tuple(opts.seqlens))
  text = "".join(f"{label} {digest}\n" for label, digest in now.items())
  print(text, end="")
  if opts.save:
    with open(opts.save, "w") as f:
      f.write(text)
  if opts.compare:
    changed = compare(now, read(opts.compare))
    print(
      f"\n{len(changed)} of {len(now)} cases differ or are not in {opts.compare}",
      *changed,
      sep="\n",
      file=sys.stderr,
    )
    return 1 if changed else 0
  return 0


if __name__ == "__main__":
  sys.exit(main())

"""Demo: flash_attention against jax.nn.dot_product_attention on this machine.

Prints the device, the implementation that ``implementation=None`` picks, the
relative error of the output and gradients against ``jax.nn``'s XLA attention
and, on a GPU, the time of forward+backward for ours, cuDNN and XLA.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

import pallas_attention
from pallas_attention import flash_attention


def rel_err(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.linalg.norm(a - b) / np.linalg.norm(b)


def timed(fn, *args, reps=20):
  jax.block_until_ready(fn(*args))
  start = time.perf_counter()
  for _ in range(reps):
    out = fn(*args)
  jax.block_until_ready(out)
  return (time.perf_counter() - start) / reps


def main():
  on_gpu = jax.default_backend() == "gpu"
  device = jax.devices()[0]
  print(f"device: {device.device_kind} ({jax.default_backend()}), jax {jax.__version__}")
  print(f"implementations here, fastest first: {pallas_attention.available_implementations()}")

  batch, seqlen, heads, kv_heads, head_dim = (4, 2048, 16, 4, 128) if on_gpu else (2, 512, 4, 2, 64)
  dtype = jnp.bfloat16 if on_gpu else jnp.float32
  keys = jax.random.split(jax.random.key(0), 4)
  q = jax.random.normal(keys[0], (batch, seqlen, heads, head_dim), dtype)
  k = jax.random.normal(keys[1], (batch, seqlen, kv_heads, head_dim), dtype)
  v = jax.random.normal(keys[2], (batch, seqlen, kv_heads, head_dim), dtype)
  do = jax.random.normal(keys[3], q.shape, dtype)
  print(f"shape: q {q.shape}, k/v {k.shape} (GQA), {jnp.dtype(dtype).name}, causal")

  def ours(q, k, v):
    return flash_attention(q, k, v, is_causal=True)

  def theirs(q, k, v, implementation="xla"):
    return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=implementation)

  def fwd_bwd(attn):
    def run(q, k, v, do):
      out, vjp = jax.vjp(attn, q, k, v)
      return out, *vjp(do)

    return jax.jit(run)

  # The reference runs in float32 from the same inputs.
  up = lambda x: x.astype(jnp.float32)  # noqa: E731
  ref = fwd_bwd(theirs)(up(q), up(k), up(v), up(do))
  got = fwd_bwd(ours)(q, k, v, do)
  for name, a, b in zip(("out", "dq", "dk", "dv"), got, ref, strict=True):
    print(f"  {name}: relative error vs jax.nn (float32) {rel_err(a, b):.2e}")

  if on_gpu:
    print("forward+backward time:")
    candidates = {
      "pallas_attention": ours,
      "cuDNN": lambda q, k, v: theirs(q, k, v, "cudnn"),
      "XLA": theirs,
    }
    for name, attn in candidates.items():
      print(f"  {name:17s} {timed(fwd_bwd(attn), q, k, v, do) * 1e3:7.2f} ms")


if __name__ == "__main__":
  main()

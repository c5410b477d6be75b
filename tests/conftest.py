"""Shared test helpers: the float64 oracle, random inputs, the GPU marker."""

from __future__ import annotations

import os
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_attention import reference

# test_ring.py needs several devices: on CPU, XLA makes them from host threads. The
# flag is read when JAX starts its backends (the first device query, below), not
# at import. Other tests run on the first device as before.
RING_DEVICES = 8
_xla_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _xla_flags:
  os.environ["XLA_FLAGS"] = (
    f"{_xla_flags} --xla_force_host_platform_device_count={RING_DEVICES}".strip()
  )

ON_GPU = jax.default_backend() == "gpu"
# Every implementation that can run here: on CPU Triton runs in interpret mode.
IMPLEMENTATIONS = ["xla", "triton"]
TOLERANCE = {jnp.float32: 2e-3, jnp.bfloat16: 2e-2, jnp.float16: 2e-2}


def pytest_collection_modifyitems(config, items):
  if ON_GPU:
    return
  skip = pytest.mark.skip(reason="needs a GPU (runs on the device machine)")
  for item in items:
    if "gpu" in item.keywords:
      item.add_marker(skip)


@pytest.fixture
def rng(request):
  """A generator seeded from the test's name: fresh inputs per case, the same in every
  run (a CRC of the name: Python's str hash changes from process to process)."""
  return np.random.default_rng(zlib.crc32(request.node.nodeid.encode()))


def normal(rng, shape, dtype=jnp.float32, scale=1.0):
  return jnp.asarray(scale * rng.standard_normal(shape), dtype)


def rel_err(actual, expected) -> float:
  actual = np.asarray(actual, np.float64)
  expected = np.asarray(expected, np.float64)
  assert np.all(np.isfinite(actual)), "non-finite values"
  denom = np.linalg.norm(expected)
  return float(np.linalg.norm(actual - expected) / (denom if denom > 0 else 1.0))


def reference_with_grads(q, k, v, cotangent, bias=None, **kwargs):
  """Float64 out, lse and gradients of sum(out * cotangent) w.r.t. q, k, v (and bias)."""
  with jax.enable_x64(True):
    to64 = lambda x: None if x is None else jnp.asarray(np.asarray(x, np.float64))  # noqa: E731
    q, k, v, bias, cotangent = map(to64, (q, k, v, bias, cotangent))

    def loss(q, k, v, bias):
      out, _ = reference.attention(q, k, v, bias, **kwargs)
      return jnp.sum(out * cotangent)

    out, lse = reference.attention(q, k, v, bias, **kwargs)
    argnums = (0, 1, 2) if bias is None else (0, 1, 2, 3)
    grads = jax.grad(loss, argnums=argnums)(q, k, v, bias)
    return np.asarray(out), np.asarray(lse), [np.asarray(g) for g in grads]

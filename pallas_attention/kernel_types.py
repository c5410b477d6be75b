"""Output types for the Pallas kernels that also hold inside ``jax.shard_map``.

Under ``shard_map(..., check_vma=True)`` (its default) every array carries the set of
mesh axes it varies over, and ``pallas_call`` wants each output's set spelled out on its
``jax.ShapeDtypeStruct``. A kernel's outputs are computed from all of its inputs, so they
vary over the union of the inputs' axes. Outside ``shard_map`` that union is empty and
the type is the plain one.
"""

from __future__ import annotations

from typing import Any

import jax


def out_type(shape: tuple[int, ...], dtype: Any, *inputs: Any) -> jax.ShapeDtypeStruct:
  """``jax.ShapeDtypeStruct(shape, dtype)`` varying over the mesh axes of ``inputs``."""
  mats = [jax.typeof(x).manual_axis_type for x in inputs if x is not None]
  if not mats:
    return jax.ShapeDtypeStruct(shape, dtype)
  varying = frozenset().union(*(m.varying for m in mats))
  mat = mats[0].update(
    varying=varying, unreduced=frozenset(), reduced=frozenset(), unreduced_kind=None
  )
  return jax.ShapeDtypeStruct(shape, dtype, manual_axis_type=mat)


def _varying(x: Any) -> frozenset:
  return jax.typeof(x).manual_axis_type.varying


def vary_like(outputs: Any, *inputs: Any) -> Any:
  """``outputs`` marked as varying over the mesh axes of ``inputs`` (``jax.lax.pcast``).

  Mosaic GPU's ``plgpu.kernel`` types its outputs with ``check_vma`` off, as if they were
  the same on every device; they are computed from the inputs, so they vary where those
  do. Marking them costs nothing at run time and lets ``shard_map``'s default type check
  (and a ``custom_vjp`` around the kernels) see the truth.
  """
  axes = frozenset().union(*(_varying(x) for x in inputs if x is not None))
  if not axes:
    return outputs

  def mark(y):
    missing = axes - _varying(y)
    return jax.lax.pcast(y, tuple(sorted(missing, key=str)), to="varying") if missing else y

  return jax.tree.map(mark, outputs)

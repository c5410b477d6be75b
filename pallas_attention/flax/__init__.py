"""Flax integration: the ``attention_fn`` hook and drop-in attention modules.

Two ways in:

- ``attention_fn`` fits the ``attention_fn`` hook of Flax's own modules::

      layer = nn.MultiHeadDotProductAttention(num_heads=8, attention_fn=attention_fn)

- ``pallas_attention.flax.linen.MultiHeadDotProductAttention`` (and
  ``MultiHeadAttention``) and ``pallas_attention.flax.nnx.MultiHeadAttention``
  subclass Flax's classes: same constructor, call signature and parameter tree (a
  checkpoint loads unchanged), ``attention_fn`` defaults to ours, plus the options
  ``is_causal``, ``local_window_size``, ``logits_soft_cap``, ``implementation`` and
  segment ids at call time.

Results equal Flax's except on rows that can attend to nothing: Flax averages all
values there, we return zeros (as ``flash_attention`` does). Calls flash attention
cannot serve exactly go to Flax's own attention, with a warning, so the answer is
always right: attention weights to sow (``sow_weights``), dropout in training (no
fused dropout yet), and custom einsum functions.

The submodules import Flax; ``linen`` and ``nnx`` load on first access.
"""

from __future__ import annotations

import importlib

from pallas_attention.flax._attention import attention_fn

__all__ = ["attention_fn", "linen", "nnx"]


def __getattr__(name: str):
  if name in ("linen", "nnx"):
    return importlib.import_module(f"{__name__}.{name}")
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

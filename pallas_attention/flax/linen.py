"""Flash attention as drop-in replacements for Flax linen's attention modules."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from flax import linen

from pallas_attention.flax._attention import attention_fn, module_options, options_for_call


class MultiHeadDotProductAttention(linen.MultiHeadDotProductAttention):
  """``flax.linen.MultiHeadDotProductAttention`` running flash attention.

  The same constructor, call signature and parameter tree as Flax's class (it is a
  subclass; ``attention_fn`` defaults to ``pallas_attention.flax.attention_fn``), so
  an existing checkpoint loads unchanged. Results equal Flax's except on query rows
  that can attend to nothing: zeros here, the mean of the values in Flax.

  Attributes (besides Flax's):
    is_causal: row ``i`` attends to keys ``j <= i`` (top-left aligned), computed
      without a mask array and skipping masked tiles; combined with ``mask`` by
      logical and. While decoding the cache mask already does this.
    local_window_size: ``w`` or ``(left, right)``: row ``i`` sees
      ``i - left <= j <= i + right``. While decoding the window sits at the
      position being decoded.
    logits_soft_cap: ``logits = cap * tanh(logits / cap)`` before masking.
    implementation: passed to ``flash_attention`` (``"mosaic"``, ``"triton"``,
      ``"xla"``, a sequence of them, or None for the fastest available).

  The call also takes ``q_segment_ids [batch..., T]`` and ``kv_segment_ids
  [batch..., S]`` (packed sequences: a query attends to a key iff their ids are
  equal; give both).

  Flax's linen attention has no grouped-query option (``num_kv_heads``) in Flax
  0.12; ``pallas_attention.flax.nnx.MultiHeadAttention`` has it.

  These options need ``pallas_attention.flax.attention_fn`` (the default, or a
  ``functools.partial`` of it) as ``attention_fn``; with another function they
  raise ValueError.
  """

  attention_fn: Callable[..., Any] = attention_fn
  is_causal: bool = False
  local_window_size: int | tuple[int | None, int | None] | None = None
  logits_soft_cap: float | None = None
  implementation: str | Sequence[str] | None = None

  def __call__(
    self,
    inputs_q,
    inputs_k=None,
    inputs_v=None,
    *,
    inputs_kv=None,
    mask=None,
    deterministic: bool | None = None,
    dropout_rng=None,
    sow_weights: bool = False,
    q_segment_ids=None,
    kv_segment_ids=None,
  ):
    """Flax's ``__call__`` plus ``q_segment_ids`` and ``kv_segment_ids``."""
    # Decoding steps are the calls that find the cache already made.
    decoding = self.decode and self.has_variable("cache", "cached_key")
    cache_index = cache_shape = None
    if decoding:
      cache_index = self.get_variable("cache", "cache_index")
      cache_shape = self.get_variable("cache", "cached_key").shape
    mask, options = options_for_call(
      self, mask, q_segment_ids, kv_segment_ids, decoding, cache_index, cache_shape
    )
    with module_options(options):
      return super().__call__(
        inputs_q,
        inputs_k,
        inputs_v,
        inputs_kv=inputs_kv,
        mask=mask,
        deterministic=deterministic,
        dropout_rng=dropout_rng,
        sow_weights=sow_weights,
      )


class MultiHeadAttention(MultiHeadDotProductAttention, linen.MultiHeadAttention):
  """``flax.linen.MultiHeadAttention`` (the same layer under another default name) with
  flash attention; see ``MultiHeadDotProductAttention``."""

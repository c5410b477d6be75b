"""Flash attention as a drop-in replacement for ``flax.nnx.MultiHeadAttention``."""

from __future__ import annotations

from collections.abc import Sequence

from flax import nnx

from pallas_attention.flax._attention import attention_fn, module_options, options_for_call


class MultiHeadAttention(nnx.MultiHeadAttention):
  """``flax.nnx.MultiHeadAttention`` running flash attention.

  The same constructor, call signature and state as Flax's class (it is a
  subclass; ``attention_fn`` defaults to ``pallas_attention.flax.attention_fn``), so
  ``nnx.update(ours, nnx.state(theirs))`` and checkpoints work both ways. Grouped-query
  attention (``num_kv_heads``) runs in the kernels without repeating keys and values.
  Results equal Flax's except on query rows that can attend to nothing: zeros
  here, the mean of the values in Flax.

  Keyword-only arguments besides Flax's:
    is_causal: always causal (top-left aligned), computed without a mask array
      and skipping masked tiles; combined with ``mask`` by logical and. The call's
      own ``is_causal`` argument does the same for one call. While decoding the
      cache mask already does this.
    local_window_size: ``w`` or ``(left, right)``: row ``i`` sees
      ``i - left <= j <= i + right``. While decoding the window sits at the
      position being decoded.
    logits_soft_cap: ``logits = cap * tanh(logits / cap)`` before masking.
    implementation: passed to ``flash_attention`` (``"mosaic"``, ``"triton"``,
      ``"xla"``, a sequence of them, or None for the fastest available).

  The call also takes ``q_segment_ids [batch..., T]`` and ``kv_segment_ids
  [batch..., S]`` (packed sequences: a query attends to a key iff their ids are
  equal; give both).

  These options need ``pallas_attention.flax.attention_fn`` (the default, or a
  ``functools.partial`` of it) as ``attention_fn``; with another function they
  raise ValueError.
  """

  def __init__(
    self,
    *args,
    attention_fn=attention_fn,
    is_causal: bool = False,
    local_window_size: int | tuple[int | None, int | None] | None = None,
    logits_soft_cap: float | None = None,
    implementation: str | Sequence[str] | None = None,
    **kwargs,
  ):
    super().__init__(*args, attention_fn=attention_fn, **kwargs)
    self.is_causal = is_causal
    self.local_window_size = local_window_size
    self.logits_soft_cap = logits_soft_cap
    self.implementation = implementation

  def __call__(
    self,
    inputs_q,
    inputs_k=None,
    inputs_v=None,
    *,
    mask=None,
    decode: bool | None = None,
    q_segment_ids=None,
    kv_segment_ids=None,
    **kwargs,
  ):
    """Flax's ``__call__`` plus ``q_segment_ids`` and ``kv_segment_ids``."""
    decoding = bool(self.decode if decode is None else decode)
    cache_index = cache_shape = None
    if decoding and self.cached_key is not None and self.cache_index is not None:
      cache_index, cache_shape = self.cache_index[...], self.cached_key.shape
    mask, options = options_for_call(
      self, mask, q_segment_ids, kv_segment_ids, decoding, cache_index, cache_shape
    )
    with module_options(options):
      return super().__call__(inputs_q, inputs_k, inputs_v, mask=mask, decode=decode, **kwargs)

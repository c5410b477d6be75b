"""FlashAttention for JAX in Pallas: exact attention without the T×S score matrix."""

from pallas_attention.api import available_implementations, flash_attention
from pallas_attention.ring import ring_attention, zigzag_permute, zigzag_unpermute

__all__ = [
  "available_implementations",
  "flash_attention",
  "ring_attention",
  "zigzag_permute",
  "zigzag_unpermute",
]
__version__ = "0.1.0"

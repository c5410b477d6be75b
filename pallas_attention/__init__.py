"""FlashAttention for JAX in Pallas: exact attention without the T×S score matrix."""

from pallas_attention.api import available_implementations, flash_attention

__all__ = ["available_implementations", "flash_attention"]
__version__ = "0.1.0"

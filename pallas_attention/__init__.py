"""FlashAttention for JAX in Pallas: exact attention without the T×S score matrix."""

from pallas_attention.api import flash_attention

__all__ = ["flash_attention"]
__version__ = "0.1.0"

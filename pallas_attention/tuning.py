"""Block sizes per implementation, head dim and dtype: the one table to tune."""

from __future__ import annotations

import dataclasses
import functools
import heapq

import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class TritonBlocks:
  """Tiles and launch parameters of the Pallas-Triton kernels.

  ``fwd_*``: forward; ``dkv_*``: the dK/dV kernel (a key block loops over query
  blocks); ``dq_*``: the dQ kernel (a query block loops over key blocks).
  """

  fwd_q: int
  fwd_k: int
  fwd_warps: int
  fwd_stages: int
  dkv_q: int
  dkv_k: int
  dkv_warps: int
  dkv_stages: int
  dq_q: int
  dq_k: int
  dq_warps: int
  dq_stages: int

  def clipped(self, t: int, s: int) -> TritonBlocks:
    """Shrink tiles that exceed the (power-of-two padded) sequence lengths."""
    tq, tk = triton_extent(t), triton_extent(s)
    return dataclasses.replace(
      self,
      fwd_q=min(self.fwd_q, tq),
      fwd_k=min(self.fwd_k, tk),
      dkv_q=min(self.dkv_q, tq),
      dkv_k=min(self.dkv_k, tk),
      dq_q=min(self.dq_q, tq),
      dq_k=min(self.dq_k, tk),
    )


def next_power_of_2(x: int) -> int:
  return 1 << max(0, (x - 1).bit_length())


def triton_extent(x: int) -> int:
  """The smallest Triton tile extent covering ``x``: a power of two, at least 16."""
  return max(16, next_power_of_2(x))


# head_dim (after padding to a power of two) -> blocks. Measured on an H100,
# bf16; see benchmarks/RESULTS.md.
_TRITON = {
  16: TritonBlocks(128, 128, 4, 3, 128, 128, 8, 3, 64, 64, 4, 3),
  32: TritonBlocks(128, 128, 4, 3, 128, 128, 8, 3, 64, 64, 4, 3),
  64: TritonBlocks(128, 128, 4, 3, 128, 128, 8, 3, 64, 64, 4, 3),
  128: TritonBlocks(128, 64, 4, 2, 64, 64, 4, 2, 128, 64, 8, 3),
  256: TritonBlocks(64, 32, 4, 2, 32, 64, 8, 1, 64, 32, 8, 1),
}


# Float32 tiles take twice the shared memory and float32 is not the speed path:
# one small, safe configuration (head dim 256 halves it again).
_TRITON_F32 = TritonBlocks(64, 32, 4, 2, 32, 64, 4, 2, 64, 32, 4, 2)
_TRITON_F32_256 = TritonBlocks(32, 32, 4, 1, 32, 32, 4, 1, 32, 32, 4, 1)


def triton_blocks(head_dim: int, dtype=None) -> TritonBlocks:
  """Default Triton blocks for a head dim (padded to a power of two, 16..256) and dtype."""
  head_dim = triton_extent(head_dim)
  if dtype is not None and jnp.dtype(dtype) == jnp.float32:
    return _TRITON_F32_256 if head_dim > 128 else _TRITON_F32
  return _TRITON[head_dim]


@dataclasses.dataclass(frozen=True)
class MosaicBlocks:
  """Tiles and pipeline depth of the Mosaic GPU (Hopper) kernels.

  The forward gives each of its two consumer warpgroups 64 query rows (128 per
  CTA) and streams ``fwd_kv``-row key/value tiles through a ``fwd_stages``-deep
  shared-memory ring. ``dkv_*``: the dK/dV kernel (a key block loops over query
  tiles); ``dq_*``: the dQ kernel (a query block loops over key tiles);
  ``bwd_stages``: their ring depth.
  """

  fwd_kv: int
  fwd_stages: int
  dkv_q: int
  dkv_kv: int
  dq_q: int
  dq_kv: int
  bwd_stages: int
  # dK/dV by two warpgroups on the same 64 key rows (one accumulates dV, the other
  # dK), for head dims whose two accumulators do not fit one warpgroup's registers.
  # dkv_kv is then 64.
  dkv_split: bool = False
  # Forward CTAs of two query heads sharing a key/value head (GQA with an even group),
  # so each key/value tile serves both. Correct; measured on an H100 at 0.95-1.06x the
  # plain forward with no direction (benchmarks/RESULTS.md), so off by default.
  fwd_head_pairs: bool = False
  # One backward kernel for dK, dV and dQ (5 tile products instead of 7): each dK/dV
  # CTA adds its share of dQ into a float32 buffer with TMA reduce-add, in an order
  # that varies from run to run unless the call is deterministic (the adds are then
  # ordered by semaphores; see fused_backward for where each is taken). Needs
  # dkv_split off, and dkv_kv = 128 with dkv_q = 128 (or dkv_q = 64 at head dim 128),
  # or dkv_kv = 64 with dkv_q = 64.
  bwd_fused: bool = False
  # The forward's consumers issue tile n's Q·Kᵀ with tile n-1's P·V and run tile n's
  # softmax while P·V computes (FlashAttention-3's intra-warpgroup overlap); off: one
  # tile at a time. See _MOSAIC and _PIPELINED_MIN_KV for where it is on.
  fwd_pipelined: bool = False
  # Forward query tiles (of 128 rows) a CTA runs one after the other, the next one's Q
  # and key/value tiles loading while the current one computes. See forward_q_tiles.
  fwd_q_tiles: int = 1

  def forward_options(self) -> dict:
    """The ``mosaic.forward.forward`` keyword arguments these blocks set (all but
    ``head_pairs``, which also depends on the call's GQA group)."""
    return dict(
      block_kv=self.fwd_kv,
      stages=self.fwd_stages,
      pipelined=self.fwd_pipelined,
      tiles_per_cta=self.fwd_q_tiles,
    )


# head_dim (64, 128 or 256) -> blocks, bf16/f16. From H100 sweeps at seqlen 4096
# (benchmarks/tune_mosaic.py; logs in benchmarks/results/h100_tune_mosaic_*.log).
# Head dim 256: the only backward blocks that fit in shared memory, with dK and dV
# accumulated by separate warpgroups (one warpgroup holding both spilled).
# The pipelined forward (fwd_pipelined) at head dims 128 and 256; H200, forward
# TFLOP/s, pipelined against one tile at a time, cuDNN in the same run
# (results/pipelined_3): head dim 128 non-causal 605/582 (2k), 641/616 (4k), 623/593
# (16k), causal 614/587 (16k); head dim 256 non-causal 689/653 (4k), 666/621 (16k),
# causal 670/618 (16k). Below _PIPELINED_MIN_KV keys it was mixed: behind at head dim
# 128 causal 512 (253/265) and 256 non-causal 512 (439/471), ahead at 128 non-causal
# 512 (411/395) and 256 non-causal 1k (571/558), within 3% elsewhere. Head dim 64 stays
# serial: with 256-row key tiles the pipelined consumer spills (492 bytes) and ptxas
# serializes its wgmma for lack of registers (info C7512); it lost 16-23%, and with
# 128-row tiles (causal, short) 5-6%.
_MOSAIC = {
  64: MosaicBlocks(256, 2, 128, 128, 128, 64, 3),
  128: MosaicBlocks(128, 2, 64, 128, 128, 64, 2, fwd_pipelined=True),
  256: MosaicBlocks(64, 2, 64, 64, 64, 64, 2, dkv_split=True, fwd_pipelined=True),
}
_PIPELINED_MIN_KV = 2048


# head_dim -> the backward fields of the fused backward, taken when a call passes
# deterministic_backward=False (dQ added in no fixed order) and, with the adds ordered,
# by deterministic calls where fused_backward says so. Head dim 64: a 128-row query
# tile whose dQ the two consumers split by rows; 128: a 64-row tile split by columns (a
# 128-row tile does not fit in shared memory). H100 (results/fused_3): fwd+bwd 1.06-1.21x cuDNN
# at head dim 64, 1.02-1.24x at 128 non-causal, 0.95-1.15x at 128 causal; 3 stages do
# not fit at 64 and gain nothing at 128. Causal head dim 128 with keys shorter than
# _FUSED_MIN_CAUSAL_KV keeps the two-kernel backward: there it was faster (403 against
# 372 TFLOP/s at 2k, 225 against 179 at 512; a tie at 4k). Head dim 256 keeps its split
# dK/dV kernel (deterministic).
_MOSAIC_FUSED = {
  64: dict(dkv_q=128, dkv_kv=128, bwd_stages=2, bwd_fused=True),
  128: dict(dkv_q=64, dkv_kv=128, bwd_stages=2, bwd_fused=True),
}
_FUSED_MIN_CAUSAL_KV = 4096


# The default, deterministic backward takes the fused kernel too where it was measured
# faster than the two-kernel one (dK/dV, then dQ): with its dQ additions put in a fixed
# order by global semaphores and a writer warp (mosaic/backward.py::_fused), for keys at
# least _ORDERED_MIN_KV[head_dim, causal] long. H100 (results/ordered_2, ordered_3),
# fwd+bwd TFLOP/s ordered against two-kernel: head dim 128 non-causal 454/444 at 2k,
# 486/464 at 4k, 532/491 at 8k, 544/494 at 16k, but 310/332 at 512; head dim 64
# non-causal 407/385 at 4k, 475/411 at 16k, 365/368 at 2k. Causal it lost at every
# length (head dim 128: 373/423 at 4k, 486/493 at 16k; head dim 64: 380/397 at 16k)
# while the adds went in increasing block order: each key block waited for the whole
# chain below it. They now go in decreasing order with the grid launched from the last
# key block down (mosaic/backward.py::_fused), so a causal block finds the blocks above
# it done; but a causal head's heaviest CTAs (its lowest key blocks) now start last.
# H200 (results/reversed_2), fwd+bwd TFLOP/s, ordered against two-kernel, causal: head
# dim 64 350/343 at 4k, 434/391 at 16k; head dim 128 362/393 at 2k, 424/435 at 4k,
# 469/469 at 8k, 483/494 at 16k (the unordered fused kernel, heaviest CTAs first:
# 391/442/482/521), so causal head dim 128 kept the two-kernel backward. Sixth session:
# the fused kernels visit masked and unmasked tiles in one loop (mosaic/backward.py::
# _sweep), which ended their register spills under a causal mask; H100
# (results/s6_oneloop_h100/gpu_check.md), fwd+bwd TFLOP/s, ordered against two-kernel,
# causal head dim 128: 377/405 at 2k, 433/435 at 4k, 478/456 at 8k, 515/503 at 16k, so
# causal head dim 128 took the ordered kernel from 8k. Seventh session, H100, the same
# against the two-kernel backward and cuDNN in one call (results/s7_protocol_h100/
# ab_causal128.md): 388/402/364 at 2k, 448/434/427 at 4k, 480/459/480 at 8k (ordered
# at 4k in the session's two other calls: 448, 450), so from 4k. Non-causal
# head dim 128 it is unchanged (466/502/539/547 at 2k-16k; before: 504 at 4k, 546 at
# 16k, results/reversed_1/old.md). DETERMINISTIC_FUSED = False turns it off.
DETERMINISTIC_FUSED = True
# The ordered kernel's adds into a query tile's dQ are counted per tile (1), per consumer
# slab (2) or per half slab (4): with more counts the next key block may add a part as
# soon as this block's add of that part has landed, not the whole tile. H200
# (results/s10_ordered/call1), fwd+bwd TFLOP/s head dim 128 non-causal, 1 / 2 / 4 parts:
# 544 / 544 / 403 at 16k, 536 / 529 / 389 at 8k (cuDNN 555, 543), so one count a tile.
ORDERED_DQ_PARTS = 1
# The counts' spacing in 4-byte words: 32, one count per 128-byte line, where packed
# counts put 32 of them in a line that the blocks of a pair poll and add to at once.
# H200, fwd+bwd TFLOP/s head dim 128, packed / 32 apart (results/s10_ordered/call2;
# call3): non-causal 536 / 542 at 16k (543 / 548), 530 / 538 at 8k (534 / 540); causal
# 512 / 514 (517 / 514), 486 / 491 (489 / 495). Within each call's noise one by one,
# seven of eight the same way; 8 and 64 words apart measured alike (call3).
ORDERED_SEM_STRIDE = 32
# The ordered kernel's dQ writer polls for its turn at a tile before it waits for the
# consumers' slabs of that tile (True), so the poll's round trip overlaps their work,
# or after (False). H200 (results/s11_down, calls 3 and 4), fwd+bwd TFLOP/s head dim
# 128, after / before: non-causal 16k 541 / 548 and 540 / 548 (cuDNN 551), 8k 539 /
# 540, 540 / 541; causal 16k 525 / 532, 527 / 533 (cuDNN 529, 527), 8k 500 / 499,
# 503 / 502.
ORDERED_POLL_FIRST = True
# (Two dQ writer warps, one per slab buffer, measured the same or worse in call 4 and
# on the H100 in the eighth session; tried in 41f5f92, removed.)
# The ordered kernel's launch order (mosaic/backward.py::_ordered_cta): key blocks of one
# (batch, kv head) start ORDERED_CHUNK at a time beside the same chunk of other pairs,
# about ORDERED_WAVE CTAs together (0: a pair's key blocks all one after the other),
# for non-causal calls (ORDERED_CHUNK_CAUSAL) with at most ORDERED_CHUNK_MAX_KV key
# blocks. H200 (results/reversed_3), fwd+bwd TFLOP/s, chunks of 8 against a pair's
# blocks all together: head dim 128 non-causal 474/461 at 2k, 508/496 at 4k, but
# 535/539 at 16k; head dim 64 non-causal 418/403 at 4k, 454/462 at 16k; causal 343/349
# and 412/427 at 4k and 16k, head dim 128 causal 410 and 459 at 4k and 16k (the two-kernel backward:
# 435, 495); chunks of 4: 460, 494, 526 at head dim 128 non-causal 2k, 4k, 16k.
ORDERED_CHUNK = 8
ORDERED_WAVE = 128
ORDERED_CHUNK_MAX_KV = 32
ORDERED_CHUNK_CAUSAL = False
# head_dim -> ((least key blocks, (chunk, wave)), ...), longest first, the last from 0:
# for non-causal calls at any key count, in place of the three above. Head dim 128: the
# key blocks of two pairs launched in turn from 64 key blocks (8k), of four below. H200
# (results/s11_down, calls 7-9), fwd+bwd TFLOP/s, the rule above / (1, 2) / cuDNN: 16k
# 545 / 548 / 550, 547 / 550 / 549, 541 / 548 / 552; 8k 537 / 543 / 537, 538 / 543 /
# 537; 4k 513 / 522 / 514, 513 / 522 / 516; 2k 485 / 485 / 478. Four pairs, (1, 4)
# against (1, 2) (s11_down call 8; s12_profile calls 6 and 12): 4k 527 / 522, 513 / 512,
# 517 / 511; 2k 497 / 482, 491 / 484; but 8k 544 / 543, 546 / 550 and 16k 545 / 550,
# 548 / 548. Head dim 64 stays (402 / 392 at 2k, 429 / 427 at 4k, 464 / 468 at 16k).
ORDERED_CHUNK_BY_HEAD_DIM = {128: ((64, (1, 2)), (0, (1, 4)))}
# Causal calls: the ordered kernel's last pairs, enough of them for this many key
# blocks, launch their heaviest key block first and add from the lowest block up
# (mosaic/backward.py::_ordered_cta), so that the grid does not end on one pair's
# heaviest blocks with SMs idle beside them. 0: none (every pair lightest first).
# H200 (results/s11_down), fwd+bwd TFLOP/s, causal head dim 128, none / 128 blocks /
# every pair / cuDNN: 513 / 527 / 525 / 530 at 16k (call 2: 514 / 530, one pair 529,
# cuDNN 530), 493 / 498 / 474 / 492 at 8k (495 / 500 / 492); 4k 461 / 468 / 446;
# head dim 64: 451 / 456 / 426 at 16k, 399 / 399 / 368 at 4k. Every pair heaviest
# first waits at every tile as the non-causal kernel does (474 at 8k).
ORDERED_DOWN_BLOCKS = 128
# (head_dim, causal) -> the shortest key length that takes the ordered fused backward
# (None: never). Tenth session, H200 (results/s10_ordered/call6), head dim 64 fwd+bwd
# TFLOP/s, two-kernel / ordered / cuDNN: non-causal 341 / 341 / 343 at 1k, 366 / 400 /
# 388 at 2k; causal 240 / 265 / 232 at 1k, 300 / 342 / 308 at 2k (before: from 4k).
_ORDERED_MIN_KV = {(64, False): 2048, (128, False): 2048, (64, True): 1024, (128, True): 4096}


def has_fused_backward(head_dim: int) -> bool:
  """Whether a head dim (64, 128 or 256, after padding) has fused backward blocks."""
  return head_dim in _MOSAIC_FUSED


def fused_backward(head_dim: int, causal: bool, kv_len: int | None, deterministic: bool) -> bool:
  """Whether a call's default blocks take the fused backward kernel (``bwd_fused``).

  Not deterministic: wherever the head dim has one, except causal head dim 128 with
  fewer than _FUSED_MIN_CAUSAL_KV keys. Deterministic: the ordered fused kernel, where
  measured faster (above). ``kv_len`` None: long.
  """
  if not has_fused_backward(head_dim):
    return False
  if not deterministic:
    short = kv_len is not None and kv_len < _FUSED_MIN_CAUSAL_KV
    return not (head_dim == 128 and causal and short)
  min_kv = _ORDERED_MIN_KV[head_dim, causal]
  if not DETERMINISTIC_FUSED or min_kv is None:
    return False
  return kv_len is None or kv_len >= min_kv


# In the Mosaic GPU interpreter (CPU) every warpgroup is a thread blocked in barrier
# waits inside an XLA CPU callback, and XLA's CPU thread pool has one thread per core:
# on a 2-core machine a backward kernel with two consumer warpgroups and a producer
# hung. The interpreter gets one consumer per backward kernel (the forward always has
# two, and ran reliably there).
MOSAIC_INTERPRETER = MosaicBlocks(128, 2, 64, 64, 64, 64, 2)


# Causal calls with key sequences shorter than this use 128-row forward key tiles at
# head_dim 64: the 256-row tiles gain 12% at 16k but lose up to 15% on short causal runs
# (H100, benchmarks/NOTES.md). Non-causal calls keep 256 rows at every length: on the
# H100 they gain 5% at 1k and 8% at 2k over 128 rows, and tie at 512
# (results/h100_tune_hd64_short.log).
_MOSAIC_LONG_KV = 8192


def mosaic_blocks(
  head_dim: int, causal: bool = False, kv_len: int | None = None, fused: bool = False
) -> MosaicBlocks:
  """Default Mosaic blocks for a head dim of 64, 128 or 256 (after padding).

  ``kv_len``: the key sequence length, when known (None: long). ``fused``: the fused
  backward's blocks where ``fused_backward`` takes them for deterministic_backward=False.
  """
  blocks = _MOSAIC[head_dim]
  if fused and fused_backward(head_dim, causal, kv_len, deterministic=False):
    blocks = dataclasses.replace(blocks, **_MOSAIC_FUSED[head_dim])
  if blocks.fwd_kv > 128 and causal and kv_len is not None and kv_len < _MOSAIC_LONG_KV:
    blocks = dataclasses.replace(blocks, fwd_kv=128)
  if blocks.fwd_pipelined and kv_len is not None and kv_len < _PIPELINED_MIN_KV:
    blocks = dataclasses.replace(blocks, fwd_pipelined=False)
  q_tiles = forward_q_tiles(head_dim, causal, kv_len)
  if q_tiles != blocks.fwd_q_tiles:
    blocks = dataclasses.replace(blocks, fwd_q_tiles=q_tiles)
  return blocks


# (head_dim, causal) -> ((shortest key length, query tiles a forward CTA), ...), longest
# first: the first entry whose length kv_len reaches gives the count; none: 1. H100, two
# calls (results/s9_qtiles), forward TFLOP/s with 1 / 2 / 4 tiles a CTA: head dim 64
# non-causal 286-292 / 323-324 / 320-331 at 512, 372-381 / 385-402 / 400-411 at 1k,
# 445 / 452 / 448-452 at 2k, 475 / 491 / 483 at 8k, 490-501 / 481-494 / 475-483 at 16k;
# causal 171-174 / 190-195 / 190-195 at 512, 258-260 / 267 / 280-282 at 1k, 390-394 /
# 400-401 / 402-403 at 4k, 445 / 443 / 391 at 8k, 464-480 / 455-459 / 424-440 at 16k.
# Head dim 128 (1 / 2): non-causal 408-420 / 429-443 at 512, 510 / 537-543 at 1k, 605 /
# 619 at 2k, 648 / 639 at 4k; causal 383 / 385 at 1k, 479 / 512 at 2k, 576 / 587 at 4k,
# 618 / 623 at 8k, 645 / 619 at 16k. H200 (fourteenth session, three processes, head dim
# 128 non-causal, 1 / 2): 588-612 / 609-629 at 2k, 618-639 / 666-669 at 4k, 612-648 /
# 617-636 at 8k; so 2 up to 4k there. Head dim 256: two Q buffers do not fit in shared
# memory beside its key/value ring.
_FWD_Q_TILES: dict[tuple[int, bool], tuple[tuple[int, int], ...]] = {
  (64, False): ((16384, 1), (2048, 2), (0, 4)),
  (64, True): ((8192, 1), (0, 4)),
  (128, False): ((8192, 1), (0, 2)),
  (128, True): ((16384, 1), (0, 2)),
}


# The forward's last wave (mosaic.forward.forward's kv_split): a grid of equal CTAs ends
# on a part-empty wave when their number is not a multiple of the SMs' (head_dim 128 in
# the protocol: 2048 CTAs, 15.5 waves of 132). With FWD_KV_SPLIT the first query tiles of
# every head run as 2-4 CTAs (5 at head dim 256) over parts of the keys, launched after
# every whole tile, wherever forward_kv_split's model of the launch says so, for keys at
# least FWD_SPLIT_MIN_KV long. H200 (fifteenth session, benchmarks/RESULTS.md), forward TFLOP/s
# split / not, non-causal: head_dim 128 at 16k 623-632 / 615-619 in six processes, at 8k
# 611-629 / 610-645 (no gain: shorter CTAs, the parts' start and merge weigh more);
# head_dim 64 at 16k 493-496 / 486-488; head_dim 256 at 16k 671-673 / 666-667 (two
# processes, its 5 parts).
FWD_KV_SPLIT = True
FWD_SPLIT_MIN_KV = 16384
FWD_SPLIT_PARTS = (2, 3, 4)
# Head dim 256 (7.76 waves at 16k): the model finds a plan only with 5 parts.
_FWD_SPLIT_PARTS_BY_HEAD_DIM = {256: (2, 3, 4, 5)}
FWD_SPLIT_MIN_PART = 4  # key tiles a part visits, at least
FWD_SPLIT_OVERHEAD = 3  # a CTA's start and end, in key tiles (the model's guess)
FWD_SPLIT_MIN_GAIN = 0.01  # of the modelled time, or no split


def _launch_span(sms: int, jobs) -> float:
  """When the last of ``jobs`` ends, CTAs handed in order to the first free of ``sms``
  SMs, one at a time each (a forward CTA takes all of an SM's registers). ``jobs``:
  ``(count, length)`` runs in launch order."""
  free = [0.0] * sms
  for count, length in jobs:
    for _ in range(count):
      heapq.heapreplace(free, free[0] + length)
  return max(free)


def forward_kv_split(
  pairs: int, q_tiles: int, kv_tiles: int, sms: int, head_dim: int | None = None
) -> tuple[int, int] | None:
  """``(tail, parts)`` for a non-causal forward of ``pairs`` (batch, head) pairs of
  ``q_tiles`` query and ``kv_tiles`` key tiles on ``sms`` SMs, or None: the split (into
  FWD_SPLIT_PARTS parts, or the head dim's own counts) whose
  modelled span (``_launch_span``, each CTA costing its key tiles plus
  FWD_SPLIT_OVERHEAD) is shortest, if it beats the unsplit grid by FWD_SPLIT_MIN_GAIN;
  always None with FWD_KV_SPLIT off. The dispatch (mosaic.attention) asks for keys of at
  least FWD_SPLIT_MIN_KV only, with one query tile a CTA, where the split fits."""
  if not FWD_KV_SPLIT:
    return None
  parts = _FWD_SPLIT_PARTS_BY_HEAD_DIM.get(head_dim, FWD_SPLIT_PARTS)
  model = (parts, FWD_SPLIT_MIN_PART, FWD_SPLIT_OVERHEAD, FWD_SPLIT_MIN_GAIN)
  return _planned_kv_split(pairs, q_tiles, kv_tiles, sms, *model)


@functools.lru_cache(maxsize=256)
def _planned_kv_split(pairs, q_tiles, kv_tiles, sms, parts_tried, min_part, overhead, min_gain):
  ctas = pairs * q_tiles
  if sms < 1 or ctas % sms == 0 or ctas > 64 * sms:
    return None
  whole = kv_tiles + overhead
  # Full waves of whole tiles end together: model from the first wave that is not full.
  waves = max(ctas // sms - 1, 0)
  before = waves * whole  # the same in every plan below
  base = before + _launch_span(sms, [(ctas - waves * sms, whole)])
  best, best_span = None, base * (1 - min_gain)
  for parts in parts_tried:
    if kv_tiles < parts * min_part:
      continue
    sizes = [(p + 1) * kv_tiles // parts - p * kv_tiles // parts for p in range(parts)]
    for tail in range(1, min(q_tiles - 1, -(-2 * sms // pairs)) + 1):
      rest = pairs * (q_tiles - tail) - waves * sms
      if rest < 0:
        break
      per_pair = [(tail, size + overhead) for size in sizes]
      span = before + _launch_span(sms, [(rest, whole)] + per_pair * pairs)
      if span < best_span:
        best, best_span = (tail, parts), span
  return best


def forward_q_tiles(head_dim: int, causal: bool, kv_len: int | None) -> int:
  """Query tiles a forward CTA runs (``MosaicBlocks.fwd_q_tiles``); ``kv_len`` None: long."""
  for min_kv, q_tiles in _FWD_Q_TILES.get((head_dim, causal), ()):
    if kv_len is None or kv_len >= min_kv:
      return q_tiles
  return 1


def mosaic_candidates(
  head_dim: int,
  part: str,
  interpreter: bool = False,
  fwd_kv: tuple[int, ...] = (64, 128, 256),
  fused: bool = False,
) -> list[MosaicBlocks]:
  """What the opt-in autotuner tries for a head dim; ``part`` is "fwd" or "bwd".

  Each candidate changes only that part's fields of the table entry, so the two
  parts can be tuned one after the other. Candidates that do not fit in shared
  memory fail to compile and are skipped by the autotuner. ``interpreter``: the
  Mosaic GPU interpreter on CPU, where only one-consumer backward blocks run
  reliably (see MOSAIC_INTERPRETER) and each call takes seconds: two candidates.
  ``fwd_kv``: the forward key-tile rows tried on a GPU (each with 2 and 3 stages, one
  tile at a time and pipelined; with 2 stages also 2 and 4 query tiles a CTA).
  ``fused``: backward candidates of the fused kernel (``fused_backward``) where the
  head dim has one, and only those.
  """
  fused = fused and has_fused_backward(head_dim)
  if interpreter:
    base = dataclasses.replace(MOSAIC_INTERPRETER, bwd_fused=fused)
    if part == "fwd":
      return [base, dataclasses.replace(base, fwd_kv=64)]
    return [base, dataclasses.replace(base, bwd_stages=1)]
  base = mosaic_blocks(head_dim, fused=fused)
  if fused and part == "bwd":
    one_consumer = dataclasses.replace(base, dkv_q=64, dkv_kv=64)
    return [base, dataclasses.replace(base, bwd_stages=3), one_consumer]
  if part == "fwd":
    return [
      dataclasses.replace(
        base, fwd_kv=kv, fwd_stages=stages, fwd_pipelined=pipelined, fwd_q_tiles=q_tiles
      )
      for kv in fwd_kv
      for stages in (2, 3)
      for pipelined in (False, True)
      for q_tiles in ((1, 2, 4) if stages == 2 else (1,))
    ]
  return [
    dataclasses.replace(base, dkv_q=dkv_q, dkv_kv=dkv_kv, dq_q=dq_q, dq_kv=dq_kv, bwd_stages=st)
    for dkv_q, dkv_kv in ((64, 64), (64, 128), (128, 128))
    for dq_q, dq_kv in ((64, 64), (128, 64))
    for st in (2, 3)
  ] + [dataclasses.replace(base, dkv_kv=64, dkv_split=True)]

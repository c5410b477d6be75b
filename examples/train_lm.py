"""A small decoder-only transformer LM in Flax NNX, trained with our attention layer.

The task is synthetic and deterministic: each sequence is a walk of a fixed random
Markov chain (every token has two possible successors) for its first half, and a copy
of that walk for its second half. A model that learns the chain's bigrams reaches a
loss of about log 2 on the first half; one that also learns to look back (attention)
predicts the copy almost exactly. Loss starts at log(vocab).

    python examples/train_lm.py                       # tiny, CPU-sized, our attention
    python examples/train_lm.py --attention flax      # Flax's default attention
    python examples/train_lm.py --layers 12 --width 768 --heads 12 --seqlen 1024 \\
        --batch 16 --vocab 50304 --dtype bfloat16 --attention cudnn   # GPT-2 small, GPU

``--attention``: ``ours`` (pallas_attention.flax.nnx.MultiHeadAttention), ``flax``
(``flax.nnx.MultiHeadAttention`` with its default attention, dense XLA) or ``cudnn``
(Flax's module with ``jax.nn.dot_product_attention(implementation="cudnn")`` as its
``attention_fn``; GPU, float16/bfloat16 only). All three have the same parameters.
Parameters and optimizer state are float32; ``--dtype`` is the compute dtype
(mixed precision, as GPT-2-style training runs use bfloat16).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pallas_attention.flax import nnx as flash_nnx


@dataclasses.dataclass(frozen=True)
class Config:
  vocab: int = 64
  layers: int = 2
  width: int = 64
  heads: int = 4
  seqlen: int = 64
  batch: int = 16
  steps: int = 500
  lr: float = 3e-3
  warmup: int = 10
  attention: str = "ours"
  dtype: str = "float32"
  seed: int = 0


def cudnn_attention_fn(query, key, value, bias=None, mask=None, *, is_causal=False, **_):
  """cuDNN's fused attention behind Flax's attention_fn hook (dropout and sowing unsupported)."""
  if mask is not None:
    mask = mask.astype(jnp.bool_)
  return jax.nn.dot_product_attention(
    query, key, value, bias, mask, is_causal=is_causal, implementation="cudnn"
  )


def attention_layer(cfg: Config, rngs: nnx.Rngs) -> nnx.MultiHeadAttention:
  kwargs = dict(
    num_heads=cfg.heads,
    in_features=cfg.width,
    decode=False,
    dtype=jnp.dtype(cfg.dtype),
    rngs=rngs,
  )
  if cfg.attention == "ours":
    return flash_nnx.MultiHeadAttention(**kwargs, is_causal=True)
  if cfg.attention == "flax":
    return nnx.MultiHeadAttention(**kwargs)
  if cfg.attention == "cudnn":
    return nnx.MultiHeadAttention(**kwargs, attention_fn=cudnn_attention_fn)
  raise ValueError(f"attention: expected ours, flax or cudnn, got {cfg.attention!r}")


class Block(nnx.Module):
  """Pre-LayerNorm transformer block: causal self-attention, then a GELU MLP."""

  def __init__(self, cfg: Config, rngs: nnx.Rngs):
    dtype = jnp.dtype(cfg.dtype)
    self.attention_norm = nnx.LayerNorm(cfg.width, dtype=dtype, rngs=rngs)
    self.attention = attention_layer(cfg, rngs)
    self.mlp_norm = nnx.LayerNorm(cfg.width, dtype=dtype, rngs=rngs)
    self.mlp_in = nnx.Linear(cfg.width, 4 * cfg.width, dtype=dtype, rngs=rngs)
    self.mlp_out = nnx.Linear(4 * cfg.width, cfg.width, dtype=dtype, rngs=rngs)

  def __call__(self, x):
    # is_causal at the call works for all three; ours is also built causal.
    x = x + self.attention(self.attention_norm(x), is_causal=True)
    return x + self.mlp_out(nnx.gelu(self.mlp_in(self.mlp_norm(x))))


class LanguageModel(nnx.Module):
  """GPT-2's layout: token and learned position embeddings, pre-LayerNorm blocks (scanned),
  a final LayerNorm and an output head tied to the token embedding."""

  def __init__(self, cfg: Config, rngs: nnx.Rngs):
    dtype = jnp.dtype(cfg.dtype)
    init = nnx.initializers.normal(0.02)  # as GPT-2
    self.embed = nnx.Embed(cfg.vocab, cfg.width, dtype=dtype, embedding_init=init, rngs=rngs)
    self.position = nnx.Embed(cfg.seqlen, cfg.width, dtype=dtype, embedding_init=init, rngs=rngs)

    # One stacked set of block parameters, applied by nnx.scan: compile time does not
    # grow with depth.
    @nnx.split_rngs(splits=cfg.layers)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def make_blocks(rngs):
      return Block(cfg, rngs)

    self.blocks = make_blocks(rngs)
    self.final_norm = nnx.LayerNorm(cfg.width, dtype=dtype, rngs=rngs)

  def __call__(self, tokens):
    """``tokens [B, T]`` int -> logits ``[B, T, vocab]`` float32."""
    x = self.embed(tokens) + self.position(jnp.arange(tokens.shape[-1]))

    @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
    def run_blocks(x, block):
      return block(x)

    x = self.final_norm(run_blocks(x, self.blocks))
    return self.embed.attend(x).astype(jnp.float32)


def cross_entropy(logits, targets):
  log_probs = jax.nn.log_softmax(logits, axis=-1)
  return -jnp.mean(jnp.take_along_axis(log_probs, targets[..., None], axis=-1))


def adam_init(params):
  zeros = lambda: jax.tree.map(jnp.zeros_like, params)  # two buffers: both are donated
  return {"step": jnp.zeros((), jnp.int32), "mu": zeros(), "nu": zeros()}


def adam_update(params, grads, state, lr, b1=0.9, b2=0.95, eps=1e-8, clip=1.0):
  """Adam with global-norm gradient clipping; ``lr`` may be a traced scalar."""
  norm = jnp.sqrt(sum(jnp.sum(jnp.square(g)) for g in jax.tree.leaves(grads)))
  grads = jax.tree.map(lambda g: g * jnp.minimum(1.0, clip / (norm + 1e-6)), grads)
  step = state["step"] + 1
  mu = jax.tree.map(lambda m, g: b1 * m + (1 - b1) * g, state["mu"], grads)
  nu = jax.tree.map(lambda v, g: b2 * v + (1 - b2) * g * g, state["nu"], grads)
  correction = jnp.sqrt(1 - b2**step) / (1 - b1**step)
  params = jax.tree.map(
    lambda p, m, v: p - lr * correction * m / (jnp.sqrt(v) + eps), params, mu, nu
  )
  return params, {"step": step, "mu": mu, "nu": nu}


def make_train_step(graphdef, cfg: Config):
  """``(params, rest, opt_state, tokens [B, T+1]) -> (params, opt_state, loss)``, jitted."""

  def loss_fn(params, rest, tokens):
    model = nnx.merge(graphdef, params, rest)
    return cross_entropy(model(tokens[:, :-1]), tokens[:, 1:])

  def train_step(params, rest, opt_state, tokens):
    loss, grads = jax.value_and_grad(loss_fn)(params, rest, tokens)
    step = opt_state["step"].astype(jnp.float32)
    lr = cfg.lr * jnp.minimum(1.0, (step + 1) / max(cfg.warmup, 1))
    params, opt_state = adam_update(params, grads, opt_state, lr)
    return params, opt_state, loss

  return jax.jit(train_step, donate_argnums=(0, 2))


def init(cfg: Config):
  """``(graphdef, params, rest, opt_state)`` of a fresh model, initialised in one jit."""
  make = lambda: LanguageModel(cfg, nnx.Rngs(cfg.seed))
  graphdef, _, _ = nnx.split(nnx.eval_shape(make), nnx.Param, ...)
  params, rest = jax.jit(lambda: nnx.split(make(), nnx.Param, ...)[1:])()
  return graphdef, params, rest, adam_init(params)


def synthetic_batch(cfg: Config, step: int) -> np.ndarray:
  """``[batch, seqlen + 1]`` int32: a Markov-chain walk, then a copy of it."""
  successors = np.random.default_rng(cfg.seed).integers(0, cfg.vocab, (cfg.vocab, 2))
  rng = np.random.default_rng((cfg.seed, step))
  half = (cfg.seqlen + 2) // 2
  walk = np.empty((cfg.batch, half), np.int32)
  walk[:, 0] = rng.integers(0, cfg.vocab, cfg.batch)
  coins = rng.integers(0, 2, (cfg.batch, half))
  for i in range(1, half):
    walk[:, i] = successors[walk[:, i - 1], coins[:, i]]
  return np.concatenate([walk, walk], axis=1)[:, : cfg.seqlen + 1]


def train(cfg: Config, log_every: int = 10) -> list[float]:
  """Trains for ``cfg.steps`` steps; returns the loss of every step."""
  graphdef, params, rest, opt_state = init(cfg)
  count = sum(x.size for x in jax.tree.leaves(params))
  print(f"{count / 1e6:.2f}M parameters, attention={cfg.attention}, dtype={cfg.dtype}")
  train_step = make_train_step(graphdef, cfg)
  losses = []
  start = time.perf_counter()
  for step in range(cfg.steps):
    tokens = jnp.asarray(synthetic_batch(cfg, step))
    params, opt_state, loss = train_step(params, rest, opt_state, tokens)
    losses.append(float(loss))
    if step % log_every == 0 or step == cfg.steps - 1:
      elapsed = time.perf_counter() - start
      print(f"step {step:5d}  loss {losses[-1]:.4f}  ({elapsed:.1f} s)")
  print(f"loss {losses[0]:.3f} -> {losses[-1]:.3f} (log vocab = {math.log(cfg.vocab):.3f})")
  return losses


def parse_args(argv=None) -> Config:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  defaults = Config()
  for field in dataclasses.fields(Config):
    default = getattr(defaults, field.name)
    kwargs = dict(type=type(default), default=default)
    if field.name == "attention":
      kwargs["choices"] = ["ours", "flax", "cudnn"]
    if field.name == "dtype":
      kwargs["choices"] = ["float32", "bfloat16", "float16"]
    parser.add_argument(f"--{field.name}", **kwargs)
  return Config(**vars(parser.parse_args(argv)))


if __name__ == "__main__":
  train(parse_args())

"""examples/train_lm.py and benchmarks/model_bench.py at a tiny size on CPU.

(Ours against Flax's attention in training, step by step: test_flax_modules.py.)
"""

from __future__ import annotations

import importlib.util
import math
import pathlib
import sys

import numpy as np
import pytest

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"


@pytest.fixture(scope="module")
def train_lm():
  spec = importlib.util.spec_from_file_location("train_lm", EXAMPLES / "train_lm.py")
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module  # dataclasses look their module up there
  spec.loader.exec_module(module)
  return module


def test_train_lm_loss_falls(train_lm):
  cfg = train_lm.parse_args(["--steps", "50", "--layers", "2", "--width", "64", "--seqlen", "64"])
  assert cfg.attention == "ours"
  losses = train_lm.train(cfg)
  assert abs(losses[0] - math.log(cfg.vocab)) < 0.3  # starts near chance
  assert np.mean(losses[-5:]) < 0.45 * losses[0]


def test_model_bench_child_row_and_table():
  spec = importlib.util.spec_from_file_location(
    "model_bench", EXAMPLES.parent / "benchmarks" / "model_bench.py"
  )
  bench = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(bench)
  config = dict(vocab=64, layers=1, width=32, heads=2, seqlen=32, batch=2, dtype="float32")
  row = bench.child(dict(config, attention="ours", steps=2))
  assert "error" not in row, row
  assert row["tokens_per_s"] > 0 and row["compile_s"] >= 0 and np.isfinite(row["loss"])
  rows = [
    row,
    dict(config, attention="flax", error="OOM"),
    dict(config, attention="cudnn", error="RuntimeError: cuDNN is not detected."),
  ]
  table = bench.markdown(rows, ["ours", "flax", "cudnn"])
  assert table.splitlines()[2].startswith("| 32 | 2 | ")
  assert "| OOM |" in table and "cuDNN is not detected" in table

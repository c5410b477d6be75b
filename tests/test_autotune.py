"""autotune.py: opt-in switch, cache location, choosing the fastest, the on-disk cache."""

from __future__ import annotations

import json
import time

import jax
import jax.numpy as jnp
import pytest

from pallas_attention import autotune

KEY = {"t": 128, "s": 256, "dtype": jnp.bfloat16, "causal": True}


@pytest.fixture(autouse=True)
def fresh(monkeypatch, tmp_path):
  """Each test: a private cache dir, the env var unset, no enable() override, empty memo."""
  monkeypatch.setenv("PALLAS_ATTENTION_CACHE_DIR", str(tmp_path))
  monkeypatch.delenv("PALLAS_ATTENTION_AUTOTUNE", raising=False)
  monkeypatch.setattr(autotune, "_enabled_override", None)
  autotune._clear_memo()
  yield
  autotune._clear_memo()


class Sleeper:
  """make_run over candidates = sleep milliseconds; counts builds; some may fail."""

  def __init__(self, fail_build=(), fail_run=()):
    self.builds = 0
    self.fail_build, self.fail_run = set(fail_build), set(fail_run)

  def __call__(self, ms):
    self.builds += 1
    if ms in self.fail_build:
      raise ValueError(f"cannot build {ms}")

    def run():
      if ms in self.fail_run:
        raise RuntimeError(f"cannot run {ms}")
      time.sleep(ms / 1000)

    return run


def choose(make_run, candidates=(20, 0, 10), key=KEY, kind="test", default=-1, rounds=2):
  return autotune.choose(
    kind,
    key,
    candidates,
    make_run,
    default=default,
    to_json=lambda ms: {"ms": ms},
    from_json=lambda d: d["ms"],
    rounds=rounds,
  )


def read_entries():
  return json.loads(autotune.cache_path().read_text())["entries"]


@pytest.mark.parametrize("value", ["1", "true", "TRUE", "Yes", " yes "])
def test_env_var_enables(monkeypatch, value):
  monkeypatch.setenv("PALLAS_ATTENTION_AUTOTUNE", value)
  assert autotune.enabled()
  autotune.enable(False)  # the programmatic switch wins over the env var
  assert not autotune.enabled()


@pytest.mark.parametrize("value", ["", "0", "false", "no", "on"])
def test_env_var_other_values_disable(monkeypatch, value):
  monkeypatch.setenv("PALLAS_ATTENTION_AUTOTUNE", value)
  assert not autotune.enabled()
  autotune.enable()
  assert autotune.enabled()


def test_cache_path(monkeypatch, tmp_path):
  assert autotune.cache_path() == tmp_path / "autotune.json"
  monkeypatch.delenv("PALLAS_ATTENTION_CACHE_DIR")
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
  assert autotune.cache_path() == tmp_path / "xdg" / "pallas_attention" / "autotune.json"
  monkeypatch.delenv("XDG_CACHE_HOME")
  monkeypatch.setenv("HOME", str(tmp_path / "home"))
  expected = tmp_path / "home" / ".cache" / "pallas_attention" / "autotune.json"
  assert autotune.cache_path() == expected


def test_disabled_returns_default_without_timing_or_file(tmp_path):
  make_run = Sleeper()
  assert choose(make_run) == -1
  assert make_run.builds == 0
  assert list(tmp_path.iterdir()) == []


def test_picks_fastest_and_writes_cache(tmp_path):
  autotune.enable()
  make_run = Sleeper()
  assert choose(make_run) == 0
  assert make_run.builds == 3
  (entry,) = read_entries().values()
  assert entry["config"] == {"ms": 0}
  assert entry["kind"] == "test"
  assert entry["device_kind"] == jax.devices()[0].device_kind
  assert entry["jax"] == jax.__version__
  assert ["dtype", "bfloat16"] in entry["key"]
  seconds = {c["config"]["ms"]: c["seconds"] for c in entry["candidates"]}
  assert seconds[0] < seconds[10] < seconds[20]
  assert seconds[20] >= 0.02
  # Only the cache file is left behind: the temporary file was renamed over it.
  assert [p.name for p in tmp_path.iterdir()] == ["autotune.json"]


def test_env_var_alone_enables_tuning(monkeypatch):
  monkeypatch.setenv("PALLAS_ATTENTION_AUTOTUNE", "1")
  assert choose(Sleeper()) == 0
  assert autotune.cache_path().exists()


def test_cache_hit_does_not_build(tmp_path):
  autotune.enable()
  assert choose(Sleeper()) == 0
  autotune._clear_memo()
  make_run = Sleeper()
  assert choose(make_run) == 0  # from the file
  assert make_run.builds == 0
  autotune.cache_path().unlink()
  assert choose(make_run) == 0  # from the in-process memo
  assert make_run.builds == 0


def test_cache_keeps_the_stored_winner(tmp_path):
  """A hit returns what the file says, without re-measuring."""
  autotune.enable()
  choose(Sleeper())
  data = json.loads(autotune.cache_path().read_text())
  (entry,) = data["entries"].values()
  entry["config"] = {"ms": 20}
  autotune.cache_path().write_text(json.dumps(data))
  autotune._clear_memo()
  assert choose(Sleeper()) == 20


def test_different_keys_tuned_separately():
  autotune.enable()
  make_run = Sleeper()
  assert choose(make_run, key={"t": 1}) == 0
  assert choose(make_run, key={"t": 2}, candidates=(20, 10)) == 10
  assert choose(make_run, key={"t": 1}, kind="other", candidates=(10, 20)) == 10
  assert make_run.builds == 3 + 2 + 2
  assert len(read_entries()) == 3
  autotune._clear_memo()
  assert choose(make_run, key={"t": 2}, candidates=(20, 10)) == 10  # each key kept its own
  assert make_run.builds == 7


def test_other_candidates_retune():
  """A winner is reused only for the candidate set it was chosen from: a library
  version that tries more (or differently shaped) candidates tunes again."""
  autotune.enable()
  make_run = Sleeper()
  assert choose(make_run, candidates=(20, 10)) == 10
  autotune._clear_memo()
  assert choose(make_run, candidates=(20, 10)) == 10 and make_run.builds == 2  # cached
  assert choose(make_run, candidates=(20, 10, 0)) == 0
  assert make_run.builds == 5
  assert len(read_entries()) == 2


def test_key_order_does_not_matter():
  autotune.enable()
  make_run = Sleeper()
  choose(make_run, key={"a": 1, "b": 2})
  choose(make_run, key={"b": 2, "a": 1})
  assert make_run.builds == 3


def test_raising_candidates_are_skipped():
  autotune.enable()
  make_run = Sleeper(fail_build={0}, fail_run={10})
  assert choose(make_run, candidates=(0, 10, 20, 30)) == 20
  (entry,) = read_entries().values()
  errors = {c["config"]["ms"]: c.get("error") for c in entry["candidates"]}
  assert "cannot build 0" in errors[0]
  assert "cannot run 10" in errors[10]
  assert errors[20] is None and errors[30] is None


def test_all_raising_warns_and_returns_default(tmp_path):
  autotune.enable()
  make_run = Sleeper(fail_build={0}, fail_run={10})
  with pytest.warns(autotune.AutotuneWarning, match="(?s)every candidate failed.*cannot build 0"):
    assert choose(make_run, candidates=(0, 10)) == -1
  assert not autotune.cache_path().exists()  # failures are not persisted


def test_corrupt_cache_warns_retunes_and_repairs():
  autotune.enable()
  path = autotune.cache_path()
  path.write_text("{not json")
  make_run = Sleeper()
  with pytest.warns(autotune.AutotuneWarning, match="corrupt"):
    assert choose(make_run) == 0
  assert make_run.builds == 3
  (entry,) = read_entries().values()  # valid JSON again
  assert entry["config"] == {"ms": 0}


@pytest.mark.parametrize("content", ["[1, 2]", '{"entries": 3}', "null"])
def test_wrong_shaped_cache_is_treated_as_empty(content):
  autotune.enable()
  autotune.cache_path().write_text(content)
  with pytest.warns(autotune.AutotuneWarning, match="corrupt"):
    assert choose(Sleeper()) == 0
  assert len(read_entries()) == 1


def test_unwritable_cache_warns_but_returns_winner(monkeypatch, tmp_path):
  autotune.enable()
  blocker = tmp_path / "a_file"
  blocker.write_text("")
  monkeypatch.setenv("PALLAS_ATTENTION_CACHE_DIR", str(blocker / "sub"))
  with pytest.warns(autotune.AutotuneWarning, match="could not write"):
    assert choose(Sleeper()) == 0


def test_creates_missing_cache_dirs(monkeypatch, tmp_path):
  autotune.enable()
  monkeypatch.setenv("PALLAS_ATTENTION_CACHE_DIR", str(tmp_path / "x" / "y"))
  choose(Sleeper())
  assert (tmp_path / "x" / "y" / "autotune.json").exists()


def loop_run(n):
  """A jitted JAX computation whose cost grows with n.

  It runs on the host CPU even where a GPU is present: the GPU test run shares one card among
  many pytest workers, and a microsecond kernel queued behind another process's work can take
  longer than a long one, which would make the expected winner a coin toss.
  """
  f = jax.jit(lambda x: jax.lax.fori_loop(0, n, lambda _, y: jnp.sin(y) * 1.0001, x))
  x = jax.device_put(jax.random.normal(jax.random.key(0), (4096,)), jax.devices("cpu")[0])
  return lambda: f(x)


def test_jax_candidates():
  autotune.enable()
  assert choose(loop_run, candidates=(3000, 1, 300), rounds=5) == 1


def test_choose_at_trace_time():
  """Called while jit traces: make_run's arrays are still concrete, the timing real."""
  autotune.enable()
  chosen = []

  @jax.jit
  def f(x):
    chosen.append(choose(loop_run, candidates=(3000, 1), rounds=3))
    return x * 2

  assert float(f(jnp.float32(1.0))) == 2.0
  assert chosen == [1]
  (entry,) = read_entries().values()
  assert all("seconds" in c for c in entry["candidates"])

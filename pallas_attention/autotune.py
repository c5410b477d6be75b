"""Opt-in autotuner: time candidate kernel configurations on this card, cache the winner.

``choose`` takes a list of candidate configurations (block sizes, warps, ...), builds a
runnable for each, times them on the current device and returns the fastest. The
winner is written to a JSON cache on disk, keyed by the problem (``kind`` plus the
caller's ``key``), the device kind (``jax.devices()[0].device_kind``), the JAX
version and the candidate set (a digest of their JSON forms), so later processes reuse
it without timing anything, and a version of the library that tries other candidates
(or gives them new fields) tunes again instead of reusing an older winner.

Enabling it
  Autotuning is off by default: ``choose`` then returns its ``default`` immediately.
  Turn it on with the environment variable ``PALLAS_ATTENTION_AUTOTUNE=1`` (also
  ``true`` / ``yes``, any case) or from Python with ``autotune.enable(True)``, which
  overrides the environment variable. It is opt-in because the first call for each new
  key compiles and runs every candidate, which can add seconds (or more) of compile
  time to the first trace of a kernel; with a warm cache the cost is a dictionary lookup.

Where the cache lives
  ``$PALLAS_ATTENTION_CACHE_DIR/autotune.json`` if that variable is set, otherwise
  ``$XDG_CACHE_HOME/pallas_attention/autotune.json``, otherwise
  ``~/.cache/pallas_attention/autotune.json``. The file is rewritten atomically (a
  temporary file in the same directory, then ``os.replace``). A corrupt or unreadable
  cache is treated as empty with a warning and repaired on the next write. Each entry
  also records the median seconds measured for every candidate (or its error), for
  inspection. Delete the file to force retuning.

Tracing
  ``choose`` may be called while JAX traces a jitted function (e.g. from a kernel
  wrapper at trace time). ``make_run`` and the runnables it returns run on a worker
  thread, outside any trace (JAX's trace state is per thread), so arrays they build
  (random inputs of the right shape, say) are real device arrays and the timing is
  real. A runnable that nevertheless returns traced values counts as a failed candidate.

This module imports nothing from the rest of the package.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import os
import pathlib
import statistics
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

__all__ = ["AutotuneWarning", "cache_path", "choose", "enable", "enabled"]

ENV_ENABLE = "PALLAS_ATTENTION_AUTOTUNE"
ENV_CACHE_DIR = "PALLAS_ATTENTION_CACHE_DIR"
CACHE_FILE = "autotune.json"
_FORMAT_VERSION = 1
_TRUE = ("1", "true", "yes")


class AutotuneWarning(UserWarning):
  """Something went wrong while autotuning; the tuner fell back gracefully."""


_enabled_override: bool | None = None  # set by enable(); None: follow the env var
_memo: dict[str, dict] = {}  # full cache key -> winning config (to_json form)
_lock = threading.RLock()


def enabled() -> bool:
  """Whether ``choose`` tunes (True) or returns its default (False)."""
  if _enabled_override is not None:
    return _enabled_override
  return os.environ.get(ENV_ENABLE, "").strip().lower() in _TRUE


def enable(on: bool = True) -> None:
  """Switch autotuning on or off for this process; overrides ``PALLAS_ATTENTION_AUTOTUNE``."""
  global _enabled_override
  _enabled_override = bool(on)


def cache_path() -> pathlib.Path:
  """The JSON file holding tuned configurations (see the module docstring)."""
  base = os.environ.get(ENV_CACHE_DIR)
  if base:
    return pathlib.Path(base).expanduser() / CACHE_FILE
  xdg = os.environ.get("XDG_CACHE_HOME")
  root = pathlib.Path(xdg).expanduser() if xdg else pathlib.Path.home() / ".cache"
  return root / "pallas_attention" / CACHE_FILE


def _clear_memo() -> None:
  """Forget in-process results (tests; the disk cache is untouched)."""
  with _lock:
    _memo.clear()


def _jsonable(value: Any) -> Any:
  """A deterministic JSON-friendly form of a key value (dtypes become their names)."""
  if value is None or isinstance(value, bool | int | float | str):
    return value
  if isinstance(value, list | tuple):
    return [_jsonable(v) for v in value]
  if isinstance(value, dict):
    return {str(k): _jsonable(v) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))}
  if isinstance(value, np.dtype | type):
    try:
      return np.dtype(value).name
    except TypeError:
      pass
  return str(value)


def _describe(kind: str, key: dict, candidates: list[dict]) -> dict:
  tried = json.dumps(_jsonable(candidates), sort_keys=True, separators=(",", ":"))
  return {
    "kind": kind,
    "key": [[str(k), _jsonable(v)] for k, v in sorted(key.items(), key=lambda kv: str(kv[0]))],
    "device_kind": jax.devices()[0].device_kind,
    "jax": jax.__version__,
    "candidates_digest": hashlib.sha256(tried.encode()).hexdigest()[:16],
  }


def _key_string(description: dict) -> str:
  return json.dumps(description, sort_keys=True, separators=(",", ":"))


def _read_cache(path: pathlib.Path) -> dict[str, dict]:
  """The cache's entries; {} when missing, and {} with a warning when corrupt."""
  try:
    text = path.read_text()
  except (FileNotFoundError, NotADirectoryError):
    return {}
  except OSError as e:
    warnings.warn(f"autotune cache {path} unreadable ({e}); ignoring it", AutotuneWarning, 3)
    return {}
  try:
    data = json.loads(text)
    entries = data["entries"]
    if not isinstance(entries, dict):
      raise TypeError("'entries' is not an object")
  except (ValueError, TypeError, KeyError) as e:
    warnings.warn(
      f"autotune cache {path} is corrupt ({type(e).__name__}: {e}); treating it as empty",
      AutotuneWarning,
      3,
    )
    return {}
  return entries


def _write_entry(path: pathlib.Path, key: str, entry: dict) -> None:
  """Merge one entry into the cache file atomically; warn (never raise) on failure."""
  tmp = None
  try:
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
      # A corrupt file was already reported when it was read; it is replaced here.
      warnings.simplefilter("ignore", AutotuneWarning)
      entries = _read_cache(path)
    entries[key] = entry
    text = json.dumps({"version": _FORMAT_VERSION, "entries": entries}, indent=1, sort_keys=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    with os.fdopen(fd, "w") as f:
      f.write(text + "\n")
    os.replace(tmp, path)
    tmp = None
  except (OSError, TypeError, ValueError) as e:  # TypeError: to_json gave non-JSON values
    warnings.warn(f"could not write autotune cache {path}: {e}", AutotuneWarning, 3)
  finally:
    if tmp is not None:
      try:
        os.unlink(tmp)
      except OSError:
        pass


def _contains_tracer(tree: Any) -> bool:
  return any(isinstance(x, jax.core.Tracer) for x in jax.tree_util.tree_leaves(tree))


def _time_candidate[T](
  make_run: Callable[[T], Callable[[], Any]], candidate: T, rounds: int
) -> float:
  """Median seconds of ``rounds`` calls after one warm-up (compile) call.

  Runs on a worker thread: JAX's trace state is per thread, so there ``make_run``
  builds concrete arrays and jitted calls execute, even when ``choose`` was called
  while tracing. (``jax.ensure_compile_time_eval`` would also make inputs concrete,
  but it evaluates eagerly every primitive without traced inputs, kernel bodies
  included: ``axis_index`` in a Pallas kernel then fails with an unbound axis.)
  """

  def work() -> float:
    run = make_run(candidate)
    out = run()
    if _contains_tracer(out):
      raise TypeError("the runnable returned traced values; build concrete inputs in make_run")
    jax.block_until_ready(out)
    times = []
    for _ in range(rounds):
      start = time.perf_counter()
      jax.block_until_ready(run())
      times.append(time.perf_counter() - start)
    return statistics.median(times)

  with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
    return pool.submit(work).result()


def choose[T](
  kind: str,
  key: dict,
  candidates: Sequence[T],
  make_run: Callable[[T], Callable[[], Any]],
  *,
  default: T,
  to_json: Callable[[T], dict],
  from_json: Callable[[dict], T],
  rounds: int = 5,
) -> T:
  """The fastest of ``candidates`` for this problem on this device, or ``default``.

  Args:
    kind: which tuning problem (e.g. ``"triton_fwd"``); part of the cache key.
    key: what the best config depends on (shapes, dtypes, flags); JSON-like values.
    candidates: configurations to try.
    make_run: ``make_run(c)`` returns a zero-argument callable running the kernel with
      config ``c`` on concrete inputs. It may raise (the candidate is then skipped).
    default: returned when autotuning is disabled or every candidate fails.
    to_json / from_json: convert a config to / from a JSON object.
    rounds: timed calls per candidate (after one warm-up call); the median counts.
  """
  if not enabled():
    return default
  if rounds < 1:
    raise ValueError(f"rounds must be >= 1, got {rounds}")

  description = _describe(kind, key, [to_json(c) for c in candidates])
  full_key = _key_string(description)
  path = cache_path()

  with _lock:
    if full_key in _memo:
      return from_json(_memo[full_key])

    entry = _read_cache(path).get(full_key)
    if isinstance(entry, dict) and isinstance(entry.get("config"), dict):
      try:
        result = from_json(entry["config"])
      except Exception as e:  # a stale entry (config format changed): retune
        warnings.warn(
          f"autotune cache entry for {kind} unusable ({type(e).__name__}: {e}); retuning",
          AutotuneWarning,
          2,
        )
      else:
        _memo[full_key] = entry["config"]
        return result

    results, errors = [], []
    best, best_config, best_seconds = None, None, None
    for candidate in candidates:
      config = to_json(candidate)
      try:
        seconds = _time_candidate(make_run, candidate, rounds)
      except Exception as e:
        message = f"{type(e).__name__}: {e}"
        errors.append(f"{config}: {message}")
        results.append({"config": config, "error": message})
        continue
      results.append({"config": config, "seconds": seconds})
      if best_seconds is None or seconds < best_seconds:
        best, best_config, best_seconds = candidate, config, seconds

    if best_config is None:
      detail = "\n  ".join(errors) if errors else "(no candidates)"
      warnings.warn(
        f"autotune {kind}: every candidate failed, using the default:\n  {detail}",
        AutotuneWarning,
        2,
      )
      # Remembered in-process only, so a later process (or a fixed kernel) tries again.
      _memo[full_key] = to_json(default)
      return default

    entry = {**description, "config": best_config, "seconds": best_seconds, "candidates": results}
    entry["rounds"] = rounds
    entry["tuned_at"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    _write_entry(path, full_key, entry)
    _memo[full_key] = best_config
    return best

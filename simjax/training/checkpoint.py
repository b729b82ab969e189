"""Checkpoints: orbax CheckpointManager (async, atomic, keep-N), verified on restore, with fallback.

Orbax writes each step into `<step>.orbax-checkpoint-tmp` and renames it when complete (tmp dirs
left by a kill are deleted at start-up), so a step directory that exists is complete. It does not
notice corrupted array bytes, though: overwritten data files restore silently as garbage. So each
save also stores a *fingerprint* of the state (one 32-bit hash of every leaf's bits) in the step's
own orbax metadata, committed atomically with the arrays; a restore recomputes it and a step that
fails to restore or to match is moved aside with a warning, and the next older one is tried.
"""
import contextlib
import functools
import gc
import json
import logging
import sys
import time
import traceback
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

FINGERPRINT_KEY = "simjax_fingerprint"


class NoCheckpointError(RuntimeError):
  pass


class CheckpointIntegrityError(RuntimeError):
  """A restored step's state does not match the fingerprint saved with it."""


def _fmix32(h):
  """MurmurHash3's 32-bit finaliser: every input bit flips each output bit with probability ~1/2."""
  h = h ^ (h >> 16)
  h = h * jnp.uint32(0x85EBCA6B)
  h = h ^ (h >> 13)
  h = h * jnp.uint32(0xC2B2AE35)
  return h ^ (h >> 16)


def _leaf_hash(x):
  """One uint32 for the exact bits of `x`: sum_i fmix(word_i ^ fmix(i)) + size, mod 2^32.

  A wrapping integer sum is exact in any order, so the hash does not depend on the sharding or
  the device count; positions enter through the flat index, built from iotas (no reshape, so a
  sharded leaf is never gathered).
  """
  if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
    x = jax.random.key_data(x)
  if x.dtype == jnp.bool_:
    words = x.astype(jnp.uint32)
  else:
    unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}.get(x.dtype.itemsize)
    if unsigned is None:  # 8-byte types: bitcast splits each element into two words (a trailing axis)
      words = jax.lax.bitcast_convert_type(x, jnp.uint32)
    else:
      words = jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)
  index = jnp.zeros(words.shape, jnp.uint32)
  stride = 1
  for dim in reversed(range(words.ndim)):
    index = index + jax.lax.broadcasted_iota(jnp.uint32, words.shape, dim) * jnp.uint32(stride % 2**32)
    stride *= words.shape[dim]
  return jnp.sum(_fmix32(words ^ _fmix32(index)), dtype=jnp.uint32) + jnp.uint32(stride % 2**32)


def _tree_hashes_impl(leaves):
  if not leaves:
    return jnp.zeros((0,), jnp.uint32)
  return jnp.stack([_leaf_hash(x) for x in leaves])


@functools.lru_cache(maxsize=None)
def _hasher(replicated_sharding, per_leaf: bool):
  """The jitted hash, of one leaf or of all; with a mesh, its result is replicated so every host can read it."""
  fn = _leaf_hash if per_leaf else _tree_hashes_impl
  if replicated_sharding is None:
    return jax.jit(fn)
  return jax.jit(fn, out_shardings=replicated_sharding)


def _tree_hashes(leaves):
  """uint32 [len(leaves)]. In one process, one small program per leaf shape: a state of hundreds of leaves
  costs a few compiles, where one program over all of them took 6 s of XLA:CPU compile per state. Across
  processes, one program over all leaves: every process must run the same collectives in the same order,
  and a program per leaf hung a two-process FSDP run."""
  replicated = _replicated_on_mesh_of(leaves)
  if jax.process_count() > 1:
    hashes = [_hasher(replicated, False)(leaves)]
  else:
    hashes = [_hasher(replicated, True)(x) for x in leaves]
  hashes = [h if h.is_fully_addressable else h.addressable_data(0) for h in hashes]  # this host's copy
  return np.asarray(jax.device_get(hashes), np.uint32).reshape(-1)


def _replicated_on_mesh_of(leaves):
  for x in leaves:
    sharding = getattr(x, "sharding", None)
    if isinstance(sharding, jax.sharding.NamedSharding):
      return jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec())
  return None


def _path_name(path) -> str:
  """'params/generator/out/kernel' for a TrainState and for the plain dict orbax restores without a target."""
  names = []
  for k in path:
    for attr in ("key", "name", "idx"):
      if hasattr(k, attr):
        names.append(str(getattr(k, attr)))
        break
    else:
      names.append(str(k))
  return "/".join(names)


def state_fingerprint(tree) -> dict:
  """{leaf path: 8-hex-digit hash of its bits}; computed on the devices, only the hashes come back."""
  paths_leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  leaves = [x if isinstance(x, jax.Array) else jnp.asarray(x) for _, x in paths_leaves]
  hashes = _tree_hashes(leaves)
  return {_path_name(p): f"{int(h):08x}" for (p, _), h in zip(paths_leaves, hashes)}


def fingerprint_mismatches(expected: dict, actual: dict):
  """Leaf paths whose hashes differ (or that one side lacks)."""
  return sorted(k for k in set(expected) | set(actual) if expected.get(k) != actual.get(k))


def _drop_closed_loop_callbacks(previous_hook):
  def hook(unraisable):
    if isinstance(unraisable.exc_value, RuntimeError) and "Event loop is closed" in str(unraisable.exc_value):
      return
    previous_hook(unraisable)
  hook.simjax_filter = True
  return hook


class _DropOrphanedRestoreReads(logging.Filter):
  """Drops asyncio's 'Task exception was never retrieved' for tasks that failed inside orbax's reads."""
  simjax_filter = True

  def filter(self, record):
    if not record.getMessage().startswith("Task exception was never retrieved") or not record.exc_info:
      return True
    frames = traceback.extract_tb(record.exc_info[2])
    return not any("orbax" in f.filename and ("deserialize" in f.name or "restore" in f.name) for f in frames)


@contextlib.contextmanager
def _quiet_asyncio():
  """Keeps a failed orbax restore from printing hundreds of tracebacks; its failure is reported once.

  The first failing array makes orbax close its event loop while tensorstore still completes the
  other reads: each completion then raises 'Event loop is closed' into sys.unraisablehook, and each
  orphaned read task logs 'exception was never retrieved' when it is collected. Both can happen after
  the restore has returned, so both filters stay installed; they drop only those two messages.
  """
  if not getattr(sys.unraisablehook, "simjax_filter", False):
    sys.unraisablehook = _drop_closed_loop_callbacks(sys.unraisablehook)
  logger = logging.getLogger("asyncio")
  if not any(getattr(f, "simjax_filter", False) for f in logger.filters):
    logger.addFilter(_DropOrphanedRestoreReads())
  # Read coroutines orbax created but never awaited before closing its loop warn when collected.
  # simjax has no coroutines of its own, so this message only ever names orbax's abandoned reads.
  warnings.filterwarnings("ignore", message=r"coroutine '.*' was never awaited", category=RuntimeWarning)
  level = logger.level
  logger.setLevel(logging.CRITICAL)  # whatever else asyncio says while orbax's restore fails
  try:
    yield
  finally:
    gc.collect()  # most orphaned tasks are collectable now: let them log while silenced
    logger.setLevel(level)


class Checkpointer:
  """Keeps the last `max_to_keep` train states under `directory`, saving every `interval` steps.

  `steps()`/`latest_step()` list finished steps only (never one whose async write is still running).
  Callbacks in `on_restore` get the step a restore settled on (the metrics log is cut back to it).
  """

  def __init__(self, directory, interval: int, max_to_keep: int = 3, async_save: bool = True):
    if interval < 1:
      raise ValueError(f"checkpoint interval must be >= 1, got {interval}; set --config.checkpoint_every.")
    self.directory = epath.Path(directory)
    self.interval = interval
    self.on_restore = []
    self.last_save_blocking_seconds = 0.0  # for benchmarks: how long the last save() held the caller
    self.last_fingerprint_seconds = 0.0
    self._in_flight = None
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            save_interval_steps=interval, max_to_keep=max_to_keep, create=True,
            enable_async_checkpointing=async_save, cleanup_tmp_directories=True))

  def steps(self):
    steps = set(self.manager.all_steps())
    if self._in_flight is not None and self.manager.is_saving_in_progress():
      steps.discard(self._in_flight)  # orbax lists a step as soon as its async write starts
    return sorted(steps)

  def latest_step(self):
    steps = self.steps()
    return steps[-1] if steps else None

  def save(self, step: int, state, force: bool = False) -> bool:
    """Starts an async save of `state` at `step` with its fingerprint; False if this step is already saved.

    Blocks only while the state is copied off the devices (and for any previous save still writing).
    """
    if step in self.manager.all_steps():
      return False  # e.g. a preemption at a step that was just checkpointed
    t0 = time.perf_counter()
    fingerprint = state_fingerprint(state)
    t1 = time.perf_counter()
    saved = self.manager.save(step, args=ocp.args.StandardSave(state), force=force,
                              custom_metadata={FINGERPRINT_KEY: fingerprint})
    if saved:
      self._in_flight = step
    self.last_save_blocking_seconds = time.perf_counter() - t0
    self.last_fingerprint_seconds = t1 - t0
    return saved

  def reached_preemption(self, step: int) -> bool:
    return self.manager.reached_preemption(step)

  def verify(self, step: int, state):
    """Raises CheckpointIntegrityError if `state` (restored from `step`) differs from what was saved."""
    metadata_file = self.directory / str(step) / "_CHECKPOINT_METADATA"
    try:  # orbax reads a garbled metadata file as "no metadata": that must not pass for an old checkpoint
      recorded = json.loads(metadata_file.read_bytes().decode()) if metadata_file.exists() else {}
      if not isinstance(recorded, dict):
        raise ValueError("not a JSON object")
    except (ValueError, UnicodeDecodeError) as e:
      raise CheckpointIntegrityError(f"its {metadata_file.name} is damaged ({e}); the step cannot be "
                                     "verified") from None
    expected = (self.manager.metadata(step).custom_metadata or {}).get(FINGERPRINT_KEY)
    if expected is None:
      logging.warning("checkpoint step %d has no fingerprint (written before simjax stored them); "
                      "restored unverified", step)
      return
    bad = fingerprint_mismatches(expected, state_fingerprint(state))
    if bad:
      raise CheckpointIntegrityError(f"{len(bad)} of {len(expected)} arrays differ from what was saved "
                                     f"(first: {bad[0]}); the files are corrupted")

  def restore_latest_good(self, abstract_state=None):
    """Restores the newest step that reads back and matches its fingerprint; returns (state, step).

    Unreadable steps are moved to `<directory>.unreadable/` (kept for inspection, out of the way of
    the steps this run will write again). Raises NoCheckpointError if none is good.
    """
    errors, bad_steps = [], []
    for step in reversed(self.steps()):
      try:
        with _quiet_asyncio():
          state = self.manager.restore(step, args=ocp.args.StandardRestore(abstract_state))
        self.verify(step, state)
      except Exception as e:  # pylint: disable=broad-except  # any unreadable step is skipped, never trusted
        msg = f"step {step}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        logging.info("checkpoint unreadable, falling back to an older one (%s)", msg)
        errors.append(msg if len(msg) <= 160 else msg[:157] + "...")
        bad_steps.append(step)
        continue
      if errors:
        moved = self._move_aside(bad_steps)
        logging.warning("resumed from step %d after skipping unreadable checkpoints (moved to %s): %s",
                        step, moved, "; ".join(errors))
        if jax.process_index() == 0:
          print(f"warning: checkpoint(s) unreadable ({'; '.join(errors)}); moved to {moved}; "
                f"resuming from step {step}", flush=True)
      for callback in self.on_restore:
        callback(step)
      return state, step
    raise NoCheckpointError("; ".join(errors) if errors else "no checkpoint")

  def _move_aside(self, steps):
    aside = self.directory.parent / (self.directory.name + ".unreadable")
    if jax.process_index() == 0:
      aside.mkdir(parents=True, exist_ok=True)
      for step in steps:
        src = self.directory / str(step)
        if src.exists():
          dst = aside / f"{step}.{time.strftime('%Y%m%dT%H%M%S')}"
          src.rename(dst)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
      multihost_utils.sync_global_devices("simjax_checkpoint_move_aside")
    self.manager.reload()
    return aside

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.wait_until_finished()
    self.manager.close()


def abstract_with_shardings(abstract_tree, shardings):
  """ShapeDtypeStructs carrying the target shardings, so a restore lands directly on this mesh."""
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_tree, shardings)

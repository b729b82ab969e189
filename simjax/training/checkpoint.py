"""Checkpoints: orbax CheckpointManager (async, atomic, keep-N), with fallback past a corrupt latest step.

Orbax writes each step into a temporary directory and renames it when complete, so a step directory
that exists is complete; a step that fails to restore anyway (truncated file, bad disk) is skipped
with a warning and the next older one is tried.
"""
import logging

import jax
import orbax.checkpoint as ocp
from etils import epath


class NoCheckpointError(RuntimeError):
  pass


class Checkpointer:
  """Keeps the last `max_to_keep` train states under `directory`, saving every `interval` steps."""

  def __init__(self, directory, interval: int, max_to_keep: int = 3, async_save: bool = True):
    if interval < 1:
      raise ValueError(f"checkpoint interval must be >= 1, got {interval}; set --config.checkpoint_every.")
    self.directory = epath.Path(directory)
    self.interval = interval
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            save_interval_steps=interval, max_to_keep=max_to_keep, create=True,
            enable_async_checkpointing=async_save, cleanup_tmp_directories=True))

  def steps(self):
    return sorted(self.manager.all_steps())

  def latest_step(self):
    return self.manager.latest_step()

  def save(self, step: int, state, force: bool = False) -> bool:
    return self.manager.save(step, args=ocp.args.StandardSave(state), force=force)

  def reached_preemption(self, step: int) -> bool:
    return self.manager.reached_preemption(step)

  def restore_latest_good(self, abstract_state):
    """Restores the newest readable step; returns (state, step) or raises NoCheckpointError."""
    errors = []
    for step in reversed(self.steps()):
      try:
        state = self.manager.restore(step, args=ocp.args.StandardRestore(abstract_state))
        if errors:
          logging.warning("resumed from step %d after skipping unreadable checkpoints: %s", step, "; ".join(errors))
        return state, step
      except Exception as e:  # pylint: disable=broad-except  # any unreadable step is skipped, never trusted
        msg = f"step {step}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        logging.warning("checkpoint unreadable, falling back to an older one (%s)", msg)
        errors.append(msg)
    raise NoCheckpointError("; ".join(errors) if errors else "no checkpoint")

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.wait_until_finished()
    self.manager.close()


def abstract_with_shardings(abstract_tree, shardings):
  """ShapeDtypeStructs carrying the target shardings, so a restore lands directly on this mesh."""
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_tree, shardings)

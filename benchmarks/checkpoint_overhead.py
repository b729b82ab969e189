"""How much of the training time checkpointing costs: the blocking part of an async save vs. a step.

  python benchmarks/checkpoint_overhead.py --config=configs/gmm2d.py [--num_steps=200] [--saves=10] \
      [--config.KEY=VALUE ...]

Runs the config's real training stage (through its pipeline, in a temporary workdir) with two
probes: every step is timed to completion (`block_until_ready`), and every save is timed from the
call to its return, i.e. while the caller is held: the state fingerprint plus orbax's copy of the
state off the devices (and any wait for the previous save). The rest of an async save (serialising,
writing, committing) overlaps the following steps. Prints one JSON object:

  median_step_s                 median step time (the first steps, which compile, excluded)
  save_blocking_median_s / _max_s, fingerprint_median_s (the first save, which also compiles the
                                fingerprint, is reported apart as first_save_blocking_s)
  blocking_fraction_of_step     save_blocking_median_s / median_step_s (one save costs this many steps)
  overhead_at_checkpoint_every  save_blocking_median_s / (checkpoint_every * median_step_s), with the
                                config's own checkpoint_every: the fraction of training time lost
  async_write_s                 the final save from call to fully on disk (blocking + background)
"""
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from absl import app, flags
from ml_collections import config_flags

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

_CONFIG = config_flags.DEFINE_config_file("config", "configs/gmm2d.py", "ml_collections config file.", lock_config=True)
_NUM_STEPS = flags.DEFINE_integer("num_steps", 200, "Training steps to time.")
_SAVES = flags.DEFINE_integer("saves", 10, "Checkpoints to time (evenly spread over the steps).")
_SKIP = flags.DEFINE_integer("skip_steps", 3, "First steps left out of the step-time median (compilation).")


def main(argv):
  del argv
  import jax  # pylint: disable=import-outside-toplevel
  jax.config.update("jax_threefry_partitionable", True)
  from simjax import pipelines, workdir as workdir_lib  # pylint: disable=import-outside-toplevel
  from simjax.training import checkpoint as ckpt_lib, loop as loop_lib  # pylint: disable=import-outside-toplevel

  config = _CONFIG.value
  checkpoint_every = int(config.checkpoint_every)
  with config.unlocked():
    config.num_steps = _NUM_STEPS.value
    config.checkpoint_every = max(1, _NUM_STEPS.value // _SAVES.value)
    config.log_every = config.checkpoint_every
    if "eval" in config:
      config.eval.num_samples = min(int(config.eval.get("num_samples", 0)), 64) or 64

  step_times, saves, state_info, final_write = [], [], {}, {}
  original_run_loop, original_save, original_wait = loop_lib.run_loop, ckpt_lib.Checkpointer.save, \
      ckpt_lib.Checkpointer.wait

  def timed_run_loop(**kwargs):
    step_fn = kwargs["step_fn"]
    def timed_step_fn(step):
      compiled = step_fn(step)
      def run(state, consts):
        t0 = time.perf_counter()
        out = jax.block_until_ready(compiled(state, consts))
        step_times.append(time.perf_counter() - t0)
        return out
      return run
    kwargs["step_fn"] = timed_step_fn
    return original_run_loop(**kwargs)

  def timed_save(self, step, state, force=False):
    if not state_info:
      leaves = jax.tree.leaves(state)
      state_info.update(num_leaves=len(leaves), state_bytes=int(sum(x.size * x.dtype.itemsize for x in leaves)))
    saved = original_save(self, step, state, force=force)
    if saved:
      saves.append((self.last_save_blocking_seconds, self.last_fingerprint_seconds))
      final_write["start"] = time.perf_counter() - self.last_save_blocking_seconds
    return saved

  def timed_wait(self):
    original_wait(self)
    if "start" in final_write and "seconds" not in final_write:
      final_write["seconds"] = time.perf_counter() - final_write["start"]

  loop_lib.run_loop, ckpt_lib.Checkpointer.save, ckpt_lib.Checkpointer.wait = timed_run_loop, timed_save, timed_wait
  with tempfile.TemporaryDirectory() as workdir:
    pipeline = pipelines.get(config)
    pipeline.validate(config, "train")
    workdir_lib.prepare(workdir, config)
    pipeline.run(config, workdir, "train")

  step_median = statistics.median(step_times[_SKIP.value:])
  first_save, saves = saves[0], saves[1:] or saves  # the first save also compiles the fingerprint
  blocking = statistics.median(s[0] for s in saves)
  print(json.dumps({
      "config": next((a.split("=", 1)[1] for a in sys.argv if a.startswith("--config=")), "configs/gmm2d.py"),
      "overrides": [a for a in sys.argv[1:] if a.startswith("--config.")],
      "backend": jax.default_backend(), "device": str(jax.devices()[0].device_kind), "num_devices": jax.device_count(),
      **state_info,
      "steps_timed": len(step_times) - _SKIP.value, "median_step_s": step_median,
      "saves_timed": len(saves), "save_blocking_median_s": blocking, "save_blocking_max_s": max(s[0] for s in saves),
      "first_save_blocking_s": first_save[0],
      "fingerprint_median_s": statistics.median(s[1] for s in saves),
      "blocking_fraction_of_step": blocking / step_median,
      "checkpoint_every": checkpoint_every,
      "overhead_at_checkpoint_every": blocking / (checkpoint_every * step_median),
      "async_write_s": final_write.get("seconds"),
  }, indent=2))


if __name__ == "__main__":
  app.run(main)

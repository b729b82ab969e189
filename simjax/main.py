"""simjax's entry point.

  python -m simjax.main --config=configs/gmm2d.py --workdir=/tmp/run [--mode=train_and_eval] [--config.a.b=v]

Modes: train_and_eval (default: every stage of the config, then evaluation), train, eval, sample.
A run resumes automatically from its workdir. Bad input exits with status 2 and a one-line error.
"""
import logging
import sys

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

from simjax.errors import UserError

_CONFIG = config_flags.DEFINE_config_file("config", None, "ml_collections config file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics, samples and eval (gs:// works).")
_MODE = flags.DEFINE_enum("mode", "train_and_eval", ["train_and_eval", "train", "eval", "sample", "train_teacher"],
                          "What to run.")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Clear a workdir that holds another run (or nothing readable).")
_DISTRIBUTED = flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() (multi-host); also "
                                 "SIMJAX_DISTRIBUTED=1, and auto-detected on Cloud TPU pods and SLURM.")
flags.mark_flags_as_required(["config", "workdir"])

EXIT_BAD_INPUT = 2


def fail(message: str):
  print(f"simjax: error: {message}", file=sys.stderr, flush=True)
  sys.exit(EXIT_BAD_INPUT)


def _one_line(e: Exception) -> str:
  return str(e).splitlines()[0] if str(e) else type(e).__name__


def main(argv):
  if len(argv) > 1:
    fail(f"unexpected arguments {argv[1:]}; pass settings as --config.KEY=VALUE.")
  if not flags.FLAGS["verbosity"].present:
    absl_logging.set_verbosity(absl_logging.WARNING)  # orbax is chatty at INFO; progress goes to stdout
  import jax  # pylint: disable=import-outside-toplevel  # after flag parsing: --help stays fast
  jax.config.update("jax_threefry_partitionable", True)
  from simjax import pipelines, workdir as workdir_lib  # pylint: disable=import-outside-toplevel
  from simjax.parallel import mesh as mesh_lib  # pylint: disable=import-outside-toplevel

  mesh_lib.maybe_initialize_distributed(_DISTRIBUTED.value)
  logging.info("process %d/%d, %d local / %d global devices (%s)", jax.process_index(), jax.process_count(),
               jax.local_device_count(), jax.device_count(), jax.default_backend())
  config = _CONFIG.value
  try:  # everything a user can get wrong is checked here, before the workdir is touched
    pipeline = pipelines.get(config)
    pipeline.validate(config, _MODE.value)
    workdir_lib.prepare(_WORKDIR.value, config, overwrite=_OVERWRITE.value,
                        require_run=_MODE.value in ("eval", "sample"))
  except (ValueError, FileNotFoundError) as e:
    fail(_one_line(e))
  try:
    status = pipeline.run(config, _WORKDIR.value, _MODE.value)
  except (UserError, FileNotFoundError) as e:
    fail(_one_line(e))
  if status == "preempted":
    logging.warning("preempted; rerun the same command to resume")


def run():
  app.run(main)


if __name__ == "__main__":
  run()

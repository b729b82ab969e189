"""simjax's entry point.

  python -m simjax.main --config=configs/gmm2d.py --workdir=/tmp/run [--mode=train_and_eval] [--config.a.b=v]

Modes: train_and_eval (default: every stage of the config, then evaluation), train, eval, sample.
A run resumes automatically from its workdir. Exit status, each failure printed as one line on stderr:
  0  finished, or preempted (SIGTERM/SIGINT: checkpointed at the current step; rerun to resume),
  1  the run started and failed: a non-finite loss/gradient streak stopped it (the last good
     checkpoint is kept), or an unexpected error (traceback),
  2  bad input, nothing written to the workdir: flags, config keys/types/values, a workdir holding
     another run, eval without a checkpoint; and a workdir whose checkpoints are all unreadable.
"""
import logging
import re
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

EXIT_PREEMPTED = 0
EXIT_RUN_FAILED = 1
EXIT_BAD_INPUT = 2


def fail(message: str, status: int = EXIT_BAD_INPUT):
  print(f"simjax: error: {message}", file=sys.stderr, flush=True)
  sys.exit(status)


def _one_line(e: BaseException) -> str:
  return str(e).splitlines()[0] if str(e) else type(e).__name__


def _config_override_error(e: Exception, argv) -> str:
  """ml_collections' error for `--config.KEY=...` naming no field, as one line with the fix."""
  text = " ".join(str(a) for a in e.args) if e.args else str(e)
  missing = re.findall(r"'(\w+)'", text)
  hint = re.search(r'Did you mean \\?"(\w+)\\?"', text)
  keys = [a.split("=", 1)[0][2:] for a in argv[1:] if a.startswith("--config.")]
  bad = next((k for k in keys if missing and missing[0] in k.split(".")), keys[0] if keys else "config.?")
  return (f"unknown config key --{bad}{f' (did you mean {hint.group(1)!r}?)' if hint else ''}; "
          "config keys are fixed by the --config file: check the spelling against it.")


def parse_flags(argv):
  """absl's flag parsing, with every error (flags, config overrides, the config file) as one line + exit 2."""
  try:
    rest = flags.FLAGS(argv)
    if _CONFIG.present:
      _CONFIG.value.keys()  # ml_collections defers a config file's load error to the first attribute access
    return rest
  except flags.Error as e:  # bad value for a typed field, unknown flag, missing --workdir/--config
    message = _one_line(e)
    if "before a value for --config" in message:
      fix = "pass --config=FILE before any --config.KEY=VALUE"
    elif "--config." in message:
      fix = "give it a value of the type its default has in the config file"
    elif "Unknown command line flag" in message:
      fix = "see --helpfull for the accepted flags; config keys go as --config.KEY=VALUE"
    elif "must have a value other than None" in message:
      fix = "pass it, e.g. --config=configs/gmm2d.py --workdir=/tmp/run"
    else:
      fix = "see --helpfull"
    fail(f"{message.rstrip('.')}; {fix}.")
  except Exception as e:  # pylint: disable=broad-except  # the config file itself: missing, or it raises
    if isinstance(e, (AttributeError, KeyError)) and any(a.startswith("--config.") for a in argv[1:]):
      fail(_config_override_error(e, argv))  # ml_collections: --config.KEY names no field of the locked config
    config_arg = next((a for a in argv[1:] if a.startswith("--config=")), "--config")
    lines = [l.strip() for l in str(e).splitlines() if l.strip()]
    detail = lines[-1][-200:] if lines else ""
    fail(f"could not load {config_arg} ({type(e).__name__}: {detail}); pass a readable ml_collections "
         "file defining get_config(), e.g. --config=configs/gmm2d.py.")


def main(argv):
  if len(argv) > 1:
    fail(f"unexpected arguments {argv[1:]}; pass settings as --config.KEY=VALUE.")
  if not flags.FLAGS["verbosity"].present:
    absl_logging.set_verbosity(absl_logging.WARNING)  # orbax is chatty at INFO; progress goes to stdout
  import jax  # pylint: disable=import-outside-toplevel  # after flag parsing: --help stays fast
  import simjax  # pylint: disable=import-outside-toplevel
  jax.config.update("jax_threefry_partitionable", True)
  from simjax.compile_cache import enable_compilation_cache  # pylint: disable=import-outside-toplevel
  enable_compilation_cache()
  from simjax import pipelines, storage, tensorboard, workdir as workdir_lib  # pylint: disable=import-outside-toplevel
  from simjax.parallel import mesh as mesh_lib  # pylint: disable=import-outside-toplevel
  from simjax.training import loop as loop_lib  # pylint: disable=import-outside-toplevel
  from simjax.training import perf as perf_lib  # pylint: disable=import-outside-toplevel
  try:
    perf_lib.before_backend_start(_CONFIG.value)  # first: nothing may start a backend before it
  except ValueError as e:
    fail(_one_line(e))
  except (AttributeError, KeyError) as e:
    _fail_if_config_lacks_a_key(e)
    raise

  try:
    mesh_lib.maybe_initialize_distributed(_DISTRIBUTED.value)
  except ValueError as e:
    fail(_one_line(e))
  loop_lib.PREEMPTION.install()  # from here on SIGTERM/SIGINT end the run cleanly (exit 0), see loop.py
  logging.info("process %d/%d, %d local / %d global devices (%s)", jax.process_index(), jax.process_count(),
               jax.local_device_count(), jax.device_count(), jax.default_backend())
  config = _CONFIG.value
  try:
    try:  # everything a user can get wrong is checked here, before the workdir is touched
      workdir = storage.resolve_workdir(_WORKDIR.value)  # once, absolute: every writer sees this path
      pipeline = pipelines.get(config)
      pipeline.validate(config, _MODE.value)
      workdir_lib.prepare(workdir, config, overwrite=_OVERWRITE.value, require_run=_MODE.value in ("eval", "sample"))
    except (ValueError, TypeError, FileNotFoundError) as e:
      fail(_one_line(e))
    except (AttributeError, KeyError) as e:
      _fail_if_config_lacks_a_key(e)
      raise
    perf_lib.apply_process_options(perf_lib.resolve(config))  # validated above
    if jax.process_index() == 0:
      print(f"simjax {simjax.__version__}: {config.pipeline} pipeline, --mode={_MODE.value}, workdir "
            f"{workdir}; {jax.device_count()} {jax.default_backend()} device(s), {jax.process_count()} "
            "process(es)", flush=True)
    try:
      try:
        status = pipeline.run(config, workdir, _MODE.value)
      finally:
        tensorboard.close_all()  # the events are flushed (and on gs:// copied) on every way out
      workdir_lib.write_pending_records(workdir)  # a mode that read no checkpoint back (its stages were done)
    except (UserError, FileNotFoundError) as e:
      fail(_one_line(e))
    except loop_lib.NonFiniteError as e:
      fail(_one_line(e), EXIT_RUN_FAILED)
  except loop_lib.Preempted as e:
    print(f"simjax: preempted by signal {e.args[0] if e.args else '?'} outside the step loop; nothing unsaved "
          "was lost; rerun the same command to resume.", file=sys.stderr, flush=True)
    sys.exit(EXIT_PREEMPTED)
  if status == "preempted":
    print("simjax: preempted; checkpoint saved; rerun the same command to resume.", file=sys.stderr, flush=True)
  elif jax.process_index() == 0:
    print_results(workdir)


def _fail_if_config_lacks_a_key(e: BaseException):
  """Exit 2 when `e` is ml_collections' lookup of a field the config lacks (a user's own config file not built on
  configs/common.py); any other error is not the user's to fix and returns, for the caller to raise."""
  tb = e.__traceback__
  while tb is not None and tb.tb_next is not None:
    tb = tb.tb_next
  if tb is None or "ml_collections" not in tb.tb_frame.f_code.co_filename:
    return
  found = re.search(r"'([^'\"]+)'", str(e))
  key = found.group(1) if found else "?"
  fail(f"the config has no key {key!r} (its pipeline reads it); pass a --config file built on configs/common.py's "
       "defaults (common.shared_config / image_config / text_to_image_config), as configs/*.py are.")


def print_results(workdir):
  """The run's last lines: where its results are."""
  from etils import epath  # pylint: disable=import-outside-toplevel
  root = epath.Path(workdir)
  found = [str(root / name) for name in ("eval/final.json", "samples", "generator", "metrics.jsonl")
           if (root / name).exists()]
  print("simjax: done; results in " + (", ".join(found) if found else str(root)), flush=True)


def run():
  app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
  run()

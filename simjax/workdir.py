"""The workdir: its resolved config, run record, and the guard against mixing two runs in one place."""
import json
import platform
import shutil
import time

import jax
from etils import epath

import simjax

# Keys a user may change when continuing a run: how long it runs and how it reports, not what it learns.
RESUMABLE_CHANGES = ("num_steps", "log_every", "checkpoint_every", "keep_checkpoints", "eval", "sample",
                     "max_nonfinite_streak", "mesh_shape", "debug", "grid_every", "teacher_train.num_steps",
                     "teacher_train.log_every", "teacher_train.checkpoint_every",
                     "perf")  # speed/memory switches: a run may move between machines


class WorkdirError(ValueError):
  pass


def _flatten(d, prefix=""):
  out = {}
  for k, v in d.items():
    key = f"{prefix}{k}"
    if isinstance(v, dict):
      out.update(_flatten(v, key + "."))
    else:
      out[key] = v
  return out


def config_differences(old: dict, new: dict):
  """Keys whose values differ, ignoring RESUMABLE_CHANGES."""
  a, b = _flatten(old), _flatten(new)
  diffs = []
  for k in sorted(set(a) | set(b)):
    if any(k == r or k.startswith(r + ".") for r in RESUMABLE_CHANGES):
      continue
    if json.dumps(a.get(k)) != json.dumps(b.get(k)):
      diffs.append(k)
  return diffs


def prepare(workdir, config, *, overwrite: bool = False, require_run: bool = False):
  """Checks the workdir against this config before anything is written; then records the config.

  A workdir holding a different run is refused (exit 2 upstream) unless `overwrite`, which clears it.
  `require_run` (eval, sample) refuses a workdir without checkpoints.
  """
  path = epath.Path(workdir)
  if path.exists() and not path.is_dir():
    raise WorkdirError(f"--workdir={workdir} is a file, not a directory; point --workdir at a directory.")
  if require_run and not has_checkpoint(path):
    raise WorkdirError(f"no checkpoint in {workdir} to evaluate or sample from; train first "
                       "(--mode=train_and_eval) or point --workdir at a finished run.")
  config_json = json.loads(config.to_json_best_effort())
  recorded = path / "config.json"
  # Our own half-written files (a kill between write and rename) do not make a workdir "another run".
  clear = False
  if path.exists() and any(not child.name.endswith(".tmp") for child in path.iterdir()):
    if overwrite:
      clear = True
    elif recorded.exists():
      try:
        old = json.loads(recorded.read_text())
      except ValueError:
        raise WorkdirError(f"{recorded} is unreadable; pass --overwrite to start over in {workdir}.") from None
      diffs = config_differences(old, config_json)
      if diffs:
        raise WorkdirError(f"workdir {workdir} holds a run with a different config ({', '.join(diffs[:5])}"
                           f"{'...' if len(diffs) > 5 else ''}); use another --workdir, or --overwrite to replace it.")
    elif not (path / "checkpoints").exists():
      raise WorkdirError(f"workdir {workdir} is not empty and holds no simjax run; use an empty --workdir "
                         "or pass --overwrite.")
  # Every host checks before any host writes or clears, and none goes on before the writes are done.
  _sync("simjax_workdir_checked")
  if jax.process_index() == 0 and clear:
    for child in path.iterdir():
      shutil.rmtree(child) if child.is_dir() else child.unlink()
  if jax.process_index() == 0:
    path.mkdir(parents=True, exist_ok=True)
    _write(recorded, json.dumps(config_json, indent=2, sort_keys=True) + "\n")
    info = {"simjax_version": simjax.__version__, "jax_version": jax.__version__, "python": platform.python_version(),
            "backend": jax.default_backend(), "num_devices": jax.device_count(),
            "num_processes": jax.process_count(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    _write(path / "run_info.json", json.dumps(info, indent=2) + "\n")
  _sync("simjax_workdir_ready")


def _sync(name: str):
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
    multihost_utils.sync_global_devices(name)


def has_checkpoint(path) -> bool:
  """Whether `path`/checkpoints holds a finished step (orbax names it by the step number; a step still
  being written, or left by a kill, is named `<step>.orbax-checkpoint-tmp*`)."""
  ckpts = epath.Path(path) / "checkpoints"
  return ckpts.is_dir() and any(child.name.isdigit() for child in ckpts.iterdir())


def _write(path: epath.Path, text: str):
  tmp = path.parent / (path.name + ".tmp")
  tmp.write_text(text)
  tmp.replace(path)

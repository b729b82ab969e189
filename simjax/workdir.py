"""The workdir: its resolved config, run record, and the guard against mixing two runs in one place."""
import json
import platform
import time

import jax
from etils import epath

import simjax
from simjax import storage
from simjax.errors import UserError

# Keys a user may change when continuing a run: how long it runs and how it reports, not what it learns.
RESUMABLE_CHANGES = ("num_steps", "log_every", "checkpoint_every", "keep_checkpoints", "eval", "sample",
                     "max_nonfinite_streak", "mesh_shape", "debug", "grid_every", "teacher_train.num_steps",
                     "teacher_train.log_every", "teacher_train.checkpoint_every",
                     "perf")  # speed/memory switches: a run may move between machines


# Config keys added after runs were recorded without them, each with the value that behaves as those runs
# did: a recorded run lacking one resumes when this run has that value (any other value is a difference).
ADDED_KEYS = {
    "loss.t_min": 0.0,                  # the generator loss's noise levels from t = 0, as before the key
    "loss.alpha": 1.2,                  # read only by loss.name='sid'
    "loss.dmd_t_min": 0.02,             # read only by loss.name='dmd'
    "loss.dmd_t_max": 0.98,
    "loss.regression_weight": 0.0,      # DMD's regression term off
    "loss.regression_pairs": 1024,
    "teacher.guidance": 1.0,            # unguided teacher
    "teacher_train.label_dropout": 0.0,
    "loss.f": "reverse_kl",             # read only by loss.name='uni_instruct'
    "adversarial.weight": 0.0,          # SiDA's adversarial term off
    "adversarial.discriminator_weight": 1.0,
    "adversarial.start_images": 0.0,    # the adversarial term from the first step
    "optim.generator.grad_value_clip": 0.0,  # no value clipping
    "optim.fake.grad_value_clip": 0.0,
    "teacher_train.optim.grad_value_clip": 0.0,
    "fake_noise": "auto",               # EDM's lognormal draw for every continuous teacher, as before
    "captions.distractors": 0.0,        # the digits' training captions as generated before the key
    "captions.word_fraction": 0.5,      # half the training captions spell the digit out, as before the key
    "vae": "",                          # image runs: pixel space, as before the key
    "sample.classes": (),               # --mode=sample: uniformly drawn classes, as before the key
    "loss.logvar_weighting": False,     # no EDM2 uncertainty weighting, as before the key
    "teacher_train.caption_digit_weight": 0.0,  # the text encoder learns from the epsilon loss alone, as before
    # Declared for every pipeline once the package stopped supplying them (gmm runs lacked them; their values
    # are the defaults the package read in their place).
    "optim.generator.forced_weight_normalization": False,
    "optim.fake.forced_weight_normalization": False,
    "teacher_train.optim.forced_weight_normalization": False,
    "loss.huber_c_per_dim": 0.3,        # read only where loss.huber_c is 0 (gmm runs set huber_c)
    "loss.generator_scale": 1.0,        # SiD's loss scaling off
    "loss.fake_scale": 1.0,
    "fake_augment_p": 0.0,              # no augmentation of the fake score's DSM
}


class WorkdirError(UserError):
  """The workdir holds another run, or records that cannot be read."""


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
  """Keys whose values differ, ignoring RESUMABLE_CHANGES and ADDED_KEYS a recorded run predates."""
  a, b = _flatten(old), _flatten(new)
  diffs = []
  for k in sorted(set(a) | set(b)):
    if any(k == r or k.startswith(r + ".") for r in RESUMABLE_CHANGES):
      continue
    if k not in a and k in ADDED_KEYS and json.dumps(b.get(k)) == json.dumps(ADDED_KEYS[k]):
      continue
    if json.dumps(a.get(k)) != json.dumps(b.get(k)):
      diffs.append(k)
  return diffs


def with_added_keys(recorded: dict) -> dict:
  """A recorded config.json's dict with the ADDED_KEYS it predates set to their values (where their section is
  there): the config a tool that rebuilds a recorded run reads, every key present as the package reads them."""
  out = json.loads(json.dumps(recorded))
  for key, value in ADDED_KEYS.items():
    *sections, leaf = key.split(".")
    node = out
    for section in sections:
      node = node.get(section)
      if not isinstance(node, dict):
        break
    else:
      node.setdefault(leaf, value)
  return out


def _read_json_object(path: epath.Path, workdir):
  """A workdir's JSON record as a dict, or WorkdirError naming the file and the fix."""
  try:
    value = json.loads(path.read_bytes().decode())
  except (ValueError, UnicodeDecodeError):
    raise WorkdirError(f"{path} is unreadable (not JSON); pass --overwrite to start over in {workdir}, or use "
                       "another --workdir.") from None
  if not isinstance(value, dict):
    raise WorkdirError(f"{path} holds JSON that is not an object; pass --overwrite to start over in {workdir}, or "
                       "use another --workdir.")
  return value


def is_simjax_run(path: epath.Path) -> bool:
  """Whether `path` carries simjax's own markers (what --overwrite may clear)."""
  for name, key in (("run_info.json", "simjax_version"), ("config.json", "pipeline")):
    try:
      if key in json.loads((path / name).read_bytes().decode()):
        return True
    except (OSError, ValueError, UnicodeDecodeError, TypeError):
      continue
  return has_checkpoint(path) and (path / "config.json").exists()


def _ours(child) -> bool:
  """Files that do not make a workdir hold "another run": our lock and our half-written temp files."""
  return child.name == storage.LOCK_NAME or child.name.endswith(".tmp")


_PENDING = {}  # workdir -> (config_json, run_info): a resumed run records itself once its checkpoint reads back


def prepare(workdir: str, config, *, overwrite: bool = False, require_run: bool = False):
  """Checks the (resolved) workdir against this config before anything is written; then locks it and
  records the config, or, when it resumes a run, defers the records to `write_pending_records`.

  A workdir holding a different run is refused (exit 2 upstream) unless `overwrite`, which clears it;
  `overwrite` never clears a directory without simjax's markers. `require_run` (eval, sample) refuses a
  workdir without checkpoints.
  """
  path = epath.Path(workdir)
  if path.exists() and not path.is_dir():
    raise WorkdirError(f"--workdir={workdir} is a file, not a directory; point --workdir at a directory.")
  storage.check_local_writable(workdir)
  if require_run and not has_checkpoint(path):
    raise WorkdirError(f"no checkpoint in {workdir} to evaluate or sample from; train first "
                       "(--mode=train_and_eval) or point --workdir at a finished run.")
  config_json = json.loads(config.to_json_best_effort())
  recorded = path / "config.json"
  occupied = path.exists() and any(not _ours(child) for child in path.iterdir())
  clear = False
  if occupied and overwrite:
    if not is_simjax_run(path):
      raise WorkdirError(f"workdir {workdir} is not empty and holds no simjax run; --overwrite clears only "
                         "simjax runs: use an empty or new --workdir.")
    clear = True
  elif occupied:
    if recorded.exists():
      diffs = config_differences(_read_json_object(recorded, workdir), config_json)
      if diffs:
        raise WorkdirError(f"workdir {workdir} holds a run with a different config ({', '.join(diffs[:5])}"
                           f"{'...' if len(diffs) > 5 else ''}); use another --workdir, or --overwrite to replace it.")
    elif not (path / "checkpoints").exists():
      raise WorkdirError(f"workdir {workdir} is not empty and holds no simjax run; use an empty or new --workdir.")
    for log in ("metrics.jsonl", "teacher/metrics.jsonl"):
      try:
        if (path / log).exists():
          (path / log).read_bytes().decode()
      except UnicodeDecodeError:
        raise WorkdirError(f"{path / log} is not UTF-8 text (damaged); move it aside to resume from the "
                           f"checkpoints, or pass --overwrite to start over in {workdir}.") from None
  # Every host checks before any host writes or clears, and none goes on before the writes are done.
  _sync("simjax_workdir_checked")
  info = {"simjax_version": simjax.__version__, "jax_version": jax.__version__, "python": platform.python_version(),
          "backend": jax.default_backend(), "num_devices": jax.device_count(),
          "num_processes": jax.process_count(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
  if jax.process_index() == 0:
    storage.LOCK.acquire(workdir)
    if clear:
      for child in path.iterdir():
        if child.name != storage.LOCK_NAME:
          child.rmtree() if child.is_dir() else child.unlink()
    path.mkdir(parents=True, exist_ok=True)
  _PENDING[workdir] = (config_json, info)
  if clear or not any(has_checkpoint(path / stage) for stage in ("", "teacher")):
    write_pending_records(workdir)  # nothing to read back first
  _sync("simjax_workdir_ready")


def write_pending_records(workdir: str):
  """Writes config.json and run_info.json if `prepare` deferred them (once; process 0)."""
  records = _PENDING.pop(str(workdir), None)
  if records is None or jax.process_index() != 0:
    return
  config_json, info = records
  path = epath.Path(workdir)
  storage.atomic_write_bytes(path / "config.json", (json.dumps(config_json, indent=2, sort_keys=True) + "\n").encode())
  storage.atomic_write_bytes(path / "run_info.json", (json.dumps(info, indent=2) + "\n").encode())


def _sync(name: str):
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
    multihost_utils.sync_global_devices(name)


def has_checkpoint(path) -> bool:
  """Whether `path`/checkpoints holds a finished step (orbax names it by the step number; a step still
  being written, or left by a kill, is named `<step>.orbax-checkpoint-tmp*`)."""
  ckpts = epath.Path(path) / "checkpoints"
  return ckpts.is_dir() and any(child.name.isdigit() for child in ckpts.iterdir())

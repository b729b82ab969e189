"""The image pipeline's teacher: where it lives, reading a user's checkpoint, and training one (stage 1).

A teacher is either trained in the run (config.teacher.kind == 'train': EDM's loss on the dataset,
resumable, exported to WORKDIR/teacher/final) or read from a user's EDM pickle, state dict or
converted directory (config.teacher.kind == 'checkpoint').
"""
import functools

import jax
import ml_collections
import numpy as np
from etils import epath

from simjax import data as data_lib
from simjax.errors import UserError
from simjax.networks import precond as precond_lib
from simjax.parallel import mesh as mesh_lib
from simjax.pipelines import common
from simjax.teachers import edm_checkpoints
from simjax.training import distill
from simjax.training import state as state_lib
from simjax.training import teacher_steps
from simjax.training.roles import Denoiser, split_variables


def teacher_arch_from_config(config):
  """The architecture of a teacher trained in this run (EDM preset + overrides from config.teacher.arch)."""
  a = dict(config.teacher.arch.to_dict())
  preset = a.pop("preset", "ddpmpp")
  shape = data_lib.data_shape(config)
  return precond_lib.edm_preset_arch(preset, img_resolution=shape[0], img_channels=shape[2],
                                     label_dim=int(config.label_dim), **a)


def teacher_dir(workdir):
  return epath.Path(workdir) / "teacher"


def resolve_teacher_path(config, workdir):
  if config.teacher.kind == "train":
    return teacher_dir(workdir) / "final"
  return epath.Path(config.teacher.checkpoint)


def check_arch_matches(arch, config, source):
  """Teacher resolution, channels and label count must agree with the data and config."""
  shape = data_lib.data_shape(config)
  got = (int(arch["img_resolution"]), int(arch["img_channels"]), int(arch.get("label_dim", 0)))
  want = (shape[0], shape[2], int(config.label_dim))
  names = ("resolution", "channels", "label count")
  for n, g, w in zip(names, got, want):
    if g != w:
      raise UserError(f"teacher {source} has {n} {g} but the config expects {w}; point config.teacher.checkpoint at "
                      f"a matching teacher or set config.data.shape / config.label_dim to match it.")


@functools.lru_cache(maxsize=2)
def read_teacher(path: str):
  """The teacher at `path`, read once per process (validation reads it, the run reuses it).

  Any failure to read a user's file (empty, truncated, not a pickle, an unsafe pickle, a state dict that
  does not fit its architecture) is one UserError line naming the file and what simjax accepts.
  """
  try:
    return edm_checkpoints.load_teacher(path)
  except UserError:
    raise
  except Exception as e:  # pylint: disable=broad-except  # an untrusted file: every failure is bad input
    detail = " ".join(str(e).replace(path, "it").split())
    detail = (detail if len(detail) <= 200 else detail[:197] + "...") or type(e).__name__
    raise UserError(f"cannot read the teacher checkpoint {path} ({type(e).__name__}: {detail}); point "
                    "--config.teacher.checkpoint at an EDM .pkl, a .pt/.npz state dict with arch.json beside it, "
                    "or a `python -m simjax.convert_edm` directory.") from None


def train_teacher(config, workdir, mesh):
  """Trains the teacher with EDM's loss (resumable); exports the EMA to teacher/final. Returns status."""
  final = teacher_dir(workdir) / "final"
  if (final / "arch.json").exists():
    return "done"
  tt = config.teacher_train
  arch = teacher_arch_from_config(config)
  module = precond_lib.build_precond(arch)
  denoiser = Denoiser(module)
  train, _ = data_lib.load_splits(config)
  optimizer = state_lib.make_optimizer(tt.optim)

  def init_fn():
    # Non-partitionable threefry only for init: the partitionable one compiles EDM's many draws very slowly.
    with jax.threefry_partitionable(False):
      params, _ = split_variables(jax.jit(precond_lib.init_params, static_argnums=0)(module, jax.random.key(int(tt.seed))))
    return {"denoiser": params}

  checkpointer, writer = common.open_stage(config, workdir, stage="teacher/checkpoints",
                                           metrics_file="teacher/metrics.jsonl", interval=int(tt.checkpoint_every),
                                           name="teacher")
  try:
    (teacher_dir(workdir)).mkdir(parents=True, exist_ok=True)
    state, shardings, specs = distill.setup_state({"denoiser": optimizer}, config, mesh, checkpointer,
                                                  init_fn=init_fn, ema_names=("denoiser",))
    consts = jax.device_put({"data": train.x, "labels": train.labels, "scale": np.float32(1.0),
                             "shift": np.float32(0.0), "extra": {}}, mesh_lib.replicated(mesh))
    step = teacher_steps.make_teacher_step(denoiser, _teacher_step_config(config), mesh, specs.params["denoiser"],
                                           optimizer, label_dim=int(config.label_dim), num_examples=len(train.x))
    state, status = common.run_teacher_stage(config, step, state, shardings, consts, checkpointer, writer,
                                             "teacher step")
  finally:
    checkpointer.close()
  if status == "done" and jax.process_index() == 0:
    edm_checkpoints.save_converted(final, arch, {"params": jax.device_get(state.ema["denoiser"])})
  return status


def _teacher_step_config(config):
  """The teacher step reads its own section plus the shared EDM constants."""
  tt = config.teacher_train.to_dict()
  tt.update(sigma_data=config.sigma_data, debug=config.debug.to_dict())
  return ml_collections.ConfigDict(tt)

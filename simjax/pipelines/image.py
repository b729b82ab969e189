"""The image pipeline: (train or load) an EDM teacher -> SIM distillation -> evaluation.

Stages, each resumable from the workdir:
  teacher/    teacher training with EDM's loss (when config.teacher.kind == 'train'), exported to
              teacher/final/ (arch.json + params) which the distillation stage loads;
  checkpoints/ SIM distillation: generator and fake score start as copies of the teacher;
  generator/  the EMA generator exported with its arch and sigma_init;
  eval/       Frechet distances (digit-classifier features or FID Inception), class histograms.

A latent teacher (EDM2's ImageNet-512 networks; config.vae names the VAE) distils in its latent space:
data.shape is the latent shape, and samples are decoded for features and grids (image_eval).
"""
import time

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

from simjax import draws
from simjax import data as data_lib
from simjax import exported, storage, tensorboard
from simjax.conditioning import CondSpace
from simjax.errors import UserError
from simjax.eval import fid as fid_lib
from simjax.eval import report
from simjax.networks import precond as precond_lib
from simjax.parallel import mesh as mesh_lib
from simjax.pipelines import common, image_eval, image_teacher
from simjax.teachers import edm2_latents, edm_checkpoints, guidance
from simjax.training import distill
from simjax.training import sim_steps
from simjax.training import state as state_lib
from simjax.training.roles import Denoiser, DistillNetworks, split_variables

MODES = ("train_and_eval", "train", "train_teacher", "eval", "sample")
DATA_NAMES = ("digits", "cifar10", "none")


def validate(config, mode):
  if mode not in MODES:
    raise UserError(f"mode {mode!r} is not available for the image pipeline; use one of {MODES}.")
  shape = data_lib.data_shape(config)
  mesh = common.validate_common(config, int(np.prod(shape)))
  guidance.check_config(config)
  # Sampling splits each eval batch over every device: checked here, before a run trains for hours.
  mesh_lib.check_batch_divisible(int(config.eval.batch_size), mesh, "eval.batch_size")
  if len(shape) != 3 or shape[0] != shape[1]:
    raise UserError(f"data.shape must be (R, R, C), got {shape}.")
  if sim_steps.discriminator_needed(config, int(np.prod(shape))):
    if config.data.name not in ("digits", "cifar10") or (config.data.name == "cifar10" and not config.data.data_dir):
      raise UserError(f"the discriminator ({sim_steps.DISCRIMINATOR_USE}) is shown real data: set "
                      "--config.data.name=digits, or cifar10 with --config.data.data_dir.")
  if config.data.name == "digits" and not 0.0 < float(config.data.holdout_fraction) < 1.0:
    raise UserError(f"data.holdout_fraction must lie in (0, 1), got {config.data.holdout_fraction}; "
                     "set --config.data.holdout_fraction (e.g. 0.2).")
  if config.data.name not in DATA_NAMES:  # else it would fail only at the first evaluation, after training
    raise UserError(f"unknown data.name {config.data.name!r}; use one of {DATA_NAMES} ('none': no data set, FID "
                    "against --config.eval.fid_ref).")
  if config.data.name == "none":  # ImageNet runs: no data set, FID against reference statistics by path
    if not config.eval.fid_ref or config.eval.features != "inception":
      raise UserError("data.name='none' (no data set) needs --config.eval.features=inception and "
                      "--config.eval.fid_ref=<reference statistics .npz>, or set data.name to digits / cifar10.")
    if config.teacher.kind != "checkpoint":
      raise UserError("data.name='none' has no data to train a teacher on; set --config.teacher.kind=checkpoint.")
  classes = tuple(config.sample.classes)
  label_dim = int(config.label_dim)
  if classes and (not label_dim or any(not isinstance(c, int) or not 0 <= c < label_dim for c in classes)):
    raise UserError(f"sample.classes={classes} must be class indices in [0, {label_dim}) of a class-conditional "
                    "model; fix --config.sample.classes or leave it empty for uniformly drawn classes.")
  if config.teacher.kind == "train":
    tt = config.teacher_train
    for name in ("batch_size", "num_steps", "log_every", "checkpoint_every"):
      if int(tt[name]) < 1:
        raise UserError(f"teacher_train.{name} must be >= 1, got {tt[name]}; set --config.teacher_train.{name}.")
    common.validate_ema(tt, "teacher_train.")
    state_lib.make_optimizer(tt.optim)
    mesh_lib.check_batch_divisible(int(tt.batch_size), mesh_lib.make_mesh(config.mesh_shape), "teacher_train.batch_size")
    precond_lib.build_precond(image_teacher.teacher_arch_from_config(config))
  elif config.teacher.kind == "checkpoint":
    path = epath.Path(config.teacher.checkpoint or "")
    if not config.teacher.checkpoint or not path.exists():
      raise UserError(f"teacher checkpoint {config.teacher.checkpoint!r} not found; set "
                       "--config.teacher.checkpoint to an EDM network pickle, a state dict or a converted directory.")
    if mode != "sample" or config.sample.source == "teacher":
      teacher = image_teacher.read_teacher(str(path))  # the whole file is read and checked before the workdir is touched
      image_teacher.check_arch_matches(teacher.arch, config, str(path))
  else:
    raise UserError(f"unknown teacher.kind {config.teacher.kind!r}; use 'train' or 'checkpoint'.")
  _validate_latents(config)  # after the teacher's own checks: it reads the checkpoint's latent normalisation
  if mode in ("train_and_eval", "eval"):  # read at the end of a run: checked before it starts
    if config.eval.features == "inception" and not epath.Path(config.eval.inception_path or "").is_file():
      raise UserError(f"FID Inception weights not found at {config.eval.inception_path!r}; pass "
                      "--config.eval.inception_path=pt_inception-2015-12-05-6726825d.pth (pytorch-fid's release), or "
                      "--mode=train to skip the evaluation.")
    if config.eval.fid_ref:  # read and checked now (one line naming the problem), not after training
      fid_lib.load_reference_stats(config.eval.fid_ref)


def _validate_latents(config):
  """A latent teacher (config.vae): a checkpoint teacher carrying EDM2's latent normalisation, a VAE folder that
  fits it; EDM2's own settings only on EDM2 networks."""
  _check_edm2_settings(config)
  if not config.vae:
    return
  if config.teacher.kind != "checkpoint":
    raise UserError("config.vae (a latent teacher) needs teacher.kind='checkpoint' with an EDM2 latent network.")
  if not epath.Path(config.vae).exists():
    raise UserError(f"VAE {config.vae!r} not found; set --config.vae to a diffusers AutoencoderKL folder "
                    "(stabilityai/sd-vae-ft-mse for EDM2's ImageNet-512 networks).")
  if epath.Path(config.teacher.checkpoint or "").exists():
    codec = image_eval.latent_codec(config)
    if data_lib.data_shape(config)[2] != codec.latent_channels:
      raise UserError(f"data.shape {tuple(config.data.shape)} has {config.data.shape[2]} channels but the teacher's "
                      f"latents have {codec.latent_channels}; set --config.data.shape to the latent shape.")


def _check_edm2_settings(config):
  """Forced weight normalisation (EDM2's magnitude-preserving layers) and loss.logvar_weighting (EDM2's
  uncertainty head) need an EDM2 teacher, whose networks the generator and fake score copy (teacher_train's
  optimizer: the teacher teacher.kind='train' trains)."""
  settings = common.edm2_only_settings(config, teacher_optim=config.teacher.kind == "train")
  if not settings:
    return
  if config.teacher.kind == "train":
    arch = image_teacher.teacher_arch_from_config(config)
  elif config.teacher.kind == "checkpoint" and config.teacher.checkpoint:
    arch = image_teacher.read_teacher(str(config.teacher.checkpoint)).arch
  else:
    return
  if precond_lib.precond_name_of(arch) != "EDM2Precond":
    name, why = settings[0]
    raise UserError(f"{name} is EDM2's ({why}) but the teacher is {precond_lib.precond_name_of(arch)}; "
                    "set it to False.")


# ----------------------------------------------------------------------------------------------
# Stage 2: SIM distillation

def build_distillation(config, workdir, mesh):
  path = image_teacher.resolve_teacher_path(config, workdir)
  teacher = image_teacher.read_teacher(str(path))
  image_teacher.check_arch_matches(teacher.arch, config, str(path))
  module = teacher.module
  teacher_params, extra = split_variables(teacher.params)
  nets = DistillNetworks(generator=Denoiser(module), fake=Denoiser(module), teacher=Denoiser(module),
                         data_shape=data_lib.data_shape(config), cond_space=CondSpace(label_dim=int(config.label_dim)),
                         sigma_init=float(config.sigma_init))
  return distill.Distillation(
      mesh=mesh, nets=nets, arch=teacher.arch, real_samples=lambda: real_samples(config),
      consts={"teacher": dict(teacher.params), "generator": extra, "fake": extra},
      # G and D_psi start as copies of the teacher (DESIGN.md section 1).
      init_fn=lambda: {"generator": teacher_params, "fake": teacher_params},
      optimizers={"generator": state_lib.make_optimizer(config.optim.generator),
                  "fake": state_lib.make_optimizer(config.optim.fake)})


def real_samples(config):
  """The training split as the discriminator's real samples, one-hot labelled in class-conditional runs."""
  train, _ = data_lib.load_splits(config)
  label_dim = int(config.label_dim)
  cond = np.eye(label_dim, dtype=np.float32)[train.labels] if label_dim else None
  return {"x": np.asarray(train.x, np.float32), "cond": cond}


def export_generator(workdir, distillation: distill.Distillation, state, config):
  """generator/: arch.json (with sigma_init, so sampling uses the trained value) + EMA params."""
  if jax.process_index() != 0:
    return
  info = {"sigma_init": float(config.sigma_init), "nfe": 1, "step": int(jax.device_get(state.step)),
          "latent": bool(config.vae)}
  # A continued run replaces its earlier export whole.
  codec = image_eval.latent_codec(config, workdir)
  with storage.staged_directory(epath.Path(workdir) / "generator", replace=True) as staging:
    edm_checkpoints.write_converted(staging, dict(distillation.arch), {"params": jax.device_get(state.ema["generator"])})
    edm2_latents.write_latent_normalization(staging, None if codec is None else codec.norm)
    report.write_json(staging / exported.INFO_FILE, info)


def grid_hook(config, workdir, distillation: distill.Distillation):
  """Every config.grid_every steps: a grid of EMA-generator samples (fixed noise) in samples/."""
  nets, extra = distillation.nets, distillation.generator_extra
  n = int(config.grid_size) ** 2
  key = jax.random.key(int(config.eval.seed) + 7)
  z = draws.normal(key, (n,) + nets.data_shape, jnp.float32)
  labels = (jax.nn.one_hot(jnp.arange(n) % nets.label_dim, nets.label_dim) if nets.label_dim else None)
  gen = jax.jit(lambda p: nets.generate(p, extra, z, labels))

  def hook(step, state):
    x = image_eval.viewable(config, np.asarray(jax.device_get(gen(state.ema["generator"]))))
    grid = report.image_grid(x, int(config.grid_size), scale=_grid_scale(x))
    report.write_png(epath.Path(workdir) / "samples" / f"grid_step{step:07d}.png", grid)
    tensorboard.image(workdir, "sim", step, "samples/generator_grid", grid)
  return hook


def _grid_scale(x):
  return max(1, 128 // x.shape[1])


# ----------------------------------------------------------------------------------------------
# Entry

def run(config, workdir, mode="train_and_eval"):
  mesh = mesh_lib.make_mesh(config.mesh_shape)
  timings = {}
  if mode == "sample":
    return image_eval.sample_mode(config, workdir)
  if config.teacher.kind == "train" and mode in ("train_and_eval", "train", "train_teacher"):
    t0 = time.time()
    if image_teacher.train_teacher(config, workdir, mesh) != "done":
      return "preempted"
    timings["teacher_train_seconds"] = time.time() - t0
    if mode == "train_teacher":
      return "done"
  distillation = build_distillation(config, workdir, mesh)
  return common.distill_and_evaluate(
      config, workdir, distillation, mode, timings=timings,
      make_hooks=lambda: [(int(config.grid_every), grid_hook(config, workdir, distillation)),
                          (int(config.eval.every), image_eval.periodic_eval_hook(config, workdir, distillation))],
      export=lambda state: export_generator(workdir, distillation, state, config),
      evaluate=lambda state: image_eval.evaluate(config, workdir, distillation, state))

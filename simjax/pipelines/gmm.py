"""The analytic-teacher pipeline: distill a Gaussian-mixture teacher, then evaluate against the truth.

Stages: (1) fit an MLP copy of the analytic teacher (the stand-in for "G and D_psi start as copies
of the teacher"), (2) SIM distillation, (3) evaluation of the EMA generator, the teacher's Heun
sampler and an independent true sample (the noise floor) against fresh true samples.

The mixture is standardised (mean 0, overall std sigma_data) before training so one set of
defaults fits any mixture a user passes; samples are mapped back to the user's units for evaluation.
"""
import dataclasses
import functools
import logging
import time
from typing import NamedTuple, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from simjax import tensorboard
from simjax.conditioning import CondSpace
from simjax.diffusion import edm, samplers
from simjax.eval import metrics as metrics_lib
from simjax.eval import report
from simjax.losses import dsm
from simjax.networks.mlp import MLPDenoiser
from simjax.errors import UserError
from simjax.parallel import mesh as mesh_lib
from simjax.pipelines import common
from simjax.teachers import mixture
from simjax.training import distill
from simjax.training import state as state_lib
from simjax.training.roles import Denoiser, DistillNetworks


class Standardization(NamedTuple):
  shift: np.ndarray  # [D]
  scale: float

  def to_model(self, x):
    return (x - self.shift) / self.scale

  def to_data(self, x):
    return x * self.scale + self.shift


def standardize(mix: mixture.Mixture, sigma_data: float):
  """The mixture in model units (overall mean 0, per-coordinate RMS std sigma_data)."""
  w = np.asarray(mix.weights)[:, None]
  means, stds = np.asarray(mix.means), np.asarray(mix.stds)
  mean = (w * means).sum(0)
  var = (w * (stds**2 + (means - mean) ** 2)).sum(0)
  scale = float(np.sqrt(var.mean()) / sigma_data)
  t = Standardization(mean.astype(np.float32), scale)
  model_mix = mixture.Mixture(jnp.asarray(t.to_model(means)), jnp.asarray(stds / scale), mix.weights)
  return model_mix, t


@dataclasses.dataclass(frozen=True)
class Problem:
  """The analytic side of a gmm run: the mixture in data units, in model units, and the map between them."""
  mix: mixture.Mixture
  model_mix: mixture.Mixture
  standardization: Standardization


def build(config) -> Tuple[distill.Distillation, Problem]:
  """The distillation (mesh, networks, teacher constants, the MLP's warm start) and its mixture."""
  mix = mixture.mixture_from_config(config.teacher)
  model_mix, standardization = standardize(mix, float(config.sigma_data))
  dim = int(model_mix.means.shape[1])
  mesh = mesh_lib.make_mesh(config.mesh_shape)
  mlp = MLPDenoiser(data_dim=dim, hidden=int(config.model.hidden), num_blocks=int(config.model.num_blocks),
                    emb_features=int(config.model.emb_features), dropout=float(config.model.dropout),
                    sigma_data=float(config.sigma_data))
  nets = DistillNetworks(generator=Denoiser(mlp), fake=Denoiser(mlp),
                         teacher=Denoiser(mixture.GaussianMixtureDenoiser()), data_shape=(dim,), cond_space=CondSpace(),
                         sigma_init=float(config.sigma_init))
  distillation = distill.Distillation(
      mesh=mesh, nets=nets, init_fn=functools.partial(_warm_start, mlp, model_mix, config),
      consts={"teacher": mixture.teacher_variables(model_mix), "generator": {}, "fake": {}},
      real_samples=lambda: {"x": mixture.sample(model_mix, jax.random.key(int(config.seed) + 11), REAL_SAMPLES)[0],
                            "cond": None},
      optimizers={"generator": state_lib.make_optimizer(config.optim.generator),
                  "fake": state_lib.make_optimizer(config.optim.fake)})
  return distillation, Problem(mix=mix, model_mix=model_mix, standardization=standardization)


# The discriminator's real samples: exact draws from the teacher's mixture (its ground truth).
REAL_SAMPLES = 2**16


def _warm_start(mlp, model_mix, config):
  """Generator and fake score at step 0: the MLP fitted to the analytic teacher (or fresh, copy_steps = 0)."""
  dim = int(model_mix.means.shape[1])
  if int(config.init.copy_steps) > 0:
    # setup_state also traces the warm start abstractly (eval_shape) for the shapes: report only the real fit.
    traced = isinstance(jnp.zeros(()), jax.core.Tracer)
    steps = int(config.init.copy_steps)
    if not traced and jax.process_index() == 0:
      print(f"[init] fitting the MLP to the analytic teacher: {steps} steps of batch {int(config.init.copy_batch)} "
            "...", flush=True)
    t_copy = time.time()
    p, losses = fit_teacher_copy(mlp, model_mix, config)
    if not traced and jax.process_index() == 0:
      tail = float(np.mean(np.asarray(losses)[-max(1, steps // 20):]))
      print(f"[init] fitted in {time.time() - t_copy:.0f}s: weighted denoiser error {float(losses[0]):.4g} -> "
            f"{tail:.4g} (mean of the last 5% of steps); generator and fake score start from it", flush=True)
  else:
    p = mlp.init(jax.random.key(int(config.seed) + 1), jnp.zeros((1, dim)), jnp.ones((1,)))["params"]
  return {"generator": p, "fake": jax.tree.map(jnp.copy, p)}


def fit_teacher_copy(mlp, model_mix: mixture.Mixture, config):
  """Regresses the MLP onto the analytic teacher's denoiser over EDM's noise levels (deterministic).

  x_t comes from the teacher's own distribution diffused to sigma; the target is the exact D_p.
  """
  cfg = config.init
  init_key, key = jax.random.split(jax.random.key(int(config.seed) + 1))
  dim = model_mix.means.shape[1]
  params = mlp.init(init_key, jnp.zeros((1, dim)), jnp.ones((1,)))["params"]
  opt = optax.adam(float(cfg.copy_lr))

  def loss_fn(p, k):
    k_x, k_s, k_e = jax.random.split(k, 3)
    x0, _ = mixture.sample(model_mix, k_x, int(cfg.copy_batch))
    sigma, eps = dsm.draw_dsm_noise(k_s, x0.shape, float(cfg.copy_p_mean), float(cfg.copy_p_std))
    x_t = x0 + sigma[:, None] * eps
    target = mixture.denoise(model_mix, x_t, sigma)
    pred = mlp.apply({"params": p}, x_t, sigma)
    return jnp.mean(edm.edm_loss_weight(sigma, float(config.sigma_data)) * jnp.sum((pred - target) ** 2, -1))

  def step(carry, i):
    p, o = carry
    loss, g = jax.value_and_grad(loss_fn)(p, jax.random.fold_in(key, i))
    u, o = opt.update(g, o, p)
    return (optax.apply_updates(p, u), o), loss

  (params, _), losses = jax.lax.scan(step, (params, opt.init(params)), jnp.arange(int(cfg.copy_steps)))
  return params, losses


MODES = ("train_and_eval", "train", "eval")
# Narrowest component std, relative to the mixture's overall spread, that float32 samples resolve.
MIN_RELATIVE_STD = 1e-5


def validate(config, mode: str):
  """Every check a user can fail, before main touches the workdir (one-line errors naming the fix)."""
  if mode not in MODES:
    raise UserError(f"mode {mode!r} is not available for the gmm pipeline (its teacher is analytic); use "
                    f"--mode={' / '.join(MODES)}.")
  common.validate_common(config)
  common.refuse_edm2_settings(config)
  if float(config.teacher.guidance) != 1.0:
    raise UserError(f"teacher.guidance={config.teacher.guidance} needs a conditional teacher and the gmm pipeline's "
                    "analytic teacher is unconditional; set --config.teacher.guidance=1.")
  mix = mixture.mixture_from_config(config.teacher)
  model_mix, t = standardize(mix, float(config.sigma_data))
  narrowest = float(np.min(np.asarray(model_mix.stds)) / float(config.sigma_data))
  if not np.isfinite(t.scale) or not t.scale > 0 or not np.all(np.isfinite(np.asarray(model_mix.means))):
    raise UserError(f"teacher mixture cannot be standardised (overall std {t.scale * float(config.sigma_data):.3g}); "
                     "set --config.teacher.means/stds to a finite, nonzero spread.")
  if not narrowest >= MIN_RELATIVE_STD:
    raise UserError(f"teacher.stds: the narrowest component is {narrowest:.2g} of the mixture's overall std, below "
                     f"the {MIN_RELATIVE_STD:g} float32 can resolve; set --config.teacher.stds wider or drop far-off "
                     "components from --config.teacher.means.")
  for name in ("copy_steps", "copy_batch"):
    if int(config.init[name]) < 0:
      raise UserError(f"init.{name} must be >= 0, got {config.init[name]}; set --config.init.{name} >= 0.")
  if int(config.init.copy_steps) > 0:
    if int(config.init.copy_batch) < 1:
      raise UserError(f"init.copy_batch must be >= 1 when init.copy_steps > 0 (got {config.init.copy_batch}); "
                       "set --config.init.copy_batch to a positive integer, or --config.init.copy_steps=0 to skip "
                       "the warm start.")
    for name in ("copy_lr", "copy_p_std"):
      if not float(config.init[name]) > 0:
        raise UserError(f"init.{name} must be > 0, got {config.init[name]}; set --config.init.{name} > 0.")


def run(config, workdir, mode: str = "train_and_eval"):
  validate(config, mode)  # main has already called it; direct callers get the same checks
  checkpointer, writer = common.open_stage(config, workdir)
  try:
    return _run(config, workdir, checkpointer, writer, mode)
  finally:
    checkpointer.close()


def _run(config, workdir, checkpointer, writer, mode):
  distillation, problem = build(config)
  t0 = time.time()
  status = "done"
  if mode in ("train", "train_and_eval"):
    state, status, _ = distill.train_sim(config, workdir, distillation, checkpointer, writer)
  else:
    if not checkpointer.steps():
      raise UserError(f"no checkpoint in {workdir} to evaluate; run --mode=train_and_eval first.")
    state, _, _ = distill.restore_or_init(distillation, config, checkpointer)
  timings = {"train_seconds": time.time() - t0}
  if status != "done" or mode == "train":
    return status
  evaluate(config, workdir, distillation, problem, state, timings)
  return status


def evaluate(config, workdir, distillation: distill.Distillation, problem: Problem, state, timings=None):
  """Writes eval/final.json, samples/{generator,teacher,reference}.npz and (2-D) samples/scatter.png."""
  t0 = time.time()
  nets, mix, std = distillation.nets, problem.mix, problem.standardization
  n = int(config.eval.num_samples)
  seed = int(config.eval.seed)
  gen_model, _ = distill.generate_samples(nets, state.ema["generator"], {}, n, int(config.eval.batch_size), seed)
  gen_x = std.to_data(gen_model)

  teacher = jax.jit(lambda z: samplers.heun_sample(
      lambda x, s: mixture.denoise(problem.model_mix, x, s), z, num_steps=int(config.eval.teacher_steps),
      sigma_min=float(config.sigma_min), sigma_max=float(config.sigma_max), rho=float(config.rho)))
  z = jax.random.normal(jax.random.key(seed + 1), (n,) + nets.data_shape, jnp.float32)
  teacher_x = std.to_data(np.asarray(teacher(z)))
  truth, _ = mixture.sample(mix, jax.random.key(seed + 2), n)
  reference, _ = mixture.sample(mix, jax.random.key(seed + 3), n)
  truth, reference = np.asarray(truth), np.asarray(reference)

  weights = np.asarray(mix.weights).tolist()
  def measure(x, nfe):
    # Mode statistics are invariant under the standardisation: take them in model units, where float32 is safe.
    mass, off = mixture.mode_statistics(problem.model_mix, std.to_model(np.asarray(x, np.float64)).astype(np.float32))
    return {
        "nfe": nfe,
        "sliced_w2": metrics_lib.sliced_w2(x, truth, int(config.eval.num_projections), seed),
        "mmd": metrics_lib.mmd(x, truth),
        "mode_mass": mass.tolist(),
        "mode_weight": weights,
        "mode_mass_max_abs_error": float(np.max(np.abs(mass - np.asarray(weights)))),
        "off_mode_mass": off,
        "off_mode_quantile": mixture.OFF_MODE_QUANTILE,
        "num_samples": int(len(x)),
    }
  results = {
      "generator": measure(gen_x, 1),
      "teacher": measure(teacher_x, samplers.num_function_evals(int(config.eval.teacher_steps))),
      "reference": measure(reference, 0),
  }
  results["generator"]["step"] = int(jax.device_get(state.step))
  if timings:
    results["generator"].update(timings)
  results["generator"]["eval_seconds"] = time.time() - t0
  report.write_final(workdir, results)
  report.write_samples(workdir, "generator", gen_x)
  report.write_samples(workdir, "teacher", teacher_x)
  report.write_samples(workdir, "reference", reference)
  if gen_x.shape[1] == 2:
    scatter = report.scatter_panels(
        [("generator (1 NFE)", gen_x), (f"teacher Heun ({results['teacher']['nfe']} NFE)", teacher_x),
         ("truth", truth)])
    report.write_png(f"{workdir}/samples/scatter.png", scatter)
    tensorboard.image(workdir, "sim", results["generator"]["step"], "samples/scatter", scatter)
  tensorboard.scalars(workdir, "sim", results["generator"]["step"],
                      {f"eval/{source}_{k}": row[k] for source, row in results.items()
                       for k in ("sliced_w2", "mmd", "off_mode_mass", "mode_mass_max_abs_error")})
  logging.info("eval: generator sliced_w2=%.4f teacher=%.4f floor=%.4f", results["generator"]["sliced_w2"],
               results["teacher"]["sliced_w2"], results["reference"]["sliced_w2"])
  if jax.process_index() == 0:
    print("eval: " + " | ".join(f"{k}: sliced_w2={v['sliced_w2']:.4f} mmd={v['mmd']:.2e} "
                                f"mode_err={v['mode_mass_max_abs_error']:.3f} off_mode={v['off_mode_mass']:.4f}"
                                for k, v in results.items()), flush=True)
  return results

"""What every pipeline does around its stages: checkpoints and metrics for a stage, shared checks."""
import math
import time

from etils import epath

from simjax import workdir as workdir_lib
from simjax.errors import UserError
from simjax.parallel import mesh as mesh_lib
from simjax.training import checkpoint as ckpt_lib
from simjax.training import loop as loop_lib
from simjax.training import perf as perf_lib
from simjax.training import state as state_lib


def open_stage(config, workdir, stage: str = "checkpoints", metrics_file: str = "metrics.jsonl", interval=None,
               name: str = "sim"):
  """(Checkpointer, MetricWriter) for stage `name`, with the metrics log cut back to the checkpoint it resumes from."""
  checkpointer = ckpt_lib.Checkpointer(epath.Path(workdir) / stage, int(interval or config.checkpoint_every),
                                       int(config.keep_checkpoints))
  writer = loop_lib.MetricWriter(workdir, metrics_file, stage=name)
  latest = checkpointer.latest_step()
  writer.truncate_after(latest if latest is not None else 0)
  if latest is None:
    workdir_lib.write_pending_records(workdir)  # this stage starts fresh: nothing to read back first
  # A corrupt latest step makes the restore fall back to an older one: cut the log back to that too.
  checkpointer.on_restore.append(writer.truncate_after)
  # A resumed run records its config only once its checkpoint has read back (an unreadable one changes nothing).
  checkpointer.on_restore.append(lambda _: workdir_lib.write_pending_records(workdir))
  return checkpointer, writer


def run_teacher_stage(config, step, state, shardings, consts, checkpointer, writer, name: str):
  """Compiles a teacher's step (logged) and runs teacher_train.num_steps of it; returns (state, status)."""
  import jax  # pylint: disable=import-outside-toplevel
  from simjax.training import distill  # pylint: disable=import-outside-toplevel
  tt = config.teacher_train
  compiled = distill.compile_logged(jax.jit(step, donate_argnums=0, out_shardings=(shardings, None)), name, state,
                                    consts)
  return loop_lib.run_loop(
      state=state, step_fn=lambda _: compiled, consts=consts, num_steps=int(tt.num_steps),
      checkpointer=checkpointer, writer=writer, log_every=int(tt.log_every),
      max_nonfinite_streak=int(config.max_nonfinite_streak), stage="teacher", progress_keys=("loss",))


def _positive(config, name, *, finite=True):
  """config[name] as a float > 0 (and finite unless finite=False), else a one-line error naming the flag."""
  value = float(config[name])
  if not value > 0 or (finite and not math.isfinite(value)):
    raise UserError(f"{name} must be > 0{' and finite' if finite else ''}, got {config[name]}; "
                     f"set --config.{name} to a positive{' finite' if finite else ''} value.")
  return value


def _positive_int(section, name, prefix="", minimum=1):
  value = int(section[name])
  if value < minimum:
    raise UserError(f"{prefix}{name} must be >= {minimum}, got {section[name]}; set --config.{prefix}{name} "
                     f"to an integer >= {minimum}.")
  return value


def validate_ema(section, prefix=""):
  """EMA half-life (images, > 0 and finite) and ramp-up ratio (0 = off, else finite > 0)."""
  half_life = float(section.ema_half_life_images)
  if not 0 < half_life < float("inf"):
    raise UserError(f"{prefix}ema_half_life_images must be a finite value > 0, got {section.ema_half_life_images}; "
                     f"set --config.{prefix}ema_half_life_images (images).")
  ratio = section.ema_rampup_ratio
  if ratio is not None and not (math.isfinite(float(ratio)) and float(ratio) >= 0):
    raise UserError(f"{prefix}ema_rampup_ratio must be 0 (no ramp-up) or a finite value > 0, got {ratio}; "
                     f"set --config.{prefix}ema_rampup_ratio (SiD/EDM use 0.05).")


def validate_common(config, data_dim: int = 1):
  """Checks shared by every pipeline; each raises a one-line ValueError naming the fix."""
  for name in ("batch_size", "num_steps", "log_every", "checkpoint_every"):
    _positive_int(config, name)
  # XLA indexes a batch's elements with 32-bit integers: a larger batch cannot even be drawn.
  if int(config.batch_size) * int(data_dim) >= 2**31:
    raise UserError(f"batch_size={config.batch_size} times {data_dim} values per sample exceeds 2^31 elements; "
                     "set --config.batch_size to a realistic value (e.g. 256).")
  for name in ("sigma_init", "sigma_min", "sigma_max", "sigma_data", "rho"):
    _positive(config, name)
  if float(config.sigma_min) >= float(config.sigma_max):
    raise UserError(f"sigma_min ({config.sigma_min}) must be below sigma_max ({config.sigma_max}); "
                     "set --config.sigma_min / --config.sigma_max so that 0 < sigma_min < sigma_max.")
  _positive_int(config, "fake_steps_per_iteration")
  for name in ("max_nonfinite_streak", "keep_checkpoints"):
    _positive_int(config, name)
  _positive(config, "fake_p_std")
  if not math.isfinite(float(config.fake_p_mean)):
    raise UserError(f"fake_p_mean must be finite, got {config.fake_p_mean}; set --config.fake_p_mean (EDM: -1.2).")
  if not 0.0 <= float(config.fake_augment_p) <= 1.0:
    raise UserError(f"fake_augment_p must lie in [0, 1], got {config.fake_augment_p}; set --config.fake_augment_p "
                     "(EDM/SiD: 0.12).")
  validate_ema(config)
  validate_eval(config)
  for name in ("generator", "fake"):
    try:
      state_lib.make_optimizer(config.optim[name])
    except ValueError as e:  # name the optimizer and the flag to fix
      raise UserError(f"optim.{name}: {str(e).rstrip('.')} (--config.optim.{name}.*).") from None
  from simjax.losses import adversarial, generator as generator_losses  # pylint: disable=import-outside-toplevel
  from simjax.training import regression, sim_steps  # pylint: disable=import-outside-toplevel
  generator_losses.get_generator_loss(config.loss, data_dim)
  sim_steps.check_discriminator(config, data_dim)
  adversarial.start_images(config)
  sim_steps.loss_scales(config)
  regression.settings(config)
  perf_lib.resolve(config)
  mesh = mesh_lib.make_mesh(config.mesh_shape)
  mesh_lib.check_batch_divisible(int(config.batch_size), mesh)
  return mesh


def edm2_only_settings(config, teacher_optim: bool = False):
  """[(key, what of EDM2's it needs)] for each EDM2-only setting switched on: forced weight normalisation of the
  generator's and fake score's optimizers (and teacher_train's, with teacher_optim), loss.logvar_weighting."""
  optimizers = {f"optim.{name}": config.optim[name] for name in ("generator", "fake")}
  if teacher_optim:
    optimizers["teacher_train.optim"] = config.teacher_train.optim
  found = [(f"{name}.forced_weight_normalization", "its magnitude-preserving layers")
           for name, optim in optimizers.items() if optim.forced_weight_normalization]
  if config.loss.logvar_weighting:
    found.append(("loss.logvar_weighting", "its uncertainty head u(sigma)"))
  return found


def refuse_edm2_settings(config, teacher_optim: bool = False):
  """For the pipelines without EDM2 networks: every edm2_only_settings is refused."""
  found = edm2_only_settings(config, teacher_optim)
  if found:
    name, why = found[0]
    raise UserError(f"{name} is EDM2's ({why}) and this pipeline has no EDM2 networks; set it to False.")


def validate_eval(config):
  """The evaluation's sizes, checked before training starts (a bad one would only fail after it)."""
  ev = config.eval
  for name, minimum in (("num_samples", 2), ("batch_size", 1), ("teacher_steps", 1), ("num_projections", 1),
                        ("periodic_samples", 2)):
    if name in ev:
      _positive_int(ev, name, "eval.", minimum)
  if "every" in ev and int(ev.every) < 0:
    raise UserError(f"eval.every must be >= 0 (0 = off), got {ev.every}; set --config.eval.every.")


def distill_and_evaluate(config, workdir, distillation, mode, *, make_hooks, export, evaluate, timings):
  """The SIM stage and the evaluation every distilling pipeline runs: train (train_and_eval, train) with
  make_hooks()'s hooks, then export(state), or restore the run (eval); then evaluate(state) -> the
  eval/final.json dict (train_and_eval, eval), `timings` added to its generator row. Returns the status."""
  from simjax.eval import report  # pylint: disable=import-outside-toplevel
  from simjax.training import distill  # pylint: disable=import-outside-toplevel
  checkpointer, writer = open_stage(config, workdir)
  try:
    t0 = time.time()
    if mode in ("train_and_eval", "train"):
      state, status, _ = distill.train_sim(config, workdir, distillation, checkpointer, writer, hooks=make_hooks())
      if status != "done":
        return status
      export(state)
    else:
      if not checkpointer.steps():
        raise UserError(f"no SIM checkpoint in {workdir}; run --mode=train_and_eval first.")
      state, _, _ = distill.restore_or_init(distillation, config, checkpointer)
    timings["sim_train_seconds"] = time.time() - t0
  finally:
    checkpointer.close()
  if mode in ("train_and_eval", "eval"):
    t0 = time.time()
    results = evaluate(state)
    timings["eval_seconds"] = time.time() - t0
    results["generator"].update(timings)
    report.write_final(workdir, results)
  return "done"

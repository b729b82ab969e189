"""What every pipeline does around its stages: checkpoints and metrics for a stage, shared checks."""
from etils import epath

from simjax.parallel import mesh as mesh_lib
from simjax.training import checkpoint as ckpt_lib
from simjax.training import loop as loop_lib
from simjax.training import perf as perf_lib
from simjax.training import state as state_lib


def open_stage(config, workdir, stage: str = "checkpoints", metrics_file: str = "metrics.jsonl", interval=None):
  """(Checkpointer, MetricWriter) for one stage, with the metrics log cut back to the checkpoint it resumes from."""
  checkpointer = ckpt_lib.Checkpointer(epath.Path(workdir) / stage, int(interval or config.checkpoint_every),
                                       int(config.keep_checkpoints))
  writer = loop_lib.MetricWriter(workdir, metrics_file)
  latest = checkpointer.latest_step()
  writer.truncate_after(latest if latest is not None else 0)
  # A corrupt latest step makes the restore fall back to an older one: cut the log back to that too.
  checkpointer.on_restore.append(writer.truncate_after)
  return checkpointer, writer


def validate_common(config):
  """Checks shared by every pipeline; each raises a one-line ValueError naming the fix."""
  for name in ("batch_size", "num_steps", "log_every", "checkpoint_every"):
    if int(config[name]) < 1:
      raise ValueError(f"{name} must be >= 1, got {config[name]}; set --config.{name} to a positive integer.")
  for name in ("sigma_init", "sigma_min", "sigma_max", "sigma_data"):
    if not float(config[name]) > 0:
      raise ValueError(f"{name} must be > 0, got {config[name]}; set --config.{name} to a positive value.")
  if float(config.sigma_min) >= float(config.sigma_max):
    raise ValueError(f"sigma_min ({config.sigma_min}) must be below sigma_max ({config.sigma_max}); "
                     "set --config.sigma_min / --config.sigma_max so that 0 < sigma_min < sigma_max.")
  if not 0.0 < float(config.loss.t_max) <= 1.0:
    raise ValueError(f"loss.t_max must lie in (0, 1], got {config.loss.t_max}; set --config.loss.t_max in (0, 1].")
  if int(config.fake_steps_per_iteration) < 1:
    raise ValueError(f"fake_steps_per_iteration must be >= 1, got {config.fake_steps_per_iteration}; "
                     "set --config.fake_steps_per_iteration to a positive integer.")
  for name in ("max_nonfinite_streak", "keep_checkpoints"):
    if name in config and int(config[name]) < 1:
      raise ValueError(f"{name} must be >= 1, got {config[name]}; set --config.{name} to a positive integer.")
  for name in ("ema_half_life_images", "fake_p_std"):
    if name in config and not float(config[name]) > 0:
      raise ValueError(f"{name} must be > 0, got {config[name]}; set --config.{name} to a positive value.")
  for name in ("generator", "fake"):
    try:
      state_lib.make_optimizer(config.optim[name])
    except ValueError as e:  # name the optimizer and the flag to fix
      raise ValueError(f"optim.{name}: {str(e).rstrip('.')} (--config.optim.{name}.*).") from None
  from simjax.losses import sim  # pylint: disable=import-outside-toplevel
  sim.get_distance(config.loss)
  perf_lib.resolve(config)
  mesh = mesh_lib.make_mesh(config.mesh_shape)
  mesh_lib.check_batch_divisible(int(config.batch_size), mesh)
  return mesh

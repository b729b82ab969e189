"""The train state pytree shared by every trainer, its optimizers, EMA and the non-finite guard."""
from typing import Dict

import flax.struct
import jax
import jax.numpy as jnp
import optax

from simjax.errors import UserError


class TrainState(flax.struct.PyTreeNode):
  """Everything a run checkpoints. `params`/`opt_state` are keyed by network ('generator', 'fake', 'denoiser').

  No RNG state: the key of step n is fold_in(base_key, n), so a resumed run replays exactly.
  """
  step: jax.Array
  params: Dict[str, object]
  opt_state: Dict[str, object]
  ema: Dict[str, object]
  # Non-finite guard: skipped steps in a row, the longest such run so far, and all skipped steps.
  nonfinite: Dict[str, jax.Array]


def make_optimizer(optim_config) -> optax.GradientTransformation:
  """Adam with linear learning-rate warm-up and optional value and global-norm clipping of the gradients; with
  `forced_weight_normalization` (EDM2 networks only) every kernel is re-normalised after each step."""
  for name in ("lr", "eps"):
    if not float(optim_config[name]) > 0:
      raise UserError(f"optimizer {name} must be > 0, got {optim_config[name]}; set a positive value.")
  if not (0.0 <= float(optim_config.b1) < 1.0 and 0.0 <= float(optim_config.b2) < 1.0):
    raise UserError(f"Adam betas must lie in [0, 1), got b1={optim_config.b1}, b2={optim_config.b2}.")
  warmup = int(optim_config.warmup_steps)
  lr = float(optim_config.lr)
  schedule = optax.linear_schedule(0.0, lr, warmup) if warmup > 0 else lr
  chain = []
  value_clip = float(optim_config.grad_value_clip or 0.0)
  if not 0.0 <= value_clip < float("inf"):
    raise UserError(f"optimizer grad_value_clip must be a finite value >= 0 (0 = off), got {value_clip}.")
  if value_clip:  # SiDA's clip_grad_value_ on the fake score: each gradient entry into [-c, c]
    chain.append(optax.clip(value_clip))
  if optim_config.grad_clip:
    chain.append(optax.clip_by_global_norm(float(optim_config.grad_clip)))
  chain.append(optax.adam(schedule, b1=float(optim_config.b1), b2=float(optim_config.b2), eps=float(optim_config.eps)))
  if optim_config.forced_weight_normalization:  # EDM2's Eq. 66 (SiDA's --force_normalization)
    from simjax.networks.edm2 import forced_weight_normalization  # pylint: disable=import-outside-toplevel
    chain.append(forced_weight_normalization())
  return optax.chain(*chain)


def apply_optimizer(optimizer: optax.GradientTransformation, params, opt_state, grads):
  """One optimizer update: (new params, new optimizer state)."""
  updates, opt_state = optimizer.update(grads, opt_state, params)
  return optax.apply_updates(params, updates), opt_state


def ema_decay(step, batch_size: int, half_life_images: float, rampup_ratio=None):
  """Per-step EMA decay from a half-life given in images (EDM): 0.5 ** (batch / half_life).

  With `rampup_ratio`, the half-life is capped at ratio * images seen, so early EMA tracks the
  network instead of its random start.
  """
  half_life = jnp.asarray(half_life_images, jnp.float32)
  if rampup_ratio:
    half_life = jnp.minimum(half_life, (step.astype(jnp.float32) + 1) * batch_size * rampup_ratio)
  return 0.5 ** (batch_size / jnp.maximum(half_life, 1e-8))


def ema_update(ema_params, params, decay):
  return jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, ema_params, params)


def new_state(params: dict, optimizers: dict, ema_names=()) -> TrainState:
  zero = jnp.zeros((), jnp.int32)
  return TrainState(
      step=zero,
      params=params,
      opt_state={k: optimizers[k].init(params[k]) for k in optimizers},
      ema={k: jax.tree.map(jnp.copy, params[k]) for k in ema_names},
      nonfinite={"streak": zero, "max_streak": zero, "total": zero},
  )


def all_finite(*trees) -> jax.Array:
  leaves = [x for t in trees for x in jax.tree.leaves(t)]
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))


def teacher_update(state: TrainState, optimizers, grads, loss, batch: int, config):
  """A teacher step's tail, shared by the image and text teachers: every network in `grads` updated by its
  optimizer and EMA (config: ema_half_life_images, ema_rampup_ratio), the update kept only if the loss and
  gradients are finite. Returns (new state, metrics)."""
  decay = ema_decay(state.step, batch, float(config.ema_half_life_images), config.ema_rampup_ratio)
  params, opt_state, ema = {}, {}, {}
  for k in grads:
    params[k], opt_state[k] = apply_optimizer(optimizers[k], state.params[k], state.opt_state[k], grads[k])
    ema[k] = ema_update(state.ema[k], params[k], decay)
  candidate = state.replace(step=state.step + 1, params=params, opt_state=opt_state, ema=ema)
  grad_norm = global_norm(grads)
  ok = all_finite([loss, grad_norm])
  new = guarded(state, candidate, ok)
  return new, {"loss": loss, "grad_norm": grad_norm, "ema_decay": decay, "step_ok": ok.astype(jnp.int32),
               "nonfinite_total": new.nonfinite["total"], "nonfinite_streak": new.nonfinite["streak"]}


def guarded(state: TrainState, candidate: TrainState, ok: jax.Array) -> TrainState:
  """Keeps `candidate` if ok, else the old state with only the counters moved (and the step advanced).

  Advancing the step on a skipped update keeps the key schedule moving, so a bad batch of noise is
  not retried forever and a resumed run still replays exactly.
  """
  pick = lambda new, old: jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)
  streak = jnp.where(ok, 0, state.nonfinite["streak"] + 1)
  return candidate.replace(
      params=pick(candidate.params, state.params),
      opt_state=pick(candidate.opt_state, state.opt_state),
      ema=pick(candidate.ema, state.ema),
      nonfinite={"streak": streak,
                 "max_streak": jnp.maximum(state.nonfinite["max_streak"], streak),
                 "total": state.nonfinite["total"] + jnp.where(ok, 0, 1)},
  )


def global_norm(tree) -> jax.Array:
  return optax.global_norm(tree)

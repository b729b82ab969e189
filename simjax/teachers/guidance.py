"""Classifier-free guidance of a conditional teacher (Ho & Salimans 2022), in denoiser units:

    D_w(x, sigma, c) = D(x, sigma, null) + w (D(x, sigma, c) - D(x, sigma, null)),

for any condition pytree (simjax.conditioning): the null condition is all zeros (EDM's label vector of
a query without a class) unless the model provides its own (`null`, e.g. a text model's empty-caption
embedding). w = 1 is the conditional teacher itself. Only the teacher is guided: the generator and the
fake score stay conditional and unguided, so SIM distils the guided teacher's distribution. A teacher
gives sensible null outputs only if it saw null conditions in training (`teacher_train.label_dropout`).
"""
import math
from typing import Callable

import jax.numpy as jnp

from simjax import conditioning
from simjax.errors import UserError


def guided(denoise: Callable, weight: float, null=None) -> Callable:
  """denoise(x, sigma, cond) -> D, guided with weight w; unchanged for w == 1 or unconditional calls.

  The conditional and null queries run as one batch of 2N (one network call, the same x_t for both).
  """
  weight = float(weight)
  if weight == 1.0:
    return denoise

  def call(x, sigma, cond):
    if cond is None:
      return denoise(x, sigma, cond)
    n = x.shape[0]
    sigma = jnp.broadcast_to(jnp.asarray(sigma, jnp.float32).reshape(-1), (n,))
    both = denoise(jnp.concatenate([x, x]), jnp.concatenate([sigma, sigma]),
                   conditioning.concat(cond, conditioning.null_like(cond, null)))
    d_cond, d_null = both[:n], both[n:]
    return d_null + weight * (d_cond - d_null)
  return call


def guided_teacher(teacher, weight: float, null=None) -> Callable:
  """denoise(variables, x, sigma, cond) of a teacher role (roles.Denoiser: its variables hold 'params' and
  the other collections), guided with weight w as `guided` (`null`: the model's own null condition)."""
  return lambda v, x, s, cond: guided(lambda x_, s_, c_: teacher.apply(v.get("params"), v, x_, s_, c_), weight,
                                      null)(x, s, cond)


def weight_of(config) -> float:
  """config.teacher.guidance (1 = none)."""
  return float(config.teacher.guidance)


def check_config(config):
  """teacher.guidance: a finite weight, only for class-conditional teachers, not with the fused teacher/fake call."""
  weight = weight_of(config)
  if not math.isfinite(weight) or weight < 0:
    raise UserError(f"teacher.guidance must be a finite weight >= 0 (1 = no guidance), got {weight}; "
                    "set --config.teacher.guidance.")
  text = config.pipeline == "text_to_image"
  if weight != 1.0 and not (text or int(config.label_dim)):
    raise UserError(f"teacher.guidance={weight} needs a class-conditional teacher; set --config.label_dim or "
                    "--config.teacher.guidance=1.")
  if weight != 1.0 and bool(config.perf.fuse_teacher_fake):
    raise UserError("teacher.guidance != 1 runs the teacher on a doubled batch, which the fused teacher/fake call "
                    "does not; set --config.perf.fuse_teacher_fake=False.")
  name = "caption_dropout" if text else "label_dropout"
  p = float(config.teacher_train[name])
  if not 0.0 <= p < 1.0:
    raise UserError(f"teacher_train.{name} must lie in [0, 1), got {p}; set --config.teacher_train.{name}.")
  return weight

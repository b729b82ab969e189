"""Classifier-free guidance of a class-conditional teacher (Ho & Salimans 2022), in denoiser units:

    D_w(x, sigma, c) = D(x, sigma, null) + w (D(x, sigma, c) - D(x, sigma, null)),

with the null condition EDM's all-zero label vector (what an EDM network sees when queried without a
class). w = 1 is the conditional teacher itself. Only the teacher is guided: the generator and the
fake score stay conditional and unguided, so SIM distils the guided teacher's distribution. A teacher
gives sensible null outputs only if it saw null labels in training (`teacher_train.label_dropout`).
"""
import math
from typing import Callable, Optional

import jax
import jax.numpy as jnp

from simjax.errors import UserError


def null_labels(labels: jax.Array) -> jax.Array:
  return jnp.zeros_like(labels)


def drop_labels(key, labels: Optional[jax.Array], p: float) -> Optional[jax.Array]:
  """Condition dropout for training: each row's label replaced by the null one with probability p."""
  if labels is None or not p:
    return labels
  keep = jax.random.uniform(key, labels.shape[:1]) >= p
  return jnp.where(keep[:, None], labels, null_labels(labels))


def guided(denoise: Callable, weight: float) -> Callable:
  """denoise(x, sigma, labels) -> D, guided with weight w; unchanged for w == 1 or unconditional calls.

  The conditional and null queries run as one batch of 2N (one network call, the same x_t for both).
  """
  weight = float(weight)
  if weight == 1.0:
    return denoise

  def call(x, sigma, labels):
    if labels is None:
      return denoise(x, sigma, labels)
    n = x.shape[0]
    sigma = jnp.broadcast_to(jnp.asarray(sigma, jnp.float32).reshape(-1), (n,))
    both = denoise(jnp.concatenate([x, x]), jnp.concatenate([sigma, sigma]),
                   jnp.concatenate([labels, null_labels(labels)]))
    d_cond, d_null = both[:n], both[n:]
    return d_null + weight * (d_cond - d_null)
  return call


def weight_of(config) -> float:
  """config.teacher.guidance (1 where the config has none)."""
  teacher = config.get("teacher")
  return float(teacher.get("guidance", 1.0)) if teacher else 1.0


def check_config(config):
  """teacher.guidance: a finite weight, only for class-conditional teachers, not with the fused teacher/fake call."""
  weight = weight_of(config)
  if not math.isfinite(weight) or weight < 0:
    raise UserError(f"teacher.guidance must be a finite weight >= 0 (1 = no guidance), got {weight}; "
                    "set --config.teacher.guidance.")
  if weight != 1.0 and not int(config.get("label_dim", 0)):
    raise UserError(f"teacher.guidance={weight} needs a class-conditional teacher; set --config.label_dim or "
                    "--config.teacher.guidance=1.")
  if weight != 1.0 and bool(config.perf.get("fuse_teacher_fake", False)):
    raise UserError("teacher.guidance != 1 runs the teacher on a doubled batch, which the fused teacher/fake call "
                    "does not; set --config.perf.fuse_teacher_fake=False.")
  p = float(config.teacher_train.get("label_dropout", 0.0)) if "teacher_train" in config else 0.0
  if not 0.0 <= p < 1.0:
    raise UserError(f"teacher_train.label_dropout must lie in [0, 1), got {p}; set --config.teacher_train.label_dropout.")
  return weight

"""DMD's regression term (Yin et al. 2024, Sec. 3.3): the generator regresses onto its teacher's deterministic
sampler from the same noise, on pairs drawn once before training.

A pair is (z, x): z ~ N(0, I) the generator's latent (it sees sigma_init z, roles.DistillNetworks.generate)
and x the teacher's Heun sample (config.eval.teacher_steps, guided as config.teacher.guidance) from sigma_max z,
with the pair's condition. DMD measures the pair with LPIPS; simjax with the per-sample mean squared error,
which needs no feature network and means the same on mixtures and images.
"""
import jax
import jax.numpy as jnp
import numpy as np

from simjax import sampling
from simjax.errors import UserError
from simjax.teachers import guidance
from simjax.training.roles import DistillNetworks

SEED_OFFSET = 7_919  # the pairs' noise: config.seed + this, apart from every other stream of the run


def settings(config):
  """(weight, number of pairs), checked: weight 0 turns the term off."""
  weight = float(config.loss.regression_weight or 0.0)
  num = int(config.loss.regression_pairs)
  if not 0.0 <= weight < float("inf"):
    raise UserError(f"loss.regression_weight must be a finite value >= 0, got {weight}; set "
                    "--config.loss.regression_weight (0 = off; DMD: 0.25).")
  if weight and num < 1:
    raise UserError(f"loss.regression_pairs must be >= 1 with loss.regression_weight > 0, got {num}; set "
                    "--config.loss.regression_pairs.")
  return weight, num


def make_pairs(nets: DistillNetworks, teacher_variables, config, mesh):
  """{'z', 'x', 'cond'}: the pairs as host arrays (the same on every process)."""
  if nets.cond_space.kind == "text":
    raise UserError("loss.regression_weight > 0 is not supported for text-conditioned teachers yet; set "
                    "--config.loss.regression_weight=0.")
  _, num = settings(config)
  batch = int(config.eval.batch_size)  # the evaluation's batch: already checked against the mesh
  seed = int(config.seed) + SEED_OFFSET
  denoise = guidance.guided_teacher(nets.teacher, guidance.weight_of(config))
  heun = sampling.make_heun_batch_fn(denoise, mesh, num_steps=int(config.eval.teacher_steps),
                                     sigma_min=float(config.sigma_min), sigma_max=float(config.sigma_max),
                                     rho=float(config.rho))
  common = dict(num=num, batch_size=batch, seed=seed, data_shape=nets.data_shape, cond_space=nets.cond_space, mesh=mesh)
  # The same seed gives the same latents and conditions: the identity returns them, the sampler its samples.
  latents = sampling.sample(lambda p, z, cond: z, {}, **common)
  teacher = sampling.sample(heun, sampling.replicate(teacher_variables, mesh), describe="regression pairs: teacher Heun",
                            **common)
  return {"z": np.asarray(latents.x, np.float32), "x": np.asarray(teacher.x, np.float32), "cond": teacher.cond}


def loss(generate, pairs, key, batch: int):
  """Mean over `batch` pairs drawn with `key` of the per-sample mean squared error ||G(z) - x||^2 / D.

  generate: (z, cond) -> x0, differentiable in the generator's parameters it closes over.
  """
  idx = jax.random.randint(key, (batch,), 0, pairs["z"].shape[0])
  take = lambda a: jnp.take(a, idx, axis=0)
  x0 = generate(take(pairs["z"]), jax.tree.map(take, pairs["cond"]))
  err = (x0 - take(pairs["x"])) ** 2
  return jnp.mean(err.reshape(batch, -1))

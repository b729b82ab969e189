"""How trainers call denoisers: a flax module plus its trainable 'params' and frozen extra collections."""
import dataclasses
import inspect
from typing import Any, Optional, Tuple

import flax.linen as nn
import jax.numpy as jnp

from simjax.conditioning import CondSpace
from simjax.networks.precond import EDM2Precond, edm2_logvar


@dataclasses.dataclass(frozen=True)
class Denoiser:
  """A denoiser module; `apply` gives D(x, sigma) from its 'params' and any frozen collections.

  Frozen collections (e.g. buffers such as Fourier frequencies, or an analytic teacher's mixture)
  are passed as `extra`, so they are never touched by an optimizer.
  """
  module: nn.Module

  def apply(self, params, extra, x, sigma, cond=None, *, augment_labels=None, train=False, rng=None,
            return_logits=False):
    """D(x, sigma); with return_logits, (D, the network's discriminator logits [N, ...]) (`has_logits`)."""
    variables = dict(extra or {})
    if params is not None:
      variables["params"] = params
    rngs = {"dropout": rng} if (train and rng is not None) else None
    kwargs = {} if augment_labels is None else {"augment_labels": augment_labels}
    if return_logits:
      kwargs["return_logits"] = True
    return self.module.apply(variables, x, sigma, cond, train=train, rngs=rngs, **kwargs)

  @property
  def has_logits(self) -> bool:
    """Whether the network also gives discriminator logits (SiDA's encoder head): SongUNets and the MLP."""
    return "return_logits" in inspect.signature(type(self.module).__call__).parameters

  @property
  def has_logvar(self) -> bool:
    """Whether the network carries EDM2's uncertainty head u(sigma) (EDM2Precond)."""
    return isinstance(self.module, EDM2Precond)

  def logvar(self, params, sigma):
    """EDM2's uncertainty u(sigma) [N] from the params (no network pass); only where `has_logvar`."""
    return edm2_logvar(self.module, params, sigma)

  @property
  def augment_dim(self) -> int:
    """How many augmentation labels the network is conditioned on (EDM's augment_dim; 0 = none)."""
    return int(getattr(getattr(self.module, "model", self.module), "augment_dim", 0) or 0)


@dataclasses.dataclass(frozen=True)
class DistillNetworks:
  """The three networks of SIM and what shapes their inputs (DESIGN.md section 1)."""
  generator: Denoiser
  fake: Denoiser
  teacher: Denoiser
  data_shape: Tuple[int, ...]
  cond_space: CondSpace
  sigma_init: float
  # A discrete-time teacher's trained noise levels (increasing): the losses' sigma are snapped to them, so
  # x_t = x + sigma eps is noised at exactly the level the teacher reads it at. None: continuous sigma.
  sigma_grid: Optional[Tuple[float, ...]] = None

  def snap_sigma(self, sigma):
    """sigma, or the nearest level of `sigma_grid`."""
    if self.sigma_grid is None:
      return sigma
    from simjax.networks.discrete_vp import nearest_timestep  # pylint: disable=import-outside-toplevel
    grid = jnp.asarray(self.sigma_grid, jnp.float32)
    return grid[nearest_timestep(sigma, grid)]

  @property
  def label_dim(self) -> int:
    return self.cond_space.label_dim

  def generate(self, params, extra, z, cond, *, train=False, rng=None):
    """x_g = G(sigma_init z, sigma_init, cond): the one-step generator."""
    sigma = jnp.full(z.shape[:1], self.sigma_init, jnp.float32)
    return self.generator.apply(params, extra, self.sigma_init * z, sigma, cond, train=train, rng=rng)


def split_variables(variables) -> Tuple[Any, dict]:
  """(trainable 'params', the other collections)."""
  variables = dict(variables)
  params = variables.pop("params", None)
  return params, variables


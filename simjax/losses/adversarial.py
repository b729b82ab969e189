"""SiDA's adversarial term (Zhou et al. 2025, "Adversarial Score identity Distillation"), and the density
ratio its discriminator gives Uni-Instruct's f-divergences (losses/generator.py).

The discriminator is the fake score network itself: its logits are the encoder's bottleneck averaged
over channels (one per position; the MLP's one per sample, networks/mlp.py), so it adds no parameters.
It is trained in the fake-score step on noised real samples (label 1) against the same-noise generated
ones (label 0), so at its optimum a logit is log p_sigma(x) / q_sigma(x) (p the data, q the generator).

Both losses are normalised over *this device's* batch, as SiDA's per-GPU BCEWithLogitsLoss is: call them
inside shard_map on the local rows. The cross-entropies average over samples and positions; SiDA then
scales the discriminator's by the mean EDM weight lambda(sigma) of the batch, and the generator's by the
mean per-sample normaliser times the values per sample (its `mean(dim=[1,2,3]) * C*H*W`).
"""
import jax
import jax.numpy as jnp

from simjax.diffusion import edm
from simjax.errors import UserError

# SiDA clamps the generator's logits to [-10, 10]; the ratio is clipped the same (|log r| <= 10).
LOGIT_CLIP = 10.0


def cross_entropy(logits, real: bool):
  """Mean binary cross-entropy of `logits` against the label 1 (real) or 0 (generated), float32."""
  logits = logits.astype(jnp.float32)
  return jnp.mean(jax.nn.softplus(-logits if real else logits))


def discriminator_loss(logits_real, logits_fake, sigma, sigma_data: float = edm.SIGMA_DATA, sample_weight=None):
  """SiDA's discriminator loss on one device's batch: mean_i lambda(sigma_i) s_i (CE(real, 1) + CE(fake, 0)) / 2,
  s_i = sample_weight (1 when None; SiD's e^-u with EDM2's uncertainty)."""
  lam = edm.edm_loss_weight(sigma, sigma_data)
  weight = jnp.mean(lam if sample_weight is None else lam * sample_weight)
  return weight * 0.5 * (cross_entropy(logits_real, True) + cross_entropy(logits_fake, False))


def generator_loss(logits, weight, data_dim: int):
  """SiDA's generator term on one device's batch: mean_i weight_i * data_dim * CE(clip(logits), 1), the
  generated samples' logits at x_t (their gradient reaches the generator through x_t)."""
  return jnp.mean(weight) * float(data_dim) * cross_entropy(jnp.clip(logits, -LOGIT_CLIP, LOGIT_CLIP), True)


def log_ratio(logits):
  """log q_sigma(x_t) / p_sigma(x_t) per sample [N]: minus the discriminator's logits averaged over positions,
  clipped to +-LOGIT_CLIP; a function of x_t, so its gradient reaches the generator."""
  per_sample = jnp.mean(logits.astype(jnp.float32).reshape(logits.shape[0], -1), axis=-1)
  return -jnp.clip(per_sample, -LOGIT_CLIP, LOGIT_CLIP)


def start_images(config) -> float:
  """adversarial.start_images: images drawn before the adversarial term enters the generator loss (SiDA:
  200k; the discriminator trains from the start). Checked finite and >= 0."""
  start = float(config.adversarial.start_images or 0.0)
  if not 0.0 <= start < float("inf"):
    raise UserError(f"adversarial.start_images must be a finite value >= 0, got {start}; set "
                    "--config.adversarial.start_images (SiDA: 200000).")
  return start


def settings(config):
  """(adversarial.weight, adversarial.discriminator_weight), checked: weight >= 0 (0 = off), discriminator
  weight > 0, both finite."""
  weight = float(config.adversarial.weight or 0.0)
  disc = float(config.adversarial.discriminator_weight)
  if not 0.0 <= weight < float("inf"):
    raise UserError(f"adversarial.weight must be a finite value >= 0 (0 = off), got {weight}; set "
                    "--config.adversarial.weight (SiDA's CIFAR-10 setting in simjax's units: 1e-4).")
  if not 0.0 < disc < float("inf"):
    raise UserError(f"adversarial.discriminator_weight must be a finite value > 0, got {disc}; set "
                    "--config.adversarial.discriminator_weight (SiDA's --lsd: 1).")
  return weight, disc


"""An EDM-preconditioned MLP denoiser for vector data (the generator and fake score of vector runs)."""
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from simjax.diffusion import edm


class NoiseEmbedding(nn.Module):
  """Sinusoidal embedding of c_noise followed by a 2-layer MLP (EDM-style positional embedding)."""
  features: int
  max_positions: int = 10000

  @nn.compact
  def __call__(self, c_noise):
    half = self.features // 2
    freqs = (1.0 / self.max_positions) ** (jnp.arange(half, dtype=jnp.float32) / half)
    # c_noise = ln(sigma)/4 is O(1); scale it up so the low frequencies still resolve it.
    angles = (250.0 * c_noise)[:, None] * freqs[None]
    emb = jnp.concatenate([jnp.cos(angles), jnp.sin(angles)], axis=-1)
    emb = nn.silu(nn.Dense(self.features, name="map0")(emb))
    return nn.silu(nn.Dense(self.features, name="map1")(emb))


class ResidualMLPBlock(nn.Module):
  features: int
  dropout: float = 0.0

  @nn.compact
  def __call__(self, h, emb, train: bool):
    y = nn.LayerNorm(name="norm")(h)
    # Adaptive scale/shift from the noise embedding, as EDM's UNet blocks do.
    scale, shift = jnp.split(nn.Dense(2 * self.features, name="affine")(emb), 2, axis=-1)
    y = nn.silu(y * (1 + scale) + shift)
    y = nn.Dense(self.features, name="fc0")(y)
    y = nn.Dropout(self.dropout, deterministic=not train)(nn.silu(y))
    y = nn.Dense(self.features, name="fc1", kernel_init=nn.initializers.zeros)(y)
    return h + y


class MLPDenoiser(nn.Module):
  """D(x, sigma) = c_skip x + c_out F(c_in x, c_noise) with F a residual MLP (Karras et al. 2022, Sec. 5)."""
  data_dim: int
  hidden: int = 256
  num_blocks: int = 4
  emb_features: int = 128
  label_dim: int = 0
  dropout: float = 0.0
  sigma_data: float = edm.SIGMA_DATA

  @nn.compact
  def __call__(self, x, sigma, class_labels: Optional[jax.Array] = None, augment_labels=None, train=False):
    del augment_labels
    x = x.astype(jnp.float32)
    sigma = jnp.broadcast_to(jnp.asarray(sigma, jnp.float32), x.shape[:1])
    pc = edm.edm_precondition(sigma, self.sigma_data)
    emb = NoiseEmbedding(self.emb_features, name="map_noise")(pc.c_noise)
    if self.label_dim:
      labels = jnp.zeros((x.shape[0], self.label_dim)) if class_labels is None else class_labels
      emb = emb + nn.Dense(self.emb_features, use_bias=False, name="map_label")(labels.astype(jnp.float32))
    h = nn.Dense(self.hidden, name="fc_in")(pc.c_in[:, None] * x)
    for i in range(self.num_blocks):
      h = ResidualMLPBlock(self.hidden, self.dropout, name=f"block{i}")(h, emb, train)
    f = nn.Dense(self.data_dim, name="fc_out")(nn.silu(nn.LayerNorm(name="norm_out")(h)))
    return pc.c_skip[:, None] * x + pc.c_out[:, None] * f

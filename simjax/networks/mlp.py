"""An EDM-preconditioned MLP denoiser for vector data (the generator and fake score of vector runs)."""
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


def pool_text(cond) -> jax.Array:
  """The mean of a text condition's token embeddings over its unmasked tokens ([N, D]; zeros if none)."""
  mask = cond["mask"].astype(jnp.float32)[..., None]
  return jnp.sum(cond["emb"].astype(jnp.float32) * mask, axis=1) / jnp.maximum(jnp.sum(mask, axis=1), 1.0)


class MLPDenoiser(nn.Module):
  """D(x, sigma) = c_skip x + c_out F(c_in x, c_noise) with F a residual MLP (Karras et al. 2022, Sec. 5).

  Conditioned like the noise level, through the embedding: on class labels (label_dim) or on a text
  condition (text_dim: its tokens mean-pooled over the mask, a small stand-in for cross-attention).
  With return_logits=True it returns (D, logits [N, 1]): the last hidden state averaged over its features,
  the MLP's counterpart of SiDA's encoder discriminator (no added parameters).
  """
  data_dim: int
  hidden: int = 256
  num_blocks: int = 4
  emb_features: int = 128
  label_dim: int = 0
  text_dim: int = 0
  dropout: float = 0.0
  sigma_data: float = edm.SIGMA_DATA

  @nn.compact
  def __call__(self, x, sigma, cond=None, augment_labels=None, train=False, return_logits=False):
    del augment_labels
    x = x.astype(jnp.float32)
    sigma = jnp.broadcast_to(jnp.asarray(sigma, jnp.float32), x.shape[:1])
    pc = edm.edm_precondition(sigma, self.sigma_data)
    emb = NoiseEmbedding(self.emb_features, name="map_noise")(pc.c_noise)
    if isinstance(cond, dict) != bool(self.text_dim) and cond is not None:
      raise ValueError(f"MLPDenoiser(label_dim={self.label_dim}, text_dim={self.text_dim}) got a "
                       f"{'text' if isinstance(cond, dict) else 'label'} condition.")
    if self.label_dim:
      labels = jnp.zeros((x.shape[0], self.label_dim)) if cond is None else cond
      emb = emb + nn.Dense(self.emb_features, use_bias=False, name="map_label")(labels.astype(jnp.float32))
    if self.text_dim:
      pooled = jnp.zeros((x.shape[0], self.text_dim)) if cond is None else pool_text(cond)
      emb = emb + nn.Dense(self.emb_features, name="map_text")(pooled)
    h = nn.Dense(self.hidden, name="fc_in")(pc.c_in[:, None] * x)
    for i in range(self.num_blocks):
      h = ResidualMLPBlock(self.hidden, self.dropout, name=f"block{i}")(h, emb, train)
    f = nn.Dense(self.data_dim, name="fc_out")(nn.silu(nn.LayerNorm(name="norm_out")(h)))
    denoised = pc.c_skip[:, None] * x + pc.c_out[:, None] * f
    if return_logits:
      return denoised, jnp.mean(h, axis=-1, keepdims=True)
    return denoised

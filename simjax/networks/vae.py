"""The Stable Diffusion VAE (diffusers' `AutoencoderKL`) in Flax, NHWC: images <-> latent posteriors.

Re-implements the KL-regularised autoencoder of Rombach et al. 2022 ("High-Resolution Image Synthesis
with Latent Diffusion Models", section 3 and appendix G) as diffusers defines it, written from that
description so that a converted checkpoint reproduces diffusers' outputs to float32 rounding. Latent
distillation needs it twice: to encode a data set into the teacher's latent space, and to decode a
generator's latents for FID and for looking at samples.

  encoder   conv_in -> down_blocks (ResNets, then a stride-2 conv except in the last block) ->
            mid_block (ResNet, single-head self-attention over the H*W tokens, ResNet) ->
            GroupNorm -> SiLU -> conv_out to 2 * latent_channels (the posterior mean and log-variance),
            then the 1x1 `quant_conv`;
  decoder   the 1x1 `post_quant_conv` -> conv_in -> mid_block -> up_blocks (layers_per_block + 1 ResNets,
            then nearest x2 and a conv except in the last block) -> GroupNorm -> SiLU -> conv_out.

Three details decide exact parity with diffusers: the downsampler zero-pads only the bottom row and
right column (diffusers' `Downsample2D` with padding 0: F.pad (0, 1, 0, 1)) before its VALID stride-2
3x3 conv; every GroupNorm uses eps 1e-6; the log-variance is clipped to [-30, 20]
(`DiagonalGaussianDistribution`).

Parameter paths mirror diffusers' names with '.<i>' joined as '_<i>': torch
`encoder.down_blocks.0.resnets.1.conv2.weight` is flax `encoder/down_blocks_0/resnets_1/conv2/kernel`
(convolutions HWIO, attention projections [in, out], GroupNorm weight/bias as scale/bias).
`simjax.teachers.vae_checkpoints` converts and loads diffusers files.

`dtype` is the compute dtype; parameters, GroupNorm statistics, the attention softmax and the outputs
of `encode_moments` / `decode_latents` stay float32.
"""
from typing import Any, Sequence, Tuple

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from simjax.networks.songunet import EDMGroupNorm

Dtype = Any
Precision = Any

DOWN_BLOCK = "DownEncoderBlock2D"
UP_BLOCK = "UpDecoderBlock2D"
NORM_EPS = 1e-6              # every GroupNorm of diffusers' Encoder / Decoder
LOGVAR_RANGE = (-30.0, 20.0)  # DiagonalGaussianDistribution's clamp


def _group_norm(groups: int, dtype: Dtype, name: str) -> EDMGroupNorm:
  """torch.nn.GroupNorm(groups, eps=1e-6): exactly `groups` groups (AutoencoderKL checks they divide)."""
  return EDMGroupNorm(num_groups=groups, min_channels_per_group=1, eps=NORM_EPS, dtype=dtype, name=name)


def _conv(features: int, kernel: int, name: str, dtype: Dtype, precision: Precision, *, stride: int = 1,
          padding: Any = "SAME") -> nn.Conv:
  return nn.Conv(features, (kernel, kernel), strides=(stride, stride), padding=padding, dtype=dtype,
                 precision=precision, name=name)


class ResnetBlock(nn.Module):
  """diffusers' ResnetBlock2D without a time embedding: x + conv2(SiLU(norm2(conv1(SiLU(norm1(x)))))),
  the skip through a 1x1 `conv_shortcut` when the width changes."""
  features: int
  groups: int
  dtype: Dtype = jnp.float32
  precision: Precision = None

  @nn.compact
  def __call__(self, x):
    conv = lambda kernel, name: _conv(self.features, kernel, name, self.dtype, self.precision)
    h = conv(3, "conv1")(nn.silu(_group_norm(self.groups, self.dtype, "norm1")(x)))
    h = conv(3, "conv2")(nn.silu(_group_norm(self.groups, self.dtype, "norm2")(h)))
    skip = x if x.shape[-1] == self.features else conv(1, "conv_shortcut")(x)
    return skip + h


class Downsample(nn.Module):
  """Zero-pad the bottom row and right column, then a VALID stride-2 3x3 conv (diffusers' pad (0,1,0,1))."""
  features: int
  dtype: Dtype = jnp.float32
  precision: Precision = None

  @nn.compact
  def __call__(self, x):
    x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
    return _conv(self.features, 3, "conv", self.dtype, self.precision, stride=2, padding="VALID")(x)


class Upsample(nn.Module):
  """Nearest-neighbour x2 (each pixel repeated 2x2), then a 3x3 conv."""
  features: int
  dtype: Dtype = jnp.float32
  precision: Precision = None

  @nn.compact
  def __call__(self, x):
    x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    return _conv(self.features, 3, "conv", self.dtype, self.precision)(x)


class SpatialSelfAttention(nn.Module):
  """Single-head self-attention over the H*W positions with a GroupNorm in front and a residual
  (diffusers' `Attention` as the VAE mid-block builds it: heads = 1, head_dim = channels).

  Written out rather than through jax.nn.dot_product_attention so that `precision` reaches the two
  products and the softmax is float32 in any compute dtype; cuDNN's fused kernel would not take the
  SD VAE's 512-wide head anyway."""
  groups: int
  dtype: Dtype = jnp.float32
  precision: Precision = None

  @nn.compact
  def __call__(self, x):
    n, height, width, channels = x.shape
    dense = lambda name: nn.Dense(channels, dtype=self.dtype, precision=self.precision, name=name)
    h = _group_norm(self.groups, self.dtype, "group_norm")(x).reshape(n, height * width, channels)
    q, k, v = dense("to_q")(h), dense("to_k")(h), dense("to_v")(h)
    logits = jnp.einsum("nqc,nkc->nqk", q, k, precision=self.precision, preferred_element_type=jnp.float32)
    weights = jax.nn.softmax(logits / np.sqrt(channels), axis=-1).astype(self.dtype)
    out = jnp.einsum("nqk,nkc->nqc", weights, v, precision=self.precision)
    return x + dense("to_out_0")(out).reshape(x.shape)


class MidBlock(nn.Module):
  """ResNet, (attention), ResNet at the lowest resolution (diffusers' UNetMidBlock2D, one layer)."""
  features: int
  groups: int
  add_attention: bool = True
  dtype: Dtype = jnp.float32
  precision: Precision = None

  @nn.compact
  def __call__(self, x):
    resnet = lambda i: ResnetBlock(self.features, self.groups, self.dtype, self.precision, name=f"resnets_{i}")
    x = resnet(0)(x)
    if self.add_attention:
      x = SpatialSelfAttention(self.groups, self.dtype, self.precision, name="attentions_0")(x)
    return resnet(1)(x)


class ResnetStage(nn.Module):
  """`num_resnets` ResNets to `features` channels, then a resampler (`down_blocks_<i>` / `up_blocks_<i>`)."""
  features: int
  groups: int
  num_resnets: int
  resample: str = ""  # "down", "up" or "" (the last block of each path)
  dtype: Dtype = jnp.float32
  precision: Precision = None

  @nn.compact
  def __call__(self, x):
    for i in range(self.num_resnets):
      x = ResnetBlock(self.features, self.groups, self.dtype, self.precision, name=f"resnets_{i}")(x)
    if self.resample == "down":
      x = Downsample(self.features, self.dtype, self.precision, name="downsamplers_0")(x)
    elif self.resample == "up":
      x = Upsample(self.features, self.dtype, self.precision, name="upsamplers_0")(x)
    return x


class Encoder(nn.Module):
  """Images [N, H, W, C] -> the posterior's moments [N, H/f, W/f, 2 * latent_channels] (before quant_conv)."""
  block_out_channels: Sequence[int]
  layers_per_block: int
  latent_channels: int
  groups: int
  mid_block_add_attention: bool = True
  dtype: Dtype = jnp.float32
  precision: Precision = None

  @nn.compact
  def __call__(self, x):
    widths = tuple(self.block_out_channels)
    x = _conv(widths[0], 3, "conv_in", self.dtype, self.precision)(x.astype(self.dtype))
    for i, features in enumerate(widths):
      x = ResnetStage(features, self.groups, self.layers_per_block, "down" if i < len(widths) - 1 else "",
                      self.dtype, self.precision, name=f"down_blocks_{i}")(x)
    x = MidBlock(widths[-1], self.groups, self.mid_block_add_attention, self.dtype, self.precision,
                 name="mid_block")(x)
    x = nn.silu(_group_norm(self.groups, self.dtype, "conv_norm_out")(x))
    return _conv(2 * self.latent_channels, 3, "conv_out", self.dtype, self.precision)(x)


class Decoder(nn.Module):
  """Latents [N, h, w, latent_channels] (after post_quant_conv) -> images [N, h*f, w*f, out_channels]."""
  block_out_channels: Sequence[int]
  layers_per_block: int
  out_channels: int
  groups: int
  mid_block_add_attention: bool = True
  dtype: Dtype = jnp.float32
  precision: Precision = None

  @nn.compact
  def __call__(self, z):
    widths = tuple(reversed(tuple(self.block_out_channels)))
    x = _conv(widths[0], 3, "conv_in", self.dtype, self.precision)(z.astype(self.dtype))
    x = MidBlock(widths[0], self.groups, self.mid_block_add_attention, self.dtype, self.precision,
                 name="mid_block")(x)
    for i, features in enumerate(widths):
      x = ResnetStage(features, self.groups, self.layers_per_block + 1, "up" if i < len(widths) - 1 else "",
                      self.dtype, self.precision, name=f"up_blocks_{i}")(x)
    x = nn.silu(_group_norm(self.groups, self.dtype, "conv_norm_out")(x))
    return _conv(self.out_channels, 3, "conv_out", self.dtype, self.precision)(x)


class AutoencoderKL(nn.Module):
  """diffusers' AutoencoderKL (see the module doc). The defaults are Stable Diffusion 1.x/2.x's VAE.

  Use through `apply(variables, images, method=AutoencoderKL.encode_moments)` and
  `apply(variables, latents, method=AutoencoderKL.decode_latents)`; `init(key, images)` creates both
  halves' parameters. Latents here are unscaled: `simjax.teachers.vae_checkpoints.load_vae` applies the
  checkpoint's scaling_factor / shift_factor."""
  in_channels: int = 3
  out_channels: int = 3
  down_block_types: Sequence[str] = (DOWN_BLOCK,) * 4
  up_block_types: Sequence[str] = (UP_BLOCK,) * 4
  block_out_channels: Sequence[int] = (128, 256, 512, 512)
  layers_per_block: int = 2
  latent_channels: int = 4
  norm_num_groups: int = 32
  use_quant_conv: bool = True
  use_post_quant_conv: bool = True
  mid_block_add_attention: bool = True
  dtype: Dtype = jnp.float32
  precision: Precision = None

  @property
  def downsampling_factor(self) -> int:
    """Pixels per latent along each side: 2 ** (number of blocks - 1), 8 for Stable Diffusion."""
    return 2 ** (len(self.block_out_channels) - 1)

  def check_arch(self):
    """Refuses what diffusers would build differently (or not at all), before any tracing."""
    widths = tuple(self.block_out_channels)
    if not widths:
      raise ValueError("block_out_channels is empty; give one width per block, e.g. (128, 256, 512, 512).")
    if len(self.down_block_types) != len(widths) or len(self.up_block_types) != len(widths):
      raise ValueError(f"{len(self.down_block_types)} down and {len(self.up_block_types)} up block types for "
                       f"{len(widths)} block_out_channels; give one of each per width.")
    bad = sorted({t for t in self.down_block_types if t != DOWN_BLOCK} | {t for t in self.up_block_types if t != UP_BLOCK})
    if bad:
      raise ValueError(f"block types {bad} are not supported; simjax's VAE builds only {DOWN_BLOCK} / {UP_BLOCK}.")
    ungroupable = [w for w in widths if w % self.norm_num_groups or w < self.norm_num_groups]
    if self.norm_num_groups < 1 or ungroupable:
      raise ValueError(f"widths {ungroupable} do not split into norm_num_groups={self.norm_num_groups} groups; "
                       "use widths that are multiples of it.")

  def setup(self):
    self.check_arch()
    common = dict(block_out_channels=tuple(self.block_out_channels), layers_per_block=self.layers_per_block,
                  groups=self.norm_num_groups, mid_block_add_attention=self.mid_block_add_attention,
                  dtype=self.dtype, precision=self.precision)
    self.encoder = Encoder(latent_channels=self.latent_channels, **common)
    self.decoder = Decoder(out_channels=self.out_channels, **common)
    one_by_one = lambda features: nn.Conv(features, (1, 1), dtype=self.dtype, precision=self.precision)
    self.quant_conv = one_by_one(2 * self.latent_channels) if self.use_quant_conv else None
    self.post_quant_conv = one_by_one(self.latent_channels) if self.use_post_quant_conv else None

  def encode_moments(self, images) -> Tuple[jax.Array, jax.Array]:
    """Images [N, H, W, in_channels] in [-1, 1] -> the posterior's (mean, log-variance), each
    [N, H/f, W/f, latent_channels], float32, the log-variance clipped to [-30, 20] as diffusers does."""
    chex.assert_rank(images, 4)
    if images.shape[-1] != self.in_channels:
      raise ValueError(f"the VAE encodes NHWC images with {self.in_channels} channels; got shape {images.shape} "
                       "(NCHW input needs a transpose(0, 2, 3, 1)).")
    moments = self.encoder(images)
    if self.quant_conv is not None:
      moments = self.quant_conv(moments)
    mean, logvar = jnp.split(moments.astype(jnp.float32), 2, axis=-1)
    return mean, jnp.clip(logvar, *LOGVAR_RANGE)

  def decode_latents(self, latents) -> jax.Array:
    """Unscaled latents [N, h, w, latent_channels] -> images [N, h*f, w*f, out_channels], float32."""
    chex.assert_rank(latents, 4)
    if latents.shape[-1] != self.latent_channels:
      raise ValueError(f"the VAE decodes NHWC latents with {self.latent_channels} channels; got shape "
                       f"{latents.shape}.")
    z = latents.astype(self.dtype)
    if self.post_quant_conv is not None:
      z = self.post_quant_conv(z)
    return self.decoder(z).astype(jnp.float32)

  def __call__(self, images):
    """decode(posterior mean): the reconstruction, and the call `init` traces to create every parameter."""
    mean, _ = self.encode_moments(images)
    return self.decode_latents(mean)

"""EDM2's magnitude-preserving U-Net (Karras et al. 2024, "Analyzing and Improving the Training Dynamics
of Diffusion Models"), Flax, NHWC.

Written from the paper (Eqs. 47, 66, 75, 81, 88, 103 and Fig. 21) and the layer semantics of NVlabs/edm2
`training/networks_edm2.py`, so that a converted EDM2 checkpoint reproduces its outputs to float32
rounding. What makes it magnitude-preserving:
- every convolution and linear layer (`MPConv`) uses its weight normalised to unit RMS per output unit
  and scaled by gain / sqrt(fan_in), so the stored weight's norm never reaches the output. EDM2 also
  re-normalises the *stored* weight at every training step ("forced weight normalisation", which keeps
  Adam's effective step size constant); flax parameters are immutable, so simjax does that in the
  optimizer (`forced_weight_normalization`, an optax transform);
- SiLU divided by 0.596, sums and concatenations rescaled to unit variance (`mp_sum`, `mp_cat`), pixel
  norm after the encoder's skips and on attention's q, k, v, activations clipped at +-256;
- the noise embedding is cosine features of fixed random frequencies and phases (buffers in EDM2;
  simjax keeps them in the architecture dict, as it does NCSN++'s frequencies);
- learned scalar gains, both 0 at initialisation: per block `emb_gain` (how much the embedding modulates
  the residual branch) and `out_gain` (so a fresh network outputs 0).

The layout (names, channels, attention, skip order) is DhariwalUNet's with one extra input channel of
ones. The preconditioner, with EDM2's uncertainty head, is `simjax.networks.precond.EDM2Precond`.

Parameter paths mirror EDM2's names: torch `unet.enc.64x64_block0.conv_res0.weight` (OIHW) is flax
`params['unet']['enc']['64x64_block0']['conv_res0']['kernel']` (HWIO), `unet.enc.64x64_block0.emb_gain` is
`params['unet']['enc']['64x64_block0']['emb_gain']`, `unet.emb_noise.weight` ([out, in]) is
`params['unet']['emb_noise']['kernel']` ([in, out]).
"""
import dataclasses
import math
from typing import Any, NamedTuple, Optional, Sequence, Tuple

import flax.linen as nn
import flax.traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import optax

from simjax.networks.dhariwalunet import dhariwal_unet_layout
from simjax.networks.songunet import (LayerSpec, check_images, class_labels_of, conv_nhwc, downsample_2x,
                                      train_dropout, upsample_2x)

Dtype = Any
Precision = Any

MP_SILU_SCALE = 0.596  # sqrt(E[silu(x)^2]) for x ~ N(0, 1): EDM2 Eq. 81
CLIP_ACT = 256.0


def mp_normalize(x, axes: Sequence[int], eps: float = 1e-4):
  """x / (eps + rms(x over `axes`)), the rms in float32: unit magnitude along `axes` (EDM2's `normalize`)."""
  axes = tuple(a % x.ndim for a in axes)
  size = math.prod(x.shape[a] for a in axes)
  norm = jnp.sqrt(jnp.sum(jnp.square(x.astype(jnp.float32)), axis=axes, keepdims=True))
  return x / (eps + norm / np.sqrt(size)).astype(x.dtype)


def mp_silu(x):
  return nn.silu(x) / MP_SILU_SCALE


def mp_sum(a, b, t: float = 0.5):
  """(1 - t) a + t b rescaled so that two unit-variance inputs give a unit-variance output (Eq. 88)."""
  return (a + t * (b - a)) / np.sqrt((1 - t)**2 + t**2)


def mp_cat(a, b, t: float = 0.5):
  """Channel concatenation [a, b] weighted (1 - t, t) with unit total magnitude (Eq. 103)."""
  na, nb = a.shape[-1], b.shape[-1]
  scale = np.sqrt((na + nb) / ((1 - t)**2 + t**2))
  return jnp.concatenate([a * (scale / np.sqrt(na) * (1 - t)), b * (scale / np.sqrt(nb) * t)], axis=-1)


def mp_fourier(x, freqs, phases):
  """sqrt(2) cos(x freqs + phases) of x [N] -> [N, len(freqs)], float32 (EDM2's `MPFourier`, Eq. 75)."""
  y = jnp.outer(jnp.asarray(x, jnp.float32).reshape(-1), jnp.asarray(freqs, jnp.float32))
  return jnp.cos(y + jnp.asarray(phases, jnp.float32)) * np.sqrt(2)


class FourierBuffers(NamedTuple):
  freqs: Tuple[float, ...]
  phases: Tuple[float, ...]


def default_fourier_buffers(num_channels: int, seed: int, bandwidth: float = 1.0) -> FourierBuffers:
  """Deterministic stand-in for EDM2's `2 pi randn * bandwidth` frequencies and `2 pi rand` phases (fresh
  networks only; converted checkpoints carry their own)."""
  rng = np.random.default_rng(seed)
  freqs = 2 * np.pi * rng.standard_normal(num_channels).astype(np.float32) * bandwidth
  phases = 2 * np.pi * rng.random(num_channels).astype(np.float32)
  return FourierBuffers(tuple(float(v) for v in freqs), tuple(float(v) for v in phases))


def fourier_buffers(freqs, phases, num_channels: int, seed: int, what: str) -> FourierBuffers:
  """The given buffers, checked against `num_channels`, or the deterministic defaults when both are None."""
  if freqs is None and phases is None:
    return default_fourier_buffers(num_channels, seed)
  if freqs is None or phases is None or len(freqs) != num_channels or len(phases) != num_channels:
    raise ValueError(f"{what} needs {num_channels} frequencies and {num_channels} phases, got "
                     f"{None if freqs is None else len(freqs)} and {None if phases is None else len(phases)}; "
                     "take both from the checkpoint or leave both unset.")
  return FourierBuffers(tuple(freqs), tuple(phases))


class MPConv(nn.Module):
  """Magnitude-preserving convolution (kernel_size > 0, 'same' padding) or linear layer (kernel_size 0):
  weight normalised per output unit, times gain / sqrt(fan_in) (Eqs. 47, 66). Kernel HWIO or [in, out],
  initialised N(0, 1) as EDM2's."""
  features: int
  kernel_size: int = 0
  dtype: Dtype = jnp.float32
  precision: Precision = None

  @nn.compact
  def __call__(self, x, gain=1.0):
    k = self.kernel_size
    shape = (k, k, x.shape[-1], self.features) if k else (x.shape[-1], self.features)
    w = self.param("kernel", nn.initializers.normal(1.0), shape)
    fan_in = math.prod(shape[:-1])
    w = mp_normalize(w.astype(jnp.float32), range(w.ndim - 1)) * (gain / np.sqrt(fan_in))
    w = w.astype(x.dtype)
    if not k:
      return jnp.dot(x, w, precision=self.precision)
    return conv_nhwc(x, w, padding=k // 2, precision=self.precision)


def weight_normalized(params):
  """`params` with every MPConv kernel (a leaf named 'kernel' of an EDM2 network) normalised per output unit."""
  flat = flax.traverse_util.flatten_dict(params)
  out = {path: (mp_normalize(leaf, range(leaf.ndim - 1)).astype(leaf.dtype) if path[-1] == "kernel" else leaf)
         for path, leaf in flat.items()}
  return flax.traverse_util.unflatten_dict(out)


def forced_weight_normalization() -> optax.GradientTransformation:
  """Chained after the optimizer: updates such that every kernel leaves the step with unit RMS per output
  unit, EDM2's forced weight normalisation (Eq. 66) done functionally. Put it last in an optax chain of
  an EDM2 network's parameters only (it normalises every leaf named 'kernel')."""

  def init_fn(params):
    del params
    return optax.EmptyState()

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError("forced_weight_normalization needs the parameters: call update(updates, state, params).")
    new = weight_normalized(jax.tree.map(lambda p, u: p + u, params, updates))
    return jax.tree.map(lambda n, p: n - p, new, params), state

  return optax.GradientTransformation(init_fn, update_fn)


@dataclasses.dataclass(frozen=True)
class EDM2BlockConfig:
  """What every EDM2Block of a network shares (EDM2's `block_kwargs`), and the remat switch."""
  resample_filter: Tuple[int, ...] = (1, 1)
  channels_per_head: int = 64
  dropout: float = 0.0
  res_balance: float = 0.3
  attn_balance: float = 0.3
  clip_act: Optional[float] = CLIP_ACT
  dtype: Dtype = jnp.float32
  precision: Precision = None
  remat: bool = False

  def block(self, spec: LayerSpec, flavor: str) -> "EDM2Block":
    cls = nn.remat(EDM2Block, static_argnums=(3,)) if self.remat else EDM2Block  # arg 3 = train (self is 0)
    return cls(spec.out_channels, flavor, "down" if spec.down else "up" if spec.up else "keep", spec.attention,
               self, name=spec.name)


class EDM2Block(nn.Module):
  """EDM2's encoder ('enc') or decoder ('dec') block (Fig. 21): resample, (enc: 1x1 skip projection and pixel
  norm), residual branch conv(silu) modulated by the embedding, mp_sum, optional self-attention, clip."""
  out_channels: int
  flavor: str = "enc"
  resample_mode: str = "keep"  # keep | up | down
  attention: bool = False
  config: EDM2BlockConfig = EDM2BlockConfig()

  @nn.compact
  def __call__(self, x, emb, train: bool = False):
    cfg = self.config
    conv = lambda features, kernel, name: MPConv(features, kernel, cfg.dtype, cfg.precision, name=name)
    out = self.out_channels
    needs_skip = x.shape[-1] != out
    pad = (len(cfg.resample_filter) - 1) // 2
    if self.resample_mode == "down":
      x = downsample_2x(x, cfg.resample_filter, pad)
    elif self.resample_mode == "up":
      x = upsample_2x(x, cfg.resample_filter, pad)
    if self.flavor == "enc":
      if needs_skip:
        x = conv(out, 1, "conv_skip")(x)
      x = mp_normalize(x, (-1,))  # pixel norm

    y = conv(out, 3, "conv_res0")(mp_silu(x))
    emb_gain = self.param("emb_gain", nn.initializers.zeros, ())
    c = conv(out, 0, "emb_linear")(emb, gain=emb_gain) + 1
    y = mp_silu(y * c[:, None, None, :].astype(y.dtype))
    y = conv(out, 3, "conv_res1")(train_dropout(self, y, cfg.dropout, train))
    if self.flavor == "dec" and needs_skip:
      x = conv(out, 1, "conv_skip")(x)
    x = mp_sum(x, y, cfg.res_balance)

    num_heads = out // cfg.channels_per_head if self.attention else 0
    if num_heads:
      n, h, w, _ = x.shape
      qkv = conv(3 * out, 1, "attn_qkv")(x).reshape(n, h * w, num_heads, out // num_heads, 3)
      qkv = mp_normalize(qkv, (3,))  # pixel norm per head
      q, k, v = qkv[..., 0], qkv[..., 1], qkv[..., 2]
      logits = jnp.einsum("nqhc,nkhc->nhqk", q, k / np.sqrt(q.shape[-1]), precision=cfg.precision)
      weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(v.dtype)
      y = jnp.einsum("nhqk,nkhc->nqhc", weights, v, precision=cfg.precision).reshape(n, h, w, out)
      x = mp_sum(x, conv(out, 1, "attn_proj")(y), cfg.attn_balance)
    if cfg.clip_act is not None:
      x = jnp.clip(x, -cfg.clip_act, cfg.clip_act)
    return x


class EDM2Encoder(nn.Module):
  """EDM2's `enc` ModuleDict: the first MPConv, then blocks; returns the bottleneck and the skip stack."""
  layers: Tuple[LayerSpec, ...]
  config: EDM2BlockConfig

  @nn.compact
  def __call__(self, x, emb, train):
    skips = []
    for spec in self.layers:
      if spec.kind == "conv":
        x = MPConv(spec.out_channels, 3, self.config.dtype, self.config.precision, name=spec.name)(x)
      else:
        x = self.config.block(spec, "enc")(x, emb, train)
      skips.append(x)
    return x, skips


class EDM2Decoder(nn.Module):
  """EDM2's `dec` ModuleDict: blocks, each decoder block after mp_cat with the next skip."""
  layers: Tuple[LayerSpec, ...]
  config: EDM2BlockConfig
  concat_balance: float = 0.5

  @nn.compact
  def __call__(self, x, skips, emb, train):
    skips = list(skips)
    for spec in self.layers:
      if spec.concat_skip:
        x = mp_cat(x, skips.pop().astype(x.dtype), self.concat_balance)
      x = self.config.block(spec, "dec")(x, emb, train)
    return x


class EDM2UNet(nn.Module):
  """EDM2's U-Net. Field names and defaults are EDM2's constructor arguments (UNet's and its Block's);
  the defaults are the ImageNet-512 S network but for model_channels, which every preset sets.

  `__call__(x, noise_labels, class_labels=None, augment_labels=None, train=False)`: x NHWC [N, R, R, C],
  noise_labels [N] (the preconditioner's c_noise); returns F(x) [N, R, R, out_channels] in `dtype`. With
  return_logits=True also the encoder's bottleneck averaged over channels, [N, R', R'] float32 (SiDA's
  discriminator head, as the other UNets). `label_dropout` (simjax's, 0 in EDM2) zeroes class labels
  in training for classifier-free guidance.
  """
  img_resolution: int
  in_channels: int
  out_channels: int
  label_dim: int = 0
  model_channels: int = 192
  channel_mult: Tuple[int, ...] = (1, 2, 3, 4)
  channel_mult_noise: Optional[int] = None
  channel_mult_emb: Optional[int] = None
  num_blocks: int = 3
  attn_resolutions: Tuple[int, ...] = (16, 8)
  label_balance: float = 0.5
  concat_balance: float = 0.5
  resample_filter: Tuple[int, ...] = (1, 1)
  channels_per_head: int = 64
  dropout: float = 0.0
  res_balance: float = 0.3
  attn_balance: float = 0.3
  clip_act: Optional[float] = CLIP_ACT
  label_dropout: float = 0.0
  emb_fourier_freqs: Optional[Tuple[float, ...]] = None  # EDM2 buffer unet.emb_fourier.freqs
  emb_fourier_phases: Optional[Tuple[float, ...]] = None  # EDM2 buffer unet.emb_fourier.phases
  dtype: Dtype = jnp.float32
  precision: Precision = None
  remat_blocks: bool = False

  @property
  def noise_channels(self) -> int:
    mult = self.channel_mult_noise if self.channel_mult_noise is not None else self.channel_mult[0]
    return self.model_channels * mult

  @property
  def emb_channels(self) -> int:
    mult = self.channel_mult_emb if self.channel_mult_emb is not None else max(self.channel_mult)
    return self.model_channels * mult

  @nn.compact
  def __call__(self, x, noise_labels, class_labels=None, augment_labels=None, train: bool = False,
               return_logits: bool = False):
    if augment_labels is not None:
      raise ValueError("EDM2's U-Net has no augmentation conditioning; set augment_dim 0 (no augment_labels).")
    if self.img_resolution % (1 << (len(self.channel_mult) - 1)):
      raise ValueError(f"img_resolution {self.img_resolution} is not divisible by 2^{len(self.channel_mult) - 1}; "
                       "use fewer channel_mult levels or another resolution.")
    check_images("EDM2UNet", x, self.img_resolution, self.in_channels)
    buffers = fourier_buffers(self.emb_fourier_freqs, self.emb_fourier_phases, self.noise_channels, seed=0,
                              what="EDM2UNet's noise embedding")

    # Embedding (float32, as EDM2's: the noise labels and class labels arrive in float32).
    noise_labels = jnp.broadcast_to(jnp.asarray(noise_labels, jnp.float32).reshape(-1), x.shape[:1])
    emb = MPConv(self.emb_channels, 0, jnp.float32, self.precision, name="emb_noise")(
        mp_fourier(noise_labels, buffers.freqs, buffers.phases))
    if self.label_dim:
      labels = class_labels_of(self, "EDM2UNet", class_labels, x.shape[0], train)
      label_emb = MPConv(self.emb_channels, 0, jnp.float32, self.precision, name="emb_label")(
          labels * np.sqrt(self.label_dim))
      emb = mp_sum(emb, label_emb, self.label_balance)
    emb = mp_silu(emb)

    enc_layers, dec_layers = dhariwal_unet_layout(
        self.img_resolution, self.in_channels + 1, self.model_channels, tuple(self.channel_mult), self.num_blocks,
        tuple(self.attn_resolutions))
    config = EDM2BlockConfig(tuple(self.resample_filter), self.channels_per_head, self.dropout, self.res_balance,
                             self.attn_balance, self.clip_act, self.dtype, self.precision, self.remat_blocks)
    x = x.astype(self.dtype)
    x = jnp.concatenate([x, jnp.ones_like(x[..., :1])], axis=-1)  # EDM2's constant input channel
    x, skips = EDM2Encoder(enc_layers, config, name="enc")(x, emb, train)
    bottleneck = x
    x = EDM2Decoder(dec_layers, config, self.concat_balance, name="dec")(x, skips, emb, train)
    out_gain = self.param("out_gain", nn.initializers.zeros, ())
    out = MPConv(self.out_channels, 3, self.dtype, self.precision, name="out_conv")(x, gain=out_gain)
    if return_logits:
      return out, jnp.mean(bottleneck.astype(jnp.float32), axis=-1)
    return out

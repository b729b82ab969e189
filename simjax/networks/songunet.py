"""EDM's SongUNet family (DDPM++ / NCSN++) as one parameterised Flax module, NHWC.

Re-implements the architecture of Karras et al. 2022 ("Elucidating the Design Space of
Diffusion-Based Generative Models", Appendix F.2 and NVlabs/edm `training/networks.py`), which in
turn re-implements DDPM++ and NCSN++ of Song et al. 2021 ("Score-Based Generative Modeling through
Stochastic Differential Equations"). Written from the description and the layer semantics, so that
a converted EDM checkpoint reproduces EDM's outputs to float32 rounding.

Parameter paths mirror EDM's PyTorch module names, e.g. torch `model.enc.8x8_block0.conv0.weight`
is flax `params['model']['enc']['8x8_block0']['conv0']['kernel']`. Conventions:
- Conv kernels are HWIO (torch OIHW transposed by (2, 3, 1, 0)); `bias` keeps its name.
- Linear kernels are [in, out] (torch [out, in] transposed).
- GroupNorm weight/bias are flax `scale`/`bias`.
- EDM's buffers are not parameters: resampling filters are constants computed from
  `resample_filter`; the random Fourier frequencies of NCSN++ are the module attribute
  `fourier_freqs` (a tuple of floats, taken from a converted checkpoint), so `apply` needs only
  `{'params': params}` for every network of the family.

Images are NHWC. `dtype` is the compute dtype of the convolutions and attention (parameters stay
float32); the noise/label embedding MLP and normalisation statistics always run in float32, as in
EDM's mixed-precision path.
"""
import dataclasses
from typing import Any, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from simjax import draws
from simjax import xla_cpu

Dtype = Any
Precision = Any

EMBEDDING_TYPES = ("positional", "fourier")
ENCODER_TYPES = ("standard", "skip", "residual")
DECODER_TYPES = ("standard", "skip")
FOURIER_SCALE = 16.0  # EDM's FourierEmbedding(scale=16).


# ----------------------------------------------------------------------------------------------
# Initialisers: EDM's `weight_init(shape, mode, fan_in, fan_out) * init_weight`.


def edm_initializer(mode: str, fan_in: int, fan_out: int, gain: float = 1.0):
  """Returns a flax initializer drawing EDM's init `mode` scaled by `gain` (init_weight/bias)."""
  if mode == "xavier_uniform":
    make = lambda key, shape: np.sqrt(6 / (fan_in + fan_out)) * draws.uniform(key, shape, jnp.float32, -1.0, 1.0)
  elif mode == "xavier_normal":
    make = lambda key, shape: np.sqrt(2 / (fan_in + fan_out)) * draws.normal(key, shape, jnp.float32)
  elif mode == "kaiming_uniform":
    make = lambda key, shape: np.sqrt(3 / fan_in) * draws.uniform(key, shape, jnp.float32, -1.0, 1.0)
  elif mode == "kaiming_normal":
    make = lambda key, shape: np.sqrt(1 / fan_in) * draws.normal(key, shape, jnp.float32)
  else:
    raise ValueError(f"unknown init mode {mode!r}; use xavier_uniform, xavier_normal, kaiming_uniform or kaiming_normal.")

  def init(key, shape, dtype=jnp.float32):
    if gain == 0:
      return jnp.zeros(shape, dtype)
    return (make(key, shape) * gain).astype(dtype)

  return init


# ----------------------------------------------------------------------------------------------
# Layers.


def resample_kernel_2d(resample_filter: Sequence[float]) -> np.ndarray:
  """EDM's separable resampling filter: outer(f, f) / sum(f)^2, float32 [K, K]."""
  f = np.asarray(resample_filter, np.float32)
  return np.outer(f, f) / np.square(f.sum())


def conv_nhwc(x, w, *, padding=0, precision=None):
  """NHWC x HWIO stride-1 convolution with symmetric integer padding (torch.nn.functional.conv2d)."""
  return jax.lax.conv_general_dilated(
      x, w, window_strides=(1, 1), padding=((padding, padding), (padding, padding)),
      dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=precision)


def _depthwise_resample(x, kernel, **conv_kwargs):
  """x convolved per channel with the 2-D `kernel` (torch groups=C), in float32 (as XLA:CPU's form sums)."""
  channels = x.shape[-1]
  k = jnp.broadcast_to(jnp.asarray(kernel, jnp.float32)[:, :, None, None], kernel.shape + (1, channels))
  y = jax.lax.conv_general_dilated(x.astype(jnp.float32), k, dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                   feature_group_count=channels, precision=jax.lax.Precision.HIGHEST, **conv_kwargs)
  return y.astype(x.dtype)


def upsample_2x(x, resample_filter, padding):
  """EDM's conv_transpose2d(x, 4 outer(f, f), groups=C, stride=2, padding), f = filter / sum(filter).

  On accelerators a depthwise transposed convolution; on XLA:CPU the same sums as slices
  (simjax/xla_cpu.py)."""
  if xla_cpu.in_use():
    return xla_cpu.upsample_2x(x, resample_filter, padding)
  kernel = 4.0 * resample_kernel_2d(resample_filter)
  k = kernel.shape[0]
  edge = (k - 1 - padding, k - 1 - padding)
  return _depthwise_resample(x, kernel[::-1, ::-1], window_strides=(1, 1), padding=(edge, edge), lhs_dilation=(2, 2))


def downsample_2x(x, resample_filter, padding):
  """EDM's conv2d(x, outer(f, f), groups=C, stride=2, padding): on accelerators a depthwise strided
  convolution; on XLA:CPU the same sums as slices (simjax/xla_cpu.py)."""
  if xla_cpu.in_use():
    return xla_cpu.downsample_2x(x, resample_filter, padding)
  return _depthwise_resample(x, resample_kernel_2d(resample_filter), window_strides=(2, 2),
                             padding=((padding, padding), (padding, padding)))


class EDMLinear(nn.Module):
  """Fully connected layer; kernel [in, out] (EDM's `Linear`)."""
  features: int
  use_bias: bool = True
  init_mode: str = "kaiming_normal"
  init_weight: float = 1.0
  init_bias: float = 0.0
  precision: Precision = None

  @nn.compact
  def __call__(self, x):
    fan_in = x.shape[-1]
    kernel = self.param("kernel", edm_initializer(self.init_mode, fan_in, self.features, self.init_weight),
                        (fan_in, self.features))
    y = jnp.dot(x, kernel.astype(x.dtype), precision=self.precision)
    if self.use_bias:
      bias = self.param("bias", edm_initializer(self.init_mode, fan_in, self.features, self.init_bias), (self.features,))
      y = y + bias.astype(x.dtype)
    return y


class EDMConv2d(nn.Module):
  """EDM's `Conv2d`: optional 2x up/down resampling by an FIR filter, then a k x k convolution.

  kernel=0 gives a pure resampling layer without parameters. With `fused_resample` the filter is
  applied on the cheaper side of the convolution (after it when downsampling, before when
  upsampling), with the padding EDM uses for that order.
  """
  out_channels: int
  kernel: int
  use_bias: bool = True
  up: bool = False
  down: bool = False
  resample_filter: Tuple[int, ...] = (1, 1)
  fused_resample: bool = False
  init_mode: str = "kaiming_normal"
  init_weight: float = 1.0
  init_bias: float = 0.0
  dtype: Dtype = jnp.float32
  precision: Precision = None

  @nn.compact
  def __call__(self, x):
    if self.up and self.down:
      raise ValueError("EDMConv2d cannot both upsample and downsample; set only one of up/down.")
    in_channels, k = x.shape[-1], self.kernel
    fan_in, fan_out = in_channels * k * k, self.out_channels * k * k
    w = b = None
    if k:
      w = self.param("kernel", edm_initializer(self.init_mode, fan_in, fan_out, self.init_weight),
                     (k, k, in_channels, self.out_channels)).astype(self.dtype)
      if self.use_bias:
        b = self.param("bias", edm_initializer(self.init_mode, fan_in, fan_out, self.init_bias),
                       (self.out_channels,)).astype(self.dtype)
    x = x.astype(self.dtype)
    f = tuple(self.resample_filter)
    w_pad = k // 2
    f_pad = (len(f) - 1) // 2 if (self.up or self.down) else 0

    if self.fused_resample and self.up and w is not None:
      x = upsample_2x(x, f, max(f_pad - w_pad, 0))
      x = conv_nhwc(x, w, padding=max(w_pad - f_pad, 0), precision=self.precision)
    elif self.fused_resample and self.down and w is not None:
      x = conv_nhwc(x, w, padding=w_pad + f_pad, precision=self.precision)
      x = downsample_2x(x, f, 0)
    else:
      if self.up:
        x = upsample_2x(x, f, f_pad)
      if self.down:
        x = downsample_2x(x, f, f_pad)
      if w is not None:
        x = conv_nhwc(x, w, padding=w_pad, precision=self.precision)
    if b is not None:
      x = x + b
    return x


def group_norm_groups(num_channels: int, num_groups: int = 32, min_channels_per_group: int = 4) -> int:
  """EDM's rule: at most `num_groups` groups, each holding at least `min_channels_per_group`."""
  return min(num_groups, num_channels // min_channels_per_group)


class EDMGroupNorm(nn.Module):
  """Group normalisation with EDM's group rule; statistics in float32, biased variance.

  Written for XLA:CPU speed without changing the maths: statistics are per-channel spatial sums
  ([N, C], a cheap reduction over the leading axes) then summed over each group's channels; the
  variance is two-pass (sum of squared deviations, as accurate as torch's), and the output is one
  fused multiply-add with per-(sample, channel) coefficients. Reducing a [N, H, W, G, C/G] view over
  three axes instead is 3-6x slower forward+backward on XLA:CPU.
  """
  num_groups: int = 32
  min_channels_per_group: int = 4
  eps: float = 1e-5
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    channels = x.shape[-1]
    groups = group_norm_groups(channels, self.num_groups, self.min_channels_per_group)
    if groups < 1 or channels % groups:
      raise ValueError(f"GroupNorm cannot split {channels} channels into groups of >= {self.min_channels_per_group}; "
                       "use a channel count divisible by the group count.")
    scale = self.param("scale", nn.initializers.ones, (channels,))
    bias = self.param("bias", nn.initializers.zeros, (channels,))
    x = x.astype(jnp.float32)
    spatial_axes = tuple(range(1, x.ndim - 1))
    count = channels // groups * int(np.prod([x.shape[a] for a in spatial_axes]))
    stat_shape = (x.shape[0],) + (1,) * len(spatial_axes) + (channels,)

    def group_mean_per_channel(values):
      """Mean over each group's positions and channels, broadcast back to [N, 1.., C]."""
      sums = values.sum(axis=spatial_axes).reshape(x.shape[0], groups, channels // groups).sum(-1, keepdims=True)
      return jnp.broadcast_to(sums / count, (x.shape[0], groups, channels // groups)).reshape(stat_shape)

    centred = x - group_mean_per_channel(x)
    inv_std = jax.lax.rsqrt(group_mean_per_channel(jnp.square(centred)) + self.eps)
    return (centred * (inv_std * scale) + bias).astype(self.dtype)


@dataclasses.dataclass(frozen=True)
class UNetBlockConfig:
  """Hyper-parameters shared by every UNetBlock of a network (EDM's `block_kwargs`)."""
  dropout: float = 0.0
  skip_scale: float = 1.0
  eps: float = 1e-5
  resample_filter: Tuple[int, ...] = (1, 1)
  resample_proj: bool = False
  adaptive_scale: bool = True
  num_heads: Optional[int] = None
  channels_per_head: int = 64
  init_mode: str = "kaiming_normal"
  init_weight: float = 1.0
  init_bias: float = 0.0  # bias gain of the non-zero-initialised layers (ADM: sqrt(1/3))
  init_zero_weight: float = 0.0
  init_attn_weight: Optional[float] = None  # None: same as init_weight.
  dtype: Dtype = jnp.float32
  precision: Precision = None


def train_dropout(module: nn.Module, x, rate: float, train: bool):
  """Dropout at `rate` from the module's 'dropout' rng in training; the identity otherwise."""
  if not train or rate == 0:
    return x
  keep = draws.bernoulli(module.make_rng("dropout"), 1.0 - rate, x.shape)
  return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


class UNetBlock(nn.Module):
  """EDM's unified residual block (DDPM++/NCSN++/ADM), optional resampling and self-attention.

  x -> conv0(silu(norm0 x)) -> (+ affine(emb), or adaptive scale/shift) -> silu -> dropout -> conv1,
  plus a (resampled / projected) skip, times skip_scale; then optional single-scale attention
  with a 1x1 qkv convolution, residual, times skip_scale.
  """
  out_channels: int
  config: UNetBlockConfig
  up: bool = False
  down: bool = False
  attention: bool = False

  @nn.compact
  def __call__(self, x, emb, train: bool = False):
    cfg = self.config
    in_channels, out_channels = x.shape[-1], self.out_channels
    conv = lambda name, out, kernel, gain, bias_gain=0.0, **kw: EDMConv2d(
        out, kernel, init_mode=cfg.init_mode, init_weight=gain, init_bias=bias_gain,
        resample_filter=cfg.resample_filter, dtype=cfg.dtype, precision=cfg.precision, name=name, **kw)
    norm = lambda name: EDMGroupNorm(eps=cfg.eps, dtype=cfg.dtype, name=name)

    orig = x
    x = conv("conv0", out_channels, 3, cfg.init_weight, cfg.init_bias, up=self.up,
             down=self.down)(nn.silu(norm("norm0")(x)))
    params = EDMLinear(out_channels * (2 if cfg.adaptive_scale else 1), init_mode=cfg.init_mode,
                       init_weight=cfg.init_weight, init_bias=cfg.init_bias, precision=cfg.precision,
                       name="affine")(emb)
    params = params[:, None, None, :].astype(x.dtype)
    if cfg.adaptive_scale:
      scale, shift = jnp.split(params, 2, axis=-1)
      x = nn.silu(shift + norm("norm1")(x) * (scale + 1))
    else:
      x = nn.silu(norm("norm1")(x + params))
    x = conv("conv1", out_channels, 3, cfg.init_zero_weight)(train_dropout(self, x, cfg.dropout, train))

    if out_channels != in_channels or self.up or self.down:
      kernel = 1 if (cfg.resample_proj or out_channels != in_channels) else 0
      orig = conv("skip", out_channels, kernel, cfg.init_weight, cfg.init_bias, up=self.up, down=self.down)(orig)
    x = (x + orig.astype(x.dtype)) * cfg.skip_scale

    num_heads = 0
    if self.attention:
      num_heads = cfg.num_heads if cfg.num_heads is not None else out_channels // cfg.channels_per_head
    if num_heads:
      attn_gain = cfg.init_attn_weight if cfg.init_attn_weight is not None else cfg.init_weight
      qkv = conv("qkv", out_channels * 3, 1, attn_gain, cfg.init_bias)(norm("norm2")(x))
      n, h, w, c = x.shape
      # EDM reshapes the 3C channels as [heads, C/heads, 3]: q, k, v are interleaved channels.
      qkv = qkv.reshape(n, h * w, num_heads, c // num_heads, 3)
      q, k, v = qkv[..., 0], qkv[..., 1], qkv[..., 2]
      k = k / np.sqrt(k.shape[-1])
      logits = jnp.einsum("nqhc,nkhc->nhqk", q.astype(jnp.float32), k.astype(jnp.float32), precision=cfg.precision)
      weights = jax.nn.softmax(logits, axis=-1).astype(x.dtype)
      a = jnp.einsum("nhqk,nkhc->nqhc", weights, v, precision=cfg.precision).reshape(n, h, w, c)
      x = (conv("proj", out_channels, 1, cfg.init_zero_weight)(a) + x) * cfg.skip_scale
    return x


def check_images(net: str, x, img_resolution: int, in_channels: int):
  """EDM's UNets take NHWC [N, R, R, C]: anything else is refused with the fix."""
  expected = (img_resolution, img_resolution, in_channels)
  if x.ndim != 4 or tuple(x.shape[1:]) != expected:
    raise ValueError(f"{net} expects NHWC images [N, {expected[0]}, {expected[1]}, {expected[2]}], "
                     f"got shape {tuple(x.shape)}; transpose NCHW inputs with x.transpose(0, 2, 3, 1).")


def class_labels_of(module: nn.Module, net: str, class_labels, batch: int, train: bool):
  """A class-conditional UNet's one-hot labels as float32, each dropped (zeroed) with probability
  module.label_dropout in training (classifier-free guidance), from the 'dropout' rng."""
  if class_labels is None:
    raise ValueError(f"this {net} is class-conditional (label_dim={module.label_dim}); pass one-hot class_labels.")
  labels = jnp.asarray(class_labels, jnp.float32)
  if train and module.label_dropout:
    keep = jax.random.uniform(module.make_rng("dropout"), (batch, 1)) >= module.label_dropout
    labels = labels * keep.astype(labels.dtype)
  return labels


def positional_embedding(x, num_channels: int, max_positions: int = 10000, endpoint: bool = False):
  """Transformer sinusoids of x [N] -> [N, num_channels] as [cos, sin] (EDM `PositionalEmbedding`)."""
  half = num_channels // 2
  freqs = jnp.arange(half, dtype=jnp.float32) / (half - (1 if endpoint else 0))
  freqs = (1.0 / max_positions)**freqs
  x = jnp.outer(x.astype(jnp.float32), freqs)
  return jnp.concatenate([jnp.cos(x), jnp.sin(x)], axis=1)


def fourier_embedding(x, freqs):
  """Random Fourier features of x [N] -> [N, 2 len(freqs)] as [cos, sin] (EDM `FourierEmbedding`)."""
  x = jnp.outer(x.astype(jnp.float32), (2 * np.pi * jnp.asarray(freqs, jnp.float32)))
  return jnp.concatenate([jnp.cos(x), jnp.sin(x)], axis=1)


def default_fourier_freqs(noise_channels: int, seed: int = 0) -> Tuple[float, ...]:
  """Deterministic stand-in for EDM's `randn(noise_channels // 2) * 16` (fresh NCSN++ networks only;
  converted checkpoints carry their own frequencies)."""
  freqs = np.random.default_rng(seed).standard_normal(noise_channels // 2).astype(np.float32) * FOURIER_SCALE
  return tuple(float(v) for v in freqs)


# ----------------------------------------------------------------------------------------------
# SongUNet.


@dataclasses.dataclass(frozen=True)
class LayerSpec:
  """One entry of EDM's encoder/decoder ModuleDict, in forward order."""
  name: str
  kind: str  # conv | block | aux_down | aux_skip | aux_residual | aux_up | aux_norm | aux_conv
  in_channels: int
  out_channels: int
  up: bool = False
  down: bool = False
  attention: bool = False
  concat_skip: bool = False  # decoder blocks that first concatenate the next encoder skip.


def song_unet_layout(img_resolution: int, in_channels: int, out_channels: int, model_channels: int,
                     channel_mult: Sequence[int], num_blocks: int, attn_resolutions: Sequence[int],
                     encoder_type: str, decoder_type: str):
  """EDM's SongUNet encoder and decoder as ordered LayerSpec tuples (names are EDM's)."""
  enc = []
  cout = caux = in_channels
  for level, mult in enumerate(channel_mult):
    res = img_resolution >> level
    tag = f"{res}x{res}"
    if level == 0:
      cin, cout = cout, model_channels
      enc.append(LayerSpec(f"{tag}_conv", "conv", cin, cout))
    else:
      enc.append(LayerSpec(f"{tag}_down", "block", cout, cout, down=True))
      if encoder_type == "skip":
        enc.append(LayerSpec(f"{tag}_aux_down", "aux_down", caux, caux, down=True))
        enc.append(LayerSpec(f"{tag}_aux_skip", "aux_skip", caux, cout))
      if encoder_type == "residual":
        enc.append(LayerSpec(f"{tag}_aux_residual", "aux_residual", caux, cout, down=True))
        caux = cout
    for idx in range(num_blocks):
      cin, cout = cout, model_channels * mult
      enc.append(LayerSpec(f"{tag}_block{idx}", "block", cin, cout, attention=res in attn_resolutions))
  skips = [spec.out_channels for spec in enc if not spec.kind.startswith("aux")]

  dec = []
  for level, mult in reversed(list(enumerate(channel_mult))):
    res = img_resolution >> level
    tag = f"{res}x{res}"
    if level == len(channel_mult) - 1:
      dec.append(LayerSpec(f"{tag}_in0", "block", cout, cout, attention=True))
      dec.append(LayerSpec(f"{tag}_in1", "block", cout, cout))
    else:
      dec.append(LayerSpec(f"{tag}_up", "block", cout, cout, up=True))
    for idx in range(num_blocks + 1):
      cin, cout = cout + skips.pop(), model_channels * mult
      dec.append(LayerSpec(f"{tag}_block{idx}", "block", cin, cout,
                           attention=(idx == num_blocks and res in attn_resolutions), concat_skip=True))
    if decoder_type == "skip" or level == 0:
      if decoder_type == "skip" and level < len(channel_mult) - 1:
        dec.append(LayerSpec(f"{tag}_aux_up", "aux_up", out_channels, out_channels, up=True))
      dec.append(LayerSpec(f"{tag}_aux_norm", "aux_norm", cout, cout))
      dec.append(LayerSpec(f"{tag}_aux_conv", "aux_conv", cout, out_channels))
  return tuple(enc), tuple(dec)


def _block_class(remat: bool):
  """UNetBlock, or UNetBlock rematerialised: only its inputs are saved for the backward pass, its
  insides are recomputed block by block (same parameter paths, less activation memory)."""
  return nn.remat(UNetBlock, static_argnums=(3,)) if remat else UNetBlock  # arg 3 = train (self is 0)


class UNetEncoder(nn.Module):
  """EDM's `enc` ModuleDict (SongUNet's and DhariwalUNet's layouts): returns the bottleneck activation and
  the skip stack."""
  layers: Tuple[LayerSpec, ...]
  block: UNetBlockConfig
  remat_blocks: bool = False

  @nn.compact
  def __call__(self, x, emb, train):
    cfg = self.block
    conv = lambda spec, kernel, **kw: EDMConv2d(
        spec.out_channels, kernel, down=spec.down, resample_filter=cfg.resample_filter, init_mode=cfg.init_mode,
        init_weight=cfg.init_weight, init_bias=cfg.init_bias, dtype=cfg.dtype, precision=cfg.precision,
        name=spec.name, **kw)
    skips, aux = [], x
    for spec in self.layers:
      if spec.kind == "aux_down":
        aux = conv(spec, 0)(aux)
      elif spec.kind == "aux_skip":
        x = skips[-1] = x + conv(spec, 1)(aux)
      elif spec.kind == "aux_residual":
        x = skips[-1] = aux = (x + conv(spec, 3, fused_resample=True)(aux)) / np.sqrt(2)
      elif spec.kind == "conv":
        x = conv(spec, 3)(x)
        skips.append(x)
      else:
        x = _block_class(self.remat_blocks)(spec.out_channels, cfg, up=spec.up, down=spec.down,
                                            attention=spec.attention, name=spec.name)(x, emb, train)
        skips.append(x)
    return x, skips


class UNetDecoder(nn.Module):
  """EDM's `dec` ModuleDict (SongUNet's and DhariwalUNet's layouts): consumes the skip stack; returns the
  last block's activation (DhariwalUNet's output path) and `aux`, the output SongUNet's aux layers
  accumulate (None without them)."""
  layers: Tuple[LayerSpec, ...]
  block: UNetBlockConfig
  remat_blocks: bool = False

  @nn.compact
  def __call__(self, x, skips, emb, train):
    cfg = self.block
    skips = list(skips)
    aux = tmp = None
    for spec in self.layers:
      if spec.kind == "aux_up":
        aux = EDMConv2d(spec.out_channels, 0, up=True, resample_filter=cfg.resample_filter, dtype=cfg.dtype,
                        precision=cfg.precision, name=spec.name)(aux)
      elif spec.kind == "aux_norm":
        tmp = EDMGroupNorm(eps=1e-6, dtype=cfg.dtype, name=spec.name)(x)
      elif spec.kind == "aux_conv":
        tmp = EDMConv2d(spec.out_channels, 3, init_mode=cfg.init_mode, init_weight=cfg.init_zero_weight,
                        dtype=cfg.dtype, precision=cfg.precision, name=spec.name)(nn.silu(tmp))
        aux = tmp if aux is None else tmp + aux
      else:
        if spec.concat_skip:
          x = jnp.concatenate([x, skips.pop().astype(x.dtype)], axis=-1)
        x = _block_class(self.remat_blocks)(spec.out_channels, cfg, up=spec.up, down=spec.down,
                                            attention=spec.attention, name=spec.name)(x, emb, train)
    return x, aux


class SongUNet(nn.Module):
  """EDM's SongUNet: DDPM++ (positional, standard encoder, [1,1]) and NCSN++ (fourier, residual,
  [1,3,3,1]) as one module. Field names and defaults are EDM's constructor arguments.

  `__call__(x, noise_labels, class_labels=None, augment_labels=None, train=False)`: x NHWC
  [N, R, R, in_channels], noise_labels [N] (the preconditioner's c_noise); returns F(x) [N, R, R,
  out_channels] in `dtype`. Dropout and label dropout draw from the 'dropout' rng when train=True.
  With return_logits=True it returns (F(x), logits): the encoder's bottleneck averaged over channels,
  [N, R', R'] float32, SiDA's discriminator on the network's own encoder (no added parameters).
  """
  img_resolution: int
  in_channels: int
  out_channels: int
  label_dim: int = 0
  augment_dim: int = 0
  model_channels: int = 128
  channel_mult: Tuple[int, ...] = (1, 2, 2, 2)
  channel_mult_emb: int = 4
  num_blocks: int = 4
  attn_resolutions: Tuple[int, ...] = (16,)
  dropout: float = 0.10
  label_dropout: float = 0.0
  embedding_type: str = "positional"
  channel_mult_noise: int = 1
  encoder_type: str = "standard"
  decoder_type: str = "standard"
  resample_filter: Tuple[int, ...] = (1, 1)
  # NCSN++'s random Fourier frequencies (EDM buffer `map_noise.freqs`); None: default_fourier_freqs.
  fourier_freqs: Optional[Tuple[float, ...]] = None
  dtype: Dtype = jnp.float32
  precision: Precision = None
  remat_blocks: bool = False  # rematerialise each UNetBlock in the backward pass (memory for compute)

  def _check(self):
    if self.embedding_type not in EMBEDDING_TYPES:
      raise ValueError(f"embedding_type={self.embedding_type!r}; use one of {EMBEDDING_TYPES}.")
    if self.encoder_type not in ENCODER_TYPES:
      raise ValueError(f"encoder_type={self.encoder_type!r}; use one of {ENCODER_TYPES}.")
    if self.decoder_type not in DECODER_TYPES:
      raise ValueError(f"decoder_type={self.decoder_type!r}; use one of {DECODER_TYPES}.")
    if self.img_resolution % (1 << (len(self.channel_mult) - 1)):
      raise ValueError(f"img_resolution {self.img_resolution} is not divisible by 2^{len(self.channel_mult) - 1}; "
                       "use fewer channel_mult levels or another resolution.")
    noise_channels = self.model_channels * self.channel_mult_noise
    if self.fourier_freqs is not None and len(self.fourier_freqs) != noise_channels // 2:
      raise ValueError(f"fourier_freqs has {len(self.fourier_freqs)} entries, expected {noise_channels // 2} "
                       "(model_channels * channel_mult_noise / 2).")

  def block_config(self) -> UNetBlockConfig:
    """EDM SongUNet's block_kwargs: num_heads 1, skip_scale sqrt(1/2), eps 1e-6, projected resampling
    skips, additive (non-adaptive) embedding, xavier_uniform init with 1e-5 zero-init and sqrt(0.2)
    attention gains."""
    return UNetBlockConfig(
        dropout=self.dropout, skip_scale=float(np.sqrt(0.5)), eps=1e-6, resample_filter=tuple(self.resample_filter),
        resample_proj=True, adaptive_scale=False, num_heads=1, init_mode="xavier_uniform", init_weight=1.0,
        init_zero_weight=1e-5, init_attn_weight=float(np.sqrt(0.2)), dtype=self.dtype, precision=self.precision)

  @nn.compact
  def __call__(self, x, noise_labels, class_labels=None, augment_labels=None, train: bool = False,
               return_logits: bool = False):
    self._check()
    check_images("SongUNet", x, self.img_resolution, self.in_channels)
    noise_channels = self.model_channels * self.channel_mult_noise
    emb_channels = self.model_channels * self.channel_mult_emb
    linear = lambda features, name, use_bias=True: EDMLinear(
        features, use_bias=use_bias, init_mode="xavier_uniform", precision=self.precision, name=name)

    # Mapping network (float32): noise embedding with sin/cos swapped, + labels, 2-layer MLP.
    noise_labels = jnp.broadcast_to(jnp.asarray(noise_labels, jnp.float32).reshape(-1), x.shape[:1])
    if self.embedding_type == "positional":
      emb = positional_embedding(noise_labels, noise_channels, endpoint=True)
    else:
      freqs = self.fourier_freqs if self.fourier_freqs is not None else default_fourier_freqs(noise_channels)
      emb = fourier_embedding(noise_labels, freqs)
    emb = jnp.concatenate(jnp.split(emb, 2, axis=1)[::-1], axis=1)
    if self.label_dim:
      labels = class_labels_of(self, "SongUNet", class_labels, x.shape[0], train)
      emb = emb + linear(noise_channels, "map_label")(labels * np.sqrt(self.label_dim))
    if self.augment_dim and augment_labels is not None:
      emb = emb + linear(noise_channels, "map_augment", use_bias=False)(jnp.asarray(augment_labels, jnp.float32))
    emb = nn.silu(linear(emb_channels, "map_layer0")(emb))
    emb = nn.silu(linear(emb_channels, "map_layer1")(emb))

    enc_layers, dec_layers = song_unet_layout(
        self.img_resolution, self.in_channels, self.out_channels, self.model_channels, tuple(self.channel_mult),
        self.num_blocks, tuple(self.attn_resolutions), self.encoder_type, self.decoder_type)
    block = self.block_config()
    x, skips = UNetEncoder(enc_layers, block, self.remat_blocks, name="enc")(x.astype(self.dtype), emb, train)
    _, out = UNetDecoder(dec_layers, block, self.remat_blocks, name="dec")(x, skips, emb, train)
    if return_logits:
      return out, jnp.mean(x.astype(jnp.float32), axis=-1)
    return out

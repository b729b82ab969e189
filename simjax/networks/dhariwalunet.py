"""EDM's DhariwalUNet (ADM, Dhariwal & Nichol 2021) as a Flax module, NHWC.

The network EDM trains and publishes for class-conditional ImageNet-64 (Karras et al. 2022,
"Elucidating the Design Space of Diffusion-Based Generative Models", Appendix F.2, `--arch=adm`),
written from the description and the layer semantics of NVlabs/edm `training/networks.py`, so that a
converted EDM checkpoint reproduces EDM's outputs to float32 rounding. It shares its layers with
simjax.networks.songunet (UNetBlock, EDMConv2d, EDMGroupNorm, EDMLinear); what differs from SongUNet:
- the noise embedding is plain [cos, sin] positional (no endpoint, no swap) of model_channels;
- class labels enter after the second mapping layer, through a bias-free `map_label`, unscaled;
- blocks: adaptive scale/shift, skip_scale 1, eps 1e-5, unprojected resampling skips, attention
  heads of 64 channels (a block asked for attention with fewer than 64 channels has none), every
  decoder block of an attention resolution attends, and the first encoder convolution already
  outputs model_channels * channel_mult[0];
- the output is `out_conv(silu(out_norm(x)))` after the decoder (no skip/aux outputs).

Parameter paths mirror EDM's names as in SongUNet, e.g. torch `model.enc.64x64_block0.conv0.weight`
is flax `params['model']['enc']['64x64_block0']['conv0']['kernel']`, `model.out_norm.weight` is
`params['model']['out_norm']['scale']`. The resampling filter is [1, 1] (EDM's default), a constant.
"""
from typing import Any, Tuple

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from simjax.networks.songunet import (EDMConv2d, EDMGroupNorm, EDMLinear, LayerSpec, UNetBlockConfig, UNetDecoder,
                                      UNetEncoder, check_images, class_labels_of, positional_embedding)

Dtype = Any
Precision = Any

_INIT_GAIN = float(np.sqrt(1 / 3))  # kaiming_uniform * sqrt(1/3): torch's default Linear/Conv2d init


def dhariwal_unet_layout(img_resolution: int, in_channels: int, model_channels: int, channel_mult,
                         num_blocks: int, attn_resolutions):
  """EDM's DhariwalUNet encoder and decoder as ordered LayerSpec tuples (names are EDM's)."""
  enc = []
  cout = in_channels
  for level, mult in enumerate(channel_mult):
    res = img_resolution >> level
    tag = f"{res}x{res}"
    if level == 0:
      cin, cout = cout, model_channels * mult
      enc.append(LayerSpec(f"{tag}_conv", "conv", cin, cout))
    else:
      enc.append(LayerSpec(f"{tag}_down", "block", cout, cout, down=True))
    for idx in range(num_blocks):
      cin, cout = cout, model_channels * mult
      enc.append(LayerSpec(f"{tag}_block{idx}", "block", cin, cout, attention=res in attn_resolutions))
  skips = [spec.out_channels for spec in enc]

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
      dec.append(LayerSpec(f"{tag}_block{idx}", "block", cin, cout, attention=res in attn_resolutions,
                           concat_skip=True))
  return tuple(enc), tuple(dec)


class DhariwalUNet(nn.Module):
  """EDM's DhariwalUNet (ADM). Field names and defaults are EDM's constructor arguments (the defaults
  are EDM's ImageNet-64 network: 192 channels, [1, 2, 3, 4], 3 blocks, attention at 32, 16, 8).

  `__call__(x, noise_labels, class_labels=None, augment_labels=None, train=False)`: x NHWC
  [N, R, R, in_channels], noise_labels [N] (the preconditioner's c_noise); returns F(x) [N, R, R,
  out_channels] in `dtype`. Dropout and label dropout draw from the 'dropout' rng when train=True.
  With return_logits=True it returns (F(x), logits): the encoder's bottleneck averaged over
  channels, [N, R', R'] float32 (SiDA's discriminator head, as SongUNet's).
  """
  img_resolution: int
  in_channels: int
  out_channels: int
  label_dim: int = 0
  augment_dim: int = 0
  model_channels: int = 192
  channel_mult: Tuple[int, ...] = (1, 2, 3, 4)
  channel_mult_emb: int = 4
  num_blocks: int = 3
  attn_resolutions: Tuple[int, ...] = (32, 16, 8)
  dropout: float = 0.10
  label_dropout: float = 0.0
  dtype: Dtype = jnp.float32
  precision: Precision = None
  remat_blocks: bool = False  # rematerialise each UNetBlock in the backward pass (memory for compute)

  resample_filter = (1, 1)  # EDM's UNetBlock default; a constant, not a constructor argument.

  def block_config(self) -> UNetBlockConfig:
    """EDM DhariwalUNet's block_kwargs: UNetBlock's defaults (adaptive scale, skip_scale 1, eps 1e-5,
    [1, 1] resampling without projection), 64 channels per head, kaiming_uniform * sqrt(1/3) weights
    and biases, zero-initialised conv1/proj."""
    return UNetBlockConfig(
        dropout=self.dropout, skip_scale=1.0, eps=1e-5, resample_filter=tuple(self.resample_filter),
        resample_proj=False, adaptive_scale=True, num_heads=None, channels_per_head=64,
        init_mode="kaiming_uniform", init_weight=_INIT_GAIN, init_bias=_INIT_GAIN, init_zero_weight=0.0,
        dtype=self.dtype, precision=self.precision)

  @nn.compact
  def __call__(self, x, noise_labels, class_labels=None, augment_labels=None, train: bool = False,
               return_logits: bool = False):
    if self.img_resolution % (1 << (len(self.channel_mult) - 1)):
      raise ValueError(f"img_resolution {self.img_resolution} is not divisible by 2^{len(self.channel_mult) - 1}; "
                       "use fewer channel_mult levels or another resolution.")
    check_images("DhariwalUNet", x, self.img_resolution, self.in_channels)
    emb_channels = self.model_channels * self.channel_mult_emb
    linear = lambda features, name, **kw: EDMLinear(features, precision=self.precision, name=name, **kw)
    default = dict(init_mode="kaiming_uniform", init_weight=_INIT_GAIN, init_bias=_INIT_GAIN)

    # Mapping network (float32): positional noise embedding, (+ augment labels), 2 layers, + labels.
    noise_labels = jnp.broadcast_to(jnp.asarray(noise_labels, jnp.float32).reshape(-1), x.shape[:1])
    emb = positional_embedding(noise_labels, self.model_channels, endpoint=False)
    if self.augment_dim and augment_labels is not None:
      emb = emb + linear(self.model_channels, "map_augment", use_bias=False, init_mode="kaiming_uniform",
                         init_weight=0.0)(jnp.asarray(augment_labels, jnp.float32))
    emb = nn.silu(linear(emb_channels, "map_layer0", **default)(emb))
    emb = linear(emb_channels, "map_layer1", **default)(emb)
    if self.label_dim:
      labels = class_labels_of(self, "DhariwalUNet", class_labels, x.shape[0], train)
      emb = emb + linear(emb_channels, "map_label", use_bias=False, init_mode="kaiming_normal",
                         init_weight=float(np.sqrt(self.label_dim)))(labels)
    emb = nn.silu(emb)

    enc_layers, dec_layers = dhariwal_unet_layout(
        self.img_resolution, self.in_channels, self.model_channels, tuple(self.channel_mult), self.num_blocks,
        tuple(self.attn_resolutions))
    block = self.block_config()
    x, skips = UNetEncoder(enc_layers, block, self.remat_blocks, name="enc")(x.astype(self.dtype), emb, train)
    bottleneck = x
    x, _ = UNetDecoder(dec_layers, block, self.remat_blocks, name="dec")(x, skips, emb, train)
    x = nn.silu(EDMGroupNorm(eps=1e-5, dtype=self.dtype, name="out_norm")(x))
    out = EDMConv2d(self.out_channels, 3, init_mode="kaiming_uniform", init_weight=0.0, dtype=self.dtype,
                    precision=self.precision, name="out_conv")(x)
    if return_logits:
      return out, jnp.mean(bottleneck.astype(jnp.float32), axis=-1)
    return out

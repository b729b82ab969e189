"""One parameterised diffusion transformer, NHWC: PixArt-alpha (adaLN-single, cross-attention to a
caption) and DiT (adaLN-Zero, class labels).

Re-implements the architectures of Peebles & Xie 2023 ("Scalable Diffusion Models with
Transformers", section 3.2, facebookresearch/DiT) and Chen et al. 2023 ("PixArt-alpha", section 2.3)
as diffusers defines them (`DiTTransformer2DModel`, `PixArtTransformer2DModel`), written from those
descriptions so that a converted checkpoint reproduces the reference outputs to float32 rounding.
As SongUNet covers DDPM++ and NCSN++, this class covers both through `adaln`:

  'single'  PixArt: one timestep MLP shared by all blocks (`adaln_single`), each block adding its own
            learned `scale_shift_table` [6, D]; cross-attention to the projected caption
            (`caption_channels`) with its padding mask; optional resolution / aspect-ratio
            micro-conditions (the 1024-MS model); final layer modulated by a [2, D] table.
  'zero'    DiT: timestep + class-label embedding, each block's own adaLN-Zero linear [D, 6D], a
            final adaLN linear (`proj_out_1`); the label table has a null row (index num_classes).

Parameter paths mirror diffusers' names with '.<i>' joined as '_<i>': torch
`transformer_blocks.3.attn2.to_out.0.weight` is flax `transformer_blocks_3/attn2/to_out_0/kernel`
(linear kernels [in, out], the patch convolution HWIO). With `scan_blocks` the blocks are one
`transformer_blocks` subtree whose leaves carry a leading [depth] axis (`stack_blocks`).
diffusers' DiT gives every block its own copy of the timestep/label embedder and uses block 0's
for the final layer; the original DiT shares one. simjax keeps one, `emb` (the loader checks the
copies agree).

Inputs: x [N, H, W, C] latents, t [N] the discrete timestep (a float is fine), cond: for 'single' a
text condition {'emb': [N, L, caption_channels], 'mask': [N, L]} (simjax.conditioning); for 'zero'
one-hot class labels [N, num_classes] (all zeros = the null class, so guidance's null condition
is DiT's). Output [N, H, W, out_channels] (learned-variance models: epsilon then the variance
interpolation). `dtype` is the compute dtype of the blocks; parameters, embeddings, the final
layer's output and normalisation statistics stay float32.
"""
from typing import Any, Optional

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from simjax import draws
from simjax.networks.attention import dot_product_attention

Dtype = Any
Precision = Any

ADALN_KINDS = ("single", "zero")
FREQ_DIM = 256  # width of the sinusoidal timestep features (both papers)


def timestep_features(t, dim: int = FREQ_DIM, freq_shift: float = 0.0, max_period: float = 10000.0):
  """Sinusoidal features [N, dim] of t [N], cosines first: frequencies max_period^(-i / (dim/2 - shift))."""
  half = dim // 2
  freqs = jnp.exp(-np.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift))
  angles = jnp.asarray(t, jnp.float32)[:, None] * freqs[None]
  return jnp.concatenate([jnp.cos(angles), jnp.sin(angles)], axis=-1)


def sincos_positions(dim: int, height: int, width: int, base_size: int, interpolation_scale: float) -> np.ndarray:
  """Fixed 2-D sin-cos positions [height*width, dim] (row-major tokens), float32.

  Grid coordinates are arange(n) / (n / base_size) / interpolation_scale, so a model trained at
  `base_size` patches per side sees the same coordinate range at any size. The first half of the
  features encodes the column, the second the row (diffusers' and DiT's order)."""
  if dim % 4:
    raise ValueError(f"the transformer width {dim} must be a multiple of 4 for 2-D sin-cos positions.")
  rows = np.arange(height, dtype=np.float64) / (height / base_size) / interpolation_scale
  cols = np.arange(width, dtype=np.float64) / (width / base_size) / interpolation_scale
  omega = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float64) / (dim / 4))

  def encode(pos):
    out = np.outer(pos.reshape(-1), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)

  grid_rows, grid_cols = np.meshgrid(rows, cols, indexing="ij")
  return np.concatenate([encode(grid_cols), encode(grid_rows)], axis=1).astype(np.float32)


def _layer_norm(x, eps):
  """LayerNorm without affine parameters, statistics in float32."""
  x32 = x.astype(jnp.float32)
  mean = x32.mean(-1, keepdims=True)
  var = jnp.square(x32 - mean).mean(-1, keepdims=True)
  return ((x32 - mean) * jax.lax.rsqrt(var + eps)).astype(x.dtype)


def _dense(features, name, *, dtype=jnp.float32, precision=None, zero=False):
  """A linear layer (xavier-uniform weights, or zeros for adaLN-Zero's modulation and output layers)."""
  init = nn.initializers.zeros if zero else nn.initializers.xavier_uniform()
  return nn.Dense(features, name=name, dtype=dtype, precision=precision, kernel_init=init)


class MLPEmbedder(nn.Module):
  """linear_1 -> SiLU -> linear_2 (diffusers' TimestepEmbedding), float32."""
  features: int

  @nn.compact
  def __call__(self, x):
    return _dense(self.features, "linear_2")(nn.silu(_dense(self.features, "linear_1")(x)))


class CaptionProjection(nn.Module):
  """linear_1 -> tanh-GELU -> linear_2: T5 features to the transformer width (PixArt)."""
  features: int

  @nn.compact
  def __call__(self, y):
    y = _dense(self.features, "linear_1")(y)
    return _dense(self.features, "linear_2")(nn.gelu(y, approximate=True))


class LabelEmbedder(nn.Module):
  """DiT's class table with a null row: one-hot labels [N, K] pick rows; an all-zero row picks the
  null embedding (row K), so soft labels and the null condition need no special case."""
  num_classes: int
  features: int

  @nn.compact
  def __call__(self, onehot):
    table = nn.Embed(self.num_classes + 1, self.features, name="embedding_table").embedding
    onehot = jnp.asarray(onehot, jnp.float32)
    null_weight = 1.0 - onehot.sum(-1, keepdims=True)
    return onehot @ table[: self.num_classes] + null_weight * table[self.num_classes]


class Attention(nn.Module):
  """Multi-head attention with biased q/k/v/out projections (diffusers' `Attention`), through
  simjax.networks.attention (cuDNN's fused kernel on GPU unless `implementation` says otherwise)."""
  num_heads: int
  head_dim: int
  dtype: Dtype = jnp.float32
  precision: Precision = None
  implementation: Optional[str] = None

  @nn.compact
  def __call__(self, x, context=None, mask=None):
    """x [N, T, D] attends to context [N, S, Dc] (x itself if None); mask [N, S] bool keeps keys."""
    context = x if context is None else context
    width = self.num_heads * self.head_dim
    dense = lambda name: _dense(width, name, dtype=self.dtype, precision=self.precision)
    split = lambda h: h.reshape(h.shape[:2] + (self.num_heads, self.head_dim))
    q, k, v = split(dense("to_q")(x)), split(dense("to_k")(context)), split(dense("to_v")(context))
    if mask is not None:
      mask = mask[:, None, None, :]  # [N, 1 head, 1 query, S]
    out = dot_product_attention(q, k, v, mask=mask, implementation=self.implementation, precision=self.precision)
    return dense("to_out_0")(out.reshape(out.shape[:2] + (width,)))


class FeedForward(nn.Module):
  """Linear -> tanh-GELU -> linear, 4x wide (diffusers' `net.0.proj`, `net.2`)."""
  features: int
  hidden: int
  dtype: Dtype = jnp.float32
  precision: Precision = None

  @nn.compact
  def __call__(self, x):
    h = _GELUProjection(self.hidden, self.dtype, self.precision, name="net_0")(x)
    return _dense(self.features, "net_2", dtype=self.dtype, precision=self.precision)(h)


class _GELUProjection(nn.Module):
  features: int
  dtype: Dtype = jnp.float32
  precision: Precision = None

  @nn.compact
  def __call__(self, x):
    return nn.gelu(_dense(self.features, "proj", dtype=self.dtype, precision=self.precision)(x), approximate=True)


class _AdaLNZeroModulation(nn.Module):
  """A DiT block's `norm1.linear`: SiLU(conditioning) -> 6 modulation vectors, zero-initialised."""
  features: int

  @nn.compact
  def __call__(self, c):
    return _dense(6 * self.features, "linear", zero=True)(nn.silu(c))


class TransformerBlock(nn.Module):
  """Self-attention, cross-attention ('single' with a caption) and MLP, each residual, the first and
  last modulated by shift/scale/gate (adaLN; section 3.2 of DiT, 2.3 of PixArt).

  `cond_vec`: 'single' the shared [N, 6D] timestep modulation; 'zero' the [N, D] conditioning."""
  width: int
  num_heads: int
  adaln: str = "single"
  cross_attention: bool = False
  mlp_ratio: int = 4
  norm_eps: float = 1e-6
  dtype: Dtype = jnp.float32
  precision: Precision = None
  attention_implementation: Optional[str] = None

  @nn.compact
  def __call__(self, h, cond_vec, context=None, context_mask=None):
    n, d = h.shape[0], self.width
    if self.adaln == "single":
      table = self.param("scale_shift_table", lambda key, shape: draws.normal(key, shape) / np.sqrt(d), (6, d))
      mods = table[None] + cond_vec.reshape(n, 6, d)
      first_norm_eps = self.norm_eps
    else:
      mods = _AdaLNZeroModulation(d, name="norm1")(cond_vec).reshape(n, 6, d)
      first_norm_eps = 1e-6  # AdaLayerNormZero's own LayerNorm
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (
        mods[:, i][:, None].astype(self.dtype) for i in range(6))
    attention = lambda name: Attention(self.num_heads, d // self.num_heads, self.dtype, self.precision,
                                       self.attention_implementation, name=name)
    x = _layer_norm(h, first_norm_eps) * (1 + scale_msa) + shift_msa
    h = h + gate_msa * attention("attn1")(x)
    if self.cross_attention:
      # PixArt applies no norm before cross-attention.
      h = h + attention("attn2")(h, context, context_mask)
    x = _layer_norm(h, self.norm_eps) * (1 + scale_mlp) + shift_mlp
    return h + gate_mlp * FeedForward(d, self.mlp_ratio * d, self.dtype, self.precision, name="ff")(x)


class _ScannedBlock(TransformerBlock):
  """A block as nn.scan's body: (carry, None) -> (carry, None)."""

  def __call__(self, h, cond_vec, context=None, context_mask=None):  # pylint: disable=arguments-renamed
    return super().__call__(h, cond_vec, context, context_mask), None


class PatchEmbed(nn.Module):
  """p x p patches -> tokens [N, T, D] plus fixed 2-D sin-cos positions (diffusers' `pos_embed`)."""
  width: int
  patch_size: int
  base_size: int
  interpolation_scale: float = 1.0
  dtype: Dtype = jnp.float32
  precision: Precision = None

  @nn.compact
  def __call__(self, x):
    p = self.patch_size
    h = nn.Conv(self.width, (p, p), strides=(p, p), padding="VALID", name="proj", dtype=self.dtype,
                precision=self.precision)(x.astype(self.dtype))
    n, rows, cols, _ = h.shape
    positions = sincos_positions(self.width, rows, cols, self.base_size, self.interpolation_scale)
    return h.reshape(n, rows * cols, self.width) + jnp.asarray(positions, self.dtype)[None]


class TimestepSizeEmbedding(nn.Module):
  """PixArt's conditioning [N, D]: the timestep MLP, plus (micro-conditions) the resolution [N, 2] and
  aspect ratio [N, 1] through their own MLPs, concatenated to D (diffusers' `adaln_single.emb`)."""
  width: int
  micro_conditions: bool = False
  freq_shift: float = 0.0

  @nn.compact
  def __call__(self, t, resolution=None, aspect_ratio=None):
    n = t.shape[0]
    emb = MLPEmbedder(self.width, name="timestep_embedder")(timestep_features(t, freq_shift=self.freq_shift))
    if not self.micro_conditions:
      return emb
    size_dim = self.width // 3
    res = MLPEmbedder(size_dim, name="resolution_embedder")(timestep_features(resolution.reshape(-1)))
    ar = MLPEmbedder(size_dim, name="aspect_ratio_embedder")(timestep_features(aspect_ratio.reshape(-1)))
    return emb + jnp.concatenate([res.reshape(n, -1), ar.reshape(n, -1)], axis=-1)


class AdaLNSingle(nn.Module):
  """(the blocks' shared modulation [N, 6D] = linear(SiLU(emb)), the conditioning emb [N, D])."""
  width: int
  micro_conditions: bool = False
  freq_shift: float = 0.0

  @nn.compact
  def __call__(self, t, resolution=None, aspect_ratio=None):
    emb = TimestepSizeEmbedding(self.width, self.micro_conditions, self.freq_shift, name="emb")(
        t, resolution, aspect_ratio)
    return _dense(6 * self.width, "linear", zero=True)(nn.silu(emb)), emb


class TimestepLabelEmbedding(nn.Module):
  """DiT's conditioning [N, D]: the timestep MLP plus the class embedding (none without classes)."""
  width: int
  num_classes: int = 0
  freq_shift: float = 0.0

  @nn.compact
  def __call__(self, t, labels=None):
    emb = MLPEmbedder(self.width, name="timestep_embedder")(timestep_features(t, freq_shift=self.freq_shift))
    if self.num_classes:
      labels = jnp.zeros((t.shape[0], self.num_classes), jnp.float32) if labels is None else labels
      emb = emb + LabelEmbedder(self.num_classes, self.width, name="class_embedder")(labels)
    return emb


class DiffusionTransformer(nn.Module):
  """PixArt-alpha / DiT: x [N, H, W, C], t [N], cond -> [N, H, W, out_channels] (see the module doc)."""
  sample_size: int = 32           # latent side the positions are defined at (diffusers' sample_size)
  in_channels: int = 4
  out_channels: int = 8           # 2 x in_channels for learned-variance models
  patch_size: int = 2
  num_heads: int = 16
  head_dim: int = 72
  depth: int = 28
  adaln: str = "single"
  caption_channels: int = 0       # > 0: cross-attention to a projected caption (PixArt)
  num_classes: int = 0            # > 0: class labels with a null row (DiT)
  micro_conditions: bool = False  # resolution / aspect-ratio embeddings (PixArt's 1024-MS model)
  pixels_per_latent: int = 8      # the VAE's downsampling, for the default micro-conditions
  interpolation_scale: float = 1.0
  freq_shift: float = 0.0         # diffusers' DiT uses 1; the original DiT and PixArt 0
  norm_eps: float = 1e-6
  mlp_ratio: int = 4
  scan_blocks: bool = False
  remat: bool = False
  dtype: Dtype = jnp.float32
  precision: Precision = None
  attention_implementation: Optional[str] = None

  @property
  def width(self) -> int:
    return self.num_heads * self.head_dim

  def _check(self, x):
    if self.adaln not in ADALN_KINDS:
      raise ValueError(f"adaln={self.adaln!r}; use one of {ADALN_KINDS}.")
    if self.adaln == "single" and self.num_classes:
      raise ValueError("class labels condition adaLN-Zero transformers (DiT): set adaln='zero'.")
    if self.adaln == "zero" and (self.caption_channels or self.micro_conditions):
      raise ValueError("captions and micro-conditions are PixArt's: set adaln='single'.")
    if self.micro_conditions and self.width % 3:
      raise ValueError(f"micro-conditions split the width in thirds; {self.width} is not a multiple of 3.")
    chex.assert_rank(x, 4)
    _, height, width, channels = x.shape
    if channels != self.in_channels or height % self.patch_size or width % self.patch_size:
      raise ValueError(f"the transformer takes [N, H, W, {self.in_channels}] with H and W multiples of "
                       f"{self.patch_size}; got {x.shape}.")
    return height // self.patch_size, width // self.patch_size

  def _micro_conditions(self, n, grid, resolution, aspect_ratio):
    """The image size in pixels [N, 2] and its aspect ratio [N, 1], from the latent size unless given."""
    pixels = tuple(g * self.patch_size * self.pixels_per_latent for g in grid)
    resolution = jnp.broadcast_to(jnp.asarray(pixels if resolution is None else resolution, jnp.float32), (n, 2))
    aspect_ratio = pixels[0] / pixels[1] if aspect_ratio is None else aspect_ratio
    return resolution, jnp.broadcast_to(jnp.asarray(aspect_ratio, jnp.float32).reshape(-1, 1), (n, 1))

  @nn.compact
  def __call__(self, x, t, cond=None, *, resolution=None, aspect_ratio=None, train: bool = False):
    del train  # no dropout: PixArt and DiT train without it
    rows, cols = self._check(x)
    n, d, p = x.shape[0], self.width, self.patch_size
    t = jnp.broadcast_to(jnp.asarray(t, jnp.float32).reshape(-1), (n,))
    h = PatchEmbed(d, p, self.sample_size // p, self.interpolation_scale, self.dtype, self.precision,
                   name="pos_embed")(x)

    context = context_mask = None
    if self.caption_channels:
      if not isinstance(cond, dict):
        raise ValueError("this transformer is text-conditioned: pass cond={'emb': [N, L, D], 'mask': [N, L]}.")
      context = CaptionProjection(d, name="caption_projection")(jnp.asarray(cond["emb"], jnp.float32))
      context, context_mask = context.astype(self.dtype), jnp.asarray(cond["mask"]) > 0.5

    if self.adaln == "single":
      micro = self._micro_conditions(n, (rows, cols), resolution, aspect_ratio) if self.micro_conditions else (None,) * 2
      block_vec, emb = AdaLNSingle(d, self.micro_conditions, self.freq_shift, name="adaln_single")(t, *micro)
    else:
      emb = TimestepLabelEmbedding(d, self.num_classes, self.freq_shift, name="emb")(t, cond)
      block_vec = emb

    block_kwargs = dict(width=d, num_heads=self.num_heads, adaln=self.adaln,
                        cross_attention=bool(self.caption_channels), mlp_ratio=self.mlp_ratio,
                        norm_eps=self.norm_eps, dtype=self.dtype, precision=self.precision,
                        attention_implementation=self.attention_implementation)
    if self.scan_blocks:
      body = nn.remat(_ScannedBlock) if self.remat else _ScannedBlock
      blocks = nn.scan(body, variable_axes={"params": 0}, split_rngs={"params": True},
                       in_axes=(nn.broadcast, nn.broadcast, nn.broadcast), length=self.depth)
      h, _ = blocks(name="transformer_blocks", **block_kwargs)(h, block_vec, context, context_mask)
    else:
      block_cls = nn.remat(TransformerBlock) if self.remat else TransformerBlock
      for i in range(self.depth):
        h = block_cls(name=f"transformer_blocks_{i}", **block_kwargs)(h, block_vec, context, context_mask)

    h = h.astype(jnp.float32)
    if self.adaln == "single":
      table = self.param("scale_shift_table", lambda key, shape: draws.normal(key, shape) / np.sqrt(d), (2, d))
      shift, scale = jnp.split(table[None] + emb[:, None], 2, axis=1)
      proj = "proj_out"
    else:
      shift, scale = jnp.split(_dense(2 * d, "proj_out_1", zero=True)(nn.silu(emb))[:, None], 2, axis=-1)
      proj = "proj_out_2"
    h = _layer_norm(h, 1e-6) * (1 + scale) + shift
    h = _dense(p * p * self.out_channels, proj, zero=True)(h)
    h = h.reshape(n, rows, cols, p, p, self.out_channels).transpose(0, 1, 3, 2, 4, 5)
    return h.reshape(n, rows * p, cols * p, self.out_channels)


def stack_blocks(params, depth: int):
  """Per-block subtrees `transformer_blocks_<i>` -> one `transformer_blocks` with a leading [depth]
  axis (the layout of scan_blocks=True)."""
  params = dict(params)
  blocks = [params.pop(f"transformer_blocks_{i}") for i in range(depth)]
  params["transformer_blocks"] = jax.tree.map(lambda *xs: jnp.stack(xs), *blocks)
  return params


def unstack_blocks(params, depth: int):
  """The inverse of stack_blocks."""
  params = dict(params)
  stacked = params.pop("transformer_blocks")
  for i in range(depth):
    params[f"transformer_blocks_{i}"] = jax.tree.map(lambda x, i=i: x[i], stacked)
  return params

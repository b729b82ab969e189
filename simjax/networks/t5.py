"""The T5 encoder in Flax: T5 v1.1 (PixArt-alpha's text encoder is T5-v1_1-XXL) and the original T5.

Re-implements the encoder stack of Raffel et al. 2020 ("Exploring the Limits of Transfer Learning with
a Unified Text-to-Text Transformer", section 2.1) as transformers defines it (`T5EncoderModel`),
written from that description so that a converted checkpoint reproduces `last_hidden_state` to
float32 rounding. What sets T5 apart from a textbook transformer, each of which breaks parity if
missed:
- RMS layer norm: x / sqrt(mean(x^2) + eps) * scale; no mean subtraction, no bias. Every sublayer
  is pre-norm and residual, and the stack ends with a final norm (included in the output).
- Attention scores are NOT scaled by 1/sqrt(d_kv) (T5 folds that scale into q's initialisation).
- No absolute positions: a learned bias on the scores, looked up by the bucket of the key-query
  offset (exact for small offsets, log-spaced up to `relative_attention_max_distance`, one bucket
  beyond, half the buckets per direction). Only block 0 holds the [num_buckets, num_heads] table;
  its bias is reused by every block.
- No bias in any linear layer. Feed-forward: 'gated-gelu' (v1.1) wo(gelu_tanh(wi_0 x) * wi_1 x),
  with the tanh approximation (transformers' "gelu_new"); 'relu' (original) wo(relu(wi x)).
- Padding: the mask removes keys only. Padded query positions still get outputs (attending to the
  real tokens), as in the reference; PixArt masks them again in its cross-attention.
v1.1's other differences from the original (untied lm_head, no decoder output rescaling) concern
the decoder, which this module does not have.

Parameter paths mirror transformers' names with '.<i>' joined as '_<i>', linear kernels [in, out]
(torch's [out, in] transposed), norm weights as `scale`, embedding tables as `embedding`:
torch `encoder.block.0.layer.0.SelfAttention.q.weight` is flax `encoder/block_0/layer_0/SelfAttention/q/kernel`,
`shared.weight` (= `encoder.embed_tokens.weight`, tied) is `shared/embedding` (see
simjax.text.t5_checkpoints).

Inputs: token_ids [N, L] int, mask [N, L] (1 = token, 0 = padding; > 0.5 keeps). Output [N, L, d_model]
float32. `dtype` is the compute dtype of the matmuls; the residual stream, norm statistics, position
bias and softmax stay float32. bfloat16 is fine (T5 v1.1 was pretrained in bfloat16); float16 is
not: the feed-forward activations of the large v1.1 models exceed float16's 65504 (transformers
clamps them and keeps `wo` in float32 for that reason).
"""
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from simjax.networks.attention import dot_product_attention

Dtype = Any
Precision = Any

FEED_FORWARD_KINDS = ("gated-gelu", "relu")
RELATIVE_BIAS_PATH = ("encoder", "block_0", "layer_0", "SelfAttention", "relative_attention_bias", "embedding")


def relative_position_buckets(length: int, num_buckets: int, max_distance: int) -> np.ndarray:
  """Bidirectional bucket [length, length] int32 of offset key - query (T5's, as Mesh TensorFlow's).

  Half the buckets for keys after the query, half for keys before; in each half, offsets below a
  quarter of num_buckets get one bucket each and larger ones log-spaced buckets up to max_distance,
  beyond which all share the last. The log is taken in float32, as the reference does, so offsets
  that land exactly on a bucket boundary round the same way."""
  half = num_buckets // 2
  max_exact = half // 2
  positions = np.arange(length, dtype=np.int64)
  offset = positions[None, :] - positions[:, None]
  buckets = (offset > 0).astype(np.int64) * half
  distance = np.abs(offset)
  ratio = np.maximum(distance, 1).astype(np.float32) / np.float32(max_exact)  # max(.,1): no log(0) warnings
  log_bucket = np.log(ratio) / np.float32(math.log(max_distance / max_exact)) * np.float32(half - max_exact)
  large = np.minimum(max_exact + log_bucket.astype(np.int64), half - 1)
  return (buckets + np.where(distance < max_exact, distance, large)).astype(np.int32)


def _rms_norm_init(key, shape):
  del key
  return jnp.ones(shape, jnp.float32)


class T5LayerNorm(nn.Module):
  """RMS norm with a learned scale (no mean subtraction, no bias), float32 in and out."""
  eps: float = 1e-6

  @nn.compact
  def __call__(self, x):
    scale = self.param("scale", _rms_norm_init, (x.shape[-1],))
    x = x.astype(jnp.float32)
    return x * jax.lax.rsqrt(jnp.square(x).mean(-1, keepdims=True) + self.eps) * scale


class T5Attention(nn.Module):
  """Multi-head self-attention without score scaling; block 0 (`relative_bias`) builds the position
  bias [1, H, L, L] from its bucket table, the other blocks receive it."""
  num_heads: int
  d_kv: int
  relative_bias: bool = False
  num_buckets: int = 32
  max_distance: int = 128
  dtype: Dtype = jnp.float32
  precision: Precision = None

  @nn.compact
  def __call__(self, x, keep, position_bias=None):
    """x [N, L, D] (normed), keep [N, L] bool -> ([N, L, D], the position bias it used)."""
    n, length, d_model = x.shape
    dense = lambda features, name: nn.Dense(features, use_bias=False, dtype=self.dtype, precision=self.precision,
                                            name=name)
    inner = self.num_heads * self.d_kv
    split = lambda h: h.reshape(n, length, self.num_heads, self.d_kv)
    q, k, v = (split(dense(inner, name)(x)) for name in ("q", "k", "v"))
    if self.relative_bias:
      buckets = relative_position_buckets(length, self.num_buckets, self.max_distance)
      table = nn.Embed(self.num_buckets, self.num_heads, name="relative_attention_bias")(jnp.asarray(buckets))
      position_bias = jnp.transpose(table, (2, 0, 1))[None].astype(jnp.float32)  # [1, H, L, L]
    elif position_bias is None:
      raise ValueError("a T5 attention layer without the bucket table needs block 0's position bias.")
    mask = keep[:, None, None, :]  # [N, 1 head, 1 query, L keys]
    out = dot_product_attention(q, k, v, bias=position_bias, mask=mask, scale=1.0, precision=self.precision)
    return dense(d_model, "o")(out.reshape(n, length, inner)), position_bias


class T5DenseReluDense(nn.Module):
  """The feed-forward: 'gated-gelu' wo(gelu_tanh(wi_0 x) * wi_1 x), 'relu' wo(relu(wi x))."""
  d_model: int
  d_ff: int
  feed_forward_proj: str = "gated-gelu"
  dtype: Dtype = jnp.float32
  precision: Precision = None

  @nn.compact
  def __call__(self, x):
    dense = lambda features, name: nn.Dense(features, use_bias=False, dtype=self.dtype, precision=self.precision,
                                            name=name)
    if self.feed_forward_proj == "gated-gelu":
      h = nn.gelu(dense(self.d_ff, "wi_0")(x), approximate=True) * dense(self.d_ff, "wi_1")(x)
    else:
      h = nn.relu(dense(self.d_ff, "wi")(x))
    return dense(self.d_model, "wo")(h)


class T5LayerSelfAttention(nn.Module):
  """x + SelfAttention(layer_norm(x)) (transformers' `layer.0`)."""
  num_heads: int
  d_kv: int
  relative_bias: bool = False
  num_buckets: int = 32
  max_distance: int = 128
  eps: float = 1e-6
  dtype: Dtype = jnp.float32
  precision: Precision = None

  @nn.compact
  def __call__(self, h, keep, position_bias=None):
    x = T5LayerNorm(self.eps, name="layer_norm")(h).astype(self.dtype)
    out, position_bias = T5Attention(self.num_heads, self.d_kv, self.relative_bias, self.num_buckets,
                                     self.max_distance, self.dtype, self.precision, name="SelfAttention")(
                                         x, keep, position_bias)
    return h + out.astype(jnp.float32), position_bias


class T5LayerFF(nn.Module):
  """x + DenseReluDense(layer_norm(x)) (transformers' `layer.1`)."""
  d_model: int
  d_ff: int
  feed_forward_proj: str = "gated-gelu"
  eps: float = 1e-6
  dtype: Dtype = jnp.float32
  precision: Precision = None

  @nn.compact
  def __call__(self, h):
    x = T5LayerNorm(self.eps, name="layer_norm")(h).astype(self.dtype)
    out = T5DenseReluDense(self.d_model, self.d_ff, self.feed_forward_proj, self.dtype, self.precision,
                           name="DenseReluDense")(x)
    return h + out.astype(jnp.float32)


class T5Block(nn.Module):
  """Self-attention then feed-forward (`layer_0`, `layer_1`), each pre-norm and residual."""
  d_model: int
  d_kv: int
  d_ff: int
  num_heads: int
  relative_bias: bool = False
  num_buckets: int = 32
  max_distance: int = 128
  eps: float = 1e-6
  feed_forward_proj: str = "gated-gelu"
  dtype: Dtype = jnp.float32
  precision: Precision = None

  @nn.compact
  def __call__(self, h, keep, position_bias=None):
    h, position_bias = T5LayerSelfAttention(self.num_heads, self.d_kv, self.relative_bias, self.num_buckets,
                                            self.max_distance, self.eps, self.dtype, self.precision,
                                            name="layer_0")(h, keep, position_bias)
    h = T5LayerFF(self.d_model, self.d_ff, self.feed_forward_proj, self.eps, self.dtype, self.precision,
                  name="layer_1")(h)
    return h, position_bias


class T5Stack(nn.Module):
  """The blocks and the final norm (transformers' `encoder`), on embedded tokens [N, L, D] float32."""
  d_model: int
  d_kv: int
  d_ff: int
  num_layers: int
  num_heads: int
  num_buckets: int = 32
  max_distance: int = 128
  eps: float = 1e-6
  feed_forward_proj: str = "gated-gelu"
  dtype: Dtype = jnp.float32
  precision: Precision = None

  @nn.compact
  def __call__(self, h, keep):
    position_bias = None
    for i in range(self.num_layers):
      h, position_bias = T5Block(self.d_model, self.d_kv, self.d_ff, self.num_heads, i == 0, self.num_buckets,
                                 self.max_distance, self.eps, self.feed_forward_proj, self.dtype, self.precision,
                                 name=f"block_{i}")(h, keep, position_bias)
    return T5LayerNorm(self.eps, name="final_layer_norm")(h)


class T5Encoder(nn.Module):
  """T5's encoder: token_ids [N, L] int, mask [N, L] -> [N, L, d_model] float32 (see the module doc).

  The sizes have no defaults; T5-v1_1-XXL (PixArt's) is vocab_size=32128, d_model=4096, d_kv=64,
  d_ff=10240, num_layers=24, num_heads=64, feed_forward_proj='gated-gelu'."""
  vocab_size: int
  d_model: int
  d_kv: int
  d_ff: int
  num_layers: int
  num_heads: int
  relative_attention_num_buckets: int = 32
  relative_attention_max_distance: int = 128
  layer_norm_epsilon: float = 1e-6
  feed_forward_proj: str = "gated-gelu"
  dtype: Dtype = jnp.float32   # compute dtype of the matmuls: float32 or bfloat16 (float16 overflows)
  precision: Precision = None  # of every matmul, attention included; None is XLA's default (TF32 on recent GPUs)

  def _check(self, token_ids, mask):
    if self.feed_forward_proj not in FEED_FORWARD_KINDS:
      raise ValueError(f"feed_forward_proj={self.feed_forward_proj!r}; use one of {FEED_FORWARD_KINDS}.")
    max_exact = self.relative_attention_num_buckets // 4
    if max_exact < 1 or self.relative_attention_max_distance <= max_exact:
      raise ValueError(f"relative_attention_num_buckets={self.relative_attention_num_buckets} must be >= 4 and "
                       f"relative_attention_max_distance={self.relative_attention_max_distance} above a quarter of it.")
    if jnp.dtype(self.dtype) == jnp.float16:
      raise ValueError("T5's activations overflow float16; use dtype=jnp.bfloat16 or jnp.float32.")
    if token_ids.ndim != 2 or mask.shape != token_ids.shape:
      raise ValueError(f"the T5 encoder takes token_ids [N, L] and a mask of the same shape; got {token_ids.shape} "
                       f"and {mask.shape}.")
    if not jnp.issubdtype(token_ids.dtype, jnp.integer):
      raise ValueError(f"token_ids must be integers (a tokenizer's ids); got {token_ids.dtype}.")

  @nn.compact
  def __call__(self, token_ids, mask):
    token_ids, mask = jnp.asarray(token_ids), jnp.asarray(mask)
    self._check(token_ids, mask)
    h = nn.Embed(self.vocab_size, self.d_model, name="shared")(token_ids).astype(jnp.float32)
    return T5Stack(self.d_model, self.d_kv, self.d_ff, self.num_layers, self.num_heads,
                   self.relative_attention_num_buckets, self.relative_attention_max_distance,
                   self.layer_norm_epsilon, self.feed_forward_proj, self.dtype, self.precision,
                   name="encoder")(h, mask > 0.5)

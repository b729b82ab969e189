"""Scaled dot-product attention for the transformer networks (DiT/PixArt, T5): one call into
jax.nn.dot_product_attention that picks the kernel and carries the matmul precision."""
from typing import Optional

import jax
import jax.numpy as jnp


def _precision_name(precision) -> str:
  """`precision` as jax.default_matmul_precision's name (the attention matmuls take no argument)."""
  if isinstance(precision, str):
    return precision
  if isinstance(precision, jax.lax.Precision):
    return precision.name.lower()
  raise ValueError(f"precision={precision!r}: attention takes one jax.lax.Precision or its name ('highest'), "
                   "not a per-operand pair.")


def _call(q, k, v, bias, mask, scale, implementation):
  if implementation is None:
    # jax itself picks XLA's kernel; cuDNN's fused (flash) one is much faster on GPUs in 16-bit floats.
    if jax.default_backend() == "gpu" and q.dtype in (jnp.bfloat16, jnp.float16):
      try:
        return jax.nn.dot_product_attention(q, k, v, bias=bias, mask=mask, scale=scale, implementation="cudnn")
      except (NotImplementedError, ValueError, RuntimeError):
        pass  # a configuration cuDNN refuses while tracing (head size, bias shape, dtype): XLA's
    implementation = "xla"
  return jax.nn.dot_product_attention(q, k, v, bias=bias, mask=mask, scale=scale, implementation=implementation)


def dot_product_attention(q, k, v, *, bias=None, mask=None, scale: Optional[float] = None,
                          implementation: Optional[str] = None, precision=None):
  """softmax(scale q k^T + bias, masked) v for q [N, T, H, D], k and v [N, S, H, D], mask broadcastable
  to [N, H, T, S] (True keeps). implementation: None (cuDNN on a GPU in bfloat16/float16 where it
  accepts the call, else XLA), 'xla' or 'cudnn'. precision: of the two matmuls (None: XLA's default)."""
  if precision is None:
    return _call(q, k, v, bias, mask, scale, implementation)
  with jax.default_matmul_precision(_precision_name(precision)):
    return _call(q, k, v, bias, mask, scale, implementation)

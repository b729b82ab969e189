"""FLOPs of a JAX function counted from its jaxpr: the dense matmuls and convolutions it runs.

XLA's cost analysis is backend-specific: after compilation for GPU, convolutions become cuDNN custom
calls that it does not count, so a conv net's utilisation would read near zero there. Counting
`dot_general` and `conv_general_dilated` in the traced program gives the same number on every backend,
includes recomputation that remat puts into the backward pass, and is what a utilisation figure against
a matmul peak should divide (elementwise work is not matmul work; on a CPU it is a few % of XLA's count).
"""
import math

import jax
from jax.extend import core as jex_core


def _subjaxprs(value):
  """The jaxprs held by one equation parameter (a jaxpr, a closed jaxpr, or a tuple of them)."""
  if isinstance(value, jex_core.ClosedJaxpr):
    return [value.jaxpr]
  if isinstance(value, jex_core.Jaxpr):
    return [value]
  if isinstance(value, (tuple, list)):
    return [j for v in value for j in _subjaxprs(v)]
  return []


def _dot_flops(eqn) -> float:
  (lhs_contract, _), _ = eqn.params["dimension_numbers"]
  lhs_shape = eqn.invars[0].aval.shape
  return 2.0 * math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs_shape[d] for d in lhs_contract)


def _valid_taps(in_size, out_size, window, stride, padding, lhs_dilation, rhs_dilation) -> int:
  """(output position, kernel tap) pairs along one spatial dimension that land on a real input element,
  not on padding or on a hole of a dilated input: zero taps are not work (XLA counts them the same way)."""
  pad_lo, _ = padding
  extent = (in_size - 1) * lhs_dilation
  count = 0
  for o in range(out_size):
    for k in range(window):
      i = o * stride + k * rhs_dilation - pad_lo
      count += 0 <= i <= extent and i % lhs_dilation == 0
  return count


def _conv_flops(eqn) -> float:
  # Each output element takes (input features per group) x (real taps) multiply-adds. Written against
  # the dimension numbers, so it also counts the transposed and weight-gradient convolutions.
  p = eqn.params
  dn = p["dimension_numbers"]
  lhs, rhs, out = (v.aval.shape for v in (eqn.invars[0], eqn.invars[1], eqn.outvars[0]))
  taps = math.prod(
      _valid_taps(lhs[dn.lhs_spec[2 + d]], out[dn.out_spec[2 + d]], rhs[dn.rhs_spec[2 + d]],
                  p["window_strides"][d], p["padding"][d], p["lhs_dilation"][d], p["rhs_dilation"][d])
      for d in range(len(dn.lhs_spec) - 2))
  return 2.0 * out[dn.out_spec[0]] * out[dn.out_spec[1]] * rhs[dn.rhs_spec[1]] * taps


# Primitives whose outputs are their one inner jaxpr's outputs, in order: an unused output is dead inside.
_PASSTHROUGH = {"pjit", "jit", "closed_call", "core_call", "remat", "checkpoint", "custom_jvp_call",
                "custom_vjp_call", "custom_vjp_call_jaxpr", "shard_map", "cond"}


def jaxpr_flops(jaxpr, used_outputs=None) -> float:
  """Matmul + convolution FLOPs of one execution of `jaxpr` (a Jaxpr or ClosedJaxpr), leaving out dead
  code (what XLA would not run), given which outputs are used (default all). A scan counts its body
  `length` times, a cond its costliest branch, a shard_map its body once per device; a while loop counts
  its body once (its trip count is not known before it runs)."""
  jaxpr = jaxpr.jaxpr if isinstance(jaxpr, jex_core.ClosedJaxpr) else jaxpr
  used_outputs = [True] * len(jaxpr.outvars) if used_outputs is None else used_outputs
  live = {v for v, used in zip(jaxpr.outvars, used_outputs) if used and isinstance(v, jex_core.Var)}
  total = 0.0
  for eqn in reversed(jaxpr.eqns):
    used = [v in live for v in eqn.outvars]
    if not any(used) and not eqn.effects:
      continue
    live.update(v for v in eqn.invars if isinstance(v, jex_core.Var))
    name = eqn.primitive.name
    if name == "dot_general":
      total += _dot_flops(eqn)
    elif name == "conv_general_dilated":
      total += _conv_flops(eqn)
    elif name == "cond":
      total += max(jaxpr_flops(b, used) for b in eqn.params["branches"])
    else:
      inner = [j for v in eqn.params.values() for j in _subjaxprs(v)]
      mask = used if name in _PASSTHROUGH and len(inner) == 1 and len(inner[0].outvars) == len(used) else None
      flops = sum(jaxpr_flops(j, mask) for j in inner)
      if name == "scan":
        flops *= eqn.params["length"]
      elif name == "shard_map":
        flops *= eqn.params["mesh"].size
      total += flops
  return total


def xla_flops(compiled):
  """XLA's own FLOP count of a compiled program (elementwise work included), or None where it has none
  to give, and on GPU, where it leaves out convolutions (cuDNN custom calls) and would mislead."""
  if jax.default_backend() == "gpu":
    return None
  try:
    analysis = compiled.cost_analysis()
  except Exception:  # pylint: disable=broad-except  # not every backend reports costs
    return None
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0] if analysis else None
  return float(analysis["flops"]) if analysis and "flops" in analysis else None


def count_flops(fn, *args, **kwargs) -> float:
  """Matmul + convolution FLOPs of fn(*args, **kwargs), traced (not compiled or run)."""
  return jaxpr_flops(jax.make_jaxpr(fn)(*args, **kwargs))


__all__ = ["count_flops", "jaxpr_flops", "xla_flops"]

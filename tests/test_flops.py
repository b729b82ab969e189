"""simjax.flops counts matmul and convolution FLOPs from the jaxpr; XLA:CPU's cost analysis of the same
program is the reference (on CPU it counts convolutions; on GPU it does not, which is why the counter exists)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from simjax.flops import count_flops
from simjax.flops import xla_flops as compiled_xla_flops
from simjax.networks import precond as precond_lib


def xla_flops(fn, *args):
  cost = jax.jit(fn).lower(*args).cost_analysis()
  return float((cost[0] if isinstance(cost, list) else cost)["flops"])


def normal(seed, shape):
  return jax.random.normal(jax.random.key(seed), shape)


def test_dot_general_batched():
  a, b = normal(0, (3, 5, 7)), normal(1, (3, 7, 4))
  fn = lambda a, b: jnp.einsum("bij,bjk->bik", a, b)
  assert count_flops(fn, a, b) == 2 * 3 * 5 * 7 * 4 == xla_flops(fn, a, b)
  assert compiled_xla_flops(jax.jit(fn).lower(a, b).compile()) == 2 * 3 * 5 * 7 * 4  # CPU: XLA's own count


@pytest.mark.parametrize("stride,padding,lhs_dil,rhs_dil,groups", [
    (1, "SAME", 1, 1, 1), (2, "SAME", 1, 1, 1), (1, "VALID", 1, 1, 1),
    (1, ((2, 1), (0, 2)), 2, 1, 1), (1, "SAME", 1, 2, 1), (1, "SAME", 1, 1, 2)])
def test_convolution_and_its_gradients_match_xla(stride, padding, lhs_dil, rhs_dil, groups):
  """Forward, input gradient and weight gradient (batch and feature grouping, dilations, asymmetric
  padding): zero taps on padding or dilation holes are not counted, exactly as XLA counts them."""
  x, w = normal(0, (4, 9, 9, 8)), normal(1, (3, 3, 8 // groups, 12))
  conv = lambda x, w: jax.lax.conv_general_dilated(
      x, w, (stride, stride), padding, lhs_dilation=(lhs_dil,) * 2, rhs_dilation=(rhs_dil,) * 2,
      dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=groups)
  ct = normal(2, conv(x, w).shape)
  grads = lambda x, w: jax.vjp(conv, x, w)[1](ct)  # the forward conv is dead code here
  assert count_flops(conv, x, w) == xla_flops(conv, x, w)
  assert count_flops(grads, x, w) == xla_flops(grads, x, w)
  assert count_flops(grads, x, w) > count_flops(conv, x, w)


def test_control_flow_and_dead_code():
  a = normal(0, (16, 16))
  mm = 2 * 16**3
  assert count_flops(lambda a: (a @ a, a)[1], a) == 0  # dead
  assert count_flops(jax.jit(lambda a: a @ a @ a), a) == 2 * mm
  scanned = lambda a: jax.lax.scan(lambda c, _: (c @ a, None), a, None, length=5)[0]
  assert count_flops(scanned, a) == 5 * mm
  branchy = lambda a: jax.lax.cond(a[0, 0] > 0, lambda a: a @ a @ a, lambda a: a @ a, a)
  assert count_flops(branchy, a) == 2 * mm


def test_remat_counts_recomputation():
  a = normal(0, (16, 16))
  mm = 2 * 16**3
  f = lambda x: jnp.sum(jnp.tanh(jnp.tanh(x @ a) @ a))
  # value_and_grad keeps the primal forward alive; with grad alone it is dead and only the
  # recomputation inside the backward remains (counted once either way).
  assert count_flops(jax.value_and_grad(f), a) == 4 * mm
  assert count_flops(jax.value_and_grad(jax.checkpoint(f)), a) == 6 * mm
  assert count_flops(jax.grad(jax.checkpoint(f)), a) == 4 * mm
  # XLA adds the elementwise work (tanh and its derivative): a few %.
  assert count_flops(jax.value_and_grad(jax.checkpoint(f)), a) == pytest.approx(
      xla_flops(jax.value_and_grad(jax.checkpoint(f)), a), rel=0.1)


def test_songunet_gradient_close_to_xla():
  """A whole conv net's parameter gradient: below XLA's count only by the elementwise work XLA adds."""
  arch = precond_lib.edm_preset_arch("ddpmpp", img_resolution=8, img_channels=1, model_channels=16,
                                     channel_mult=(1, 2), num_blocks=1, attn_resolutions=(4,), augment_dim=0)
  module = precond_lib.build_precond(arch)
  params = jax.eval_shape(lambda: precond_lib.init_params(module, jax.random.key(1)))
  params = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), params)  # only shapes matter here
  x, sigma = normal(0, (4, 8, 8, 1)), jnp.full((4,), 1.0)
  loss = lambda p: jnp.sum(module.apply(p, x, sigma) ** 2)
  ours, xla = count_flops(jax.grad(loss), params), xla_flops(jax.grad(loss), params)
  assert 0.85 * xla < ours <= xla, (ours, xla)
  np.testing.assert_equal(count_flops(jax.jit(jax.grad(loss)), params), ours)

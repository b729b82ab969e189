"""Speed and memory of EDM's CIFAR-10 DDPM++ (55.7M parameters) as a simjax denoiser.

    python benchmarks/songunet_speed.py [--batch 8] [--dtype float32|bfloat16] [--label_dim 0]

Cases: `forward` (D(x, sigma), eval mode) and `forward_backward` (gradient of an EDM denoising loss
w.r.t. all parameters, train mode with dropout). For each: ahead-of-time compile time, time per
image (median over --iters runs after one warm-up), and XLA's memory analysis of the compiled
program (peak ~ arguments + outputs + temporaries - aliased). Prints one JSON line per case.
Parameters are random (drawn with numpy: no jax.random init to compile); they do not affect timing.
"""
import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from simjax.diffusion.edm import edm_loss_weight
from simjax.networks.precond import build_precond, count_params, edm_preset_arch, param_shapes


def _random_variables(module, seed=0):
  rng = np.random.default_rng(seed)
  return jax.tree_util.tree_map(lambda leaf: jnp.asarray(0.05 * rng.standard_normal(leaf.shape, np.float32)),
                                param_shapes(module))


def _memory(compiled):
  analysis = compiled.memory_analysis()
  if analysis is None:
    return None
  sizes = {name: int(getattr(analysis, f"{name}_size_in_bytes", 0) or 0)
           for name in ("argument", "output", "temp", "alias", "generated_code")}
  sizes["peak_estimate"] = sizes["argument"] + sizes["output"] + sizes["temp"] - sizes["alias"]
  return {f"{name}_mib": round(size / 2**20, 1) for name, size in sizes.items()}


def _time(fn, args, iters):
  jax.block_until_ready(fn(*args))  # warm-up
  times = []
  for _ in range(iters):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
  parser.add_argument("--label_dim", type=int, default=0)
  parser.add_argument("--iters", type=int, default=3)
  parser.add_argument("--precision", choices=("default", "highest"), default="default",
                      help="matmul/conv precision for float32 (GPUs use TF32 under 'default')")
  parser.add_argument("--cases", default="forward,forward_backward")
  args = parser.parse_args()

  dtype = jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32
  precision = None if args.precision == "default" else jax.lax.Precision.HIGHEST
  arch = edm_preset_arch("ddpmpp", label_dim=args.label_dim)
  module = build_precond(arch, dtype=dtype, precision=precision)
  variables = _random_variables(module)
  rng = np.random.default_rng(1)
  x0 = jnp.asarray(rng.uniform(-1, 1, (args.batch, 32, 32, 3)).astype(np.float32))
  sigma = jnp.asarray(np.exp(-1.2 + 1.2 * rng.standard_normal(args.batch)).astype(np.float32))
  noise = jnp.asarray(rng.standard_normal(x0.shape).astype(np.float32))
  labels = jax.nn.one_hot(jnp.arange(args.batch) % args.label_dim, args.label_dim) if args.label_dim else None
  augment = jnp.zeros((args.batch, 9), jnp.float32)

  def forward(variables, x, sigma):
    return module.apply(variables, x, sigma, labels, augment)

  def dsm_loss(params, x0, sigma, noise, key):
    denoised = module.apply({"params": params}, x0 + sigma[:, None, None, None] * noise, sigma, labels, augment,
                            train=True, rngs={"dropout": key})
    return jnp.mean(edm_loss_weight(sigma)[:, None, None, None] * jnp.square(denoised - x0))

  def forward_backward(variables, x0, sigma, noise):
    return jax.value_and_grad(dsm_loss)(variables["params"], x0, sigma, noise, jax.random.key(0))

  cases = {"forward": (forward, (variables, x0 + sigma[:, None, None, None] * noise, sigma)),
           "forward_backward": (forward_backward, (variables, x0, sigma, noise))}
  for name in args.cases.split(","):
    fn, fn_args = cases[name]
    start = time.perf_counter()
    compiled = jax.jit(fn).lower(*fn_args).compile()
    compile_s = time.perf_counter() - start
    step_s = _time(compiled, fn_args, args.iters)
    print(json.dumps({
        "case": name, "arch": "edm_ddpmpp_cifar10", "params": count_params(variables), "batch": args.batch,
        "dtype": args.dtype, "precision": args.precision, "device": jax.devices()[0].device_kind,
        "compile_s": round(compile_s, 2), "step_s": round(step_s, 4),
        "ms_per_image": round(1e3 * step_s / args.batch, 3), "memory": _memory(compiled),
    }), flush=True)


if __name__ == "__main__":
  main()

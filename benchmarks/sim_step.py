"""Benchmarks the SIM iteration against the sum of its necessary network passes.

  python benchmarks/sim_step.py --size=digits --batch=128            # one JSON line per case
  python benchmarks/sim_step.py --size=cifar10 --batch=8 --quick
  python benchmarks/sim_step.py --size=cifar10 --batch=128 --dtype=bfloat16   (GPU)

Per case: compile time; median ms per fake-score step, generator step and full iteration; images/s;
the sum of parts (generator fwd+bwd, teacher fwd+vjp, fake fwd+vjp, generator fwd + fake fwd+bwd,
each its own jitted function, timed in the same run) and iteration / sum of parts; FLOPs per
iteration from XLA's cost analysis and achieved FLOP/s as a fraction of this machine's measured
dense-matmul peak; peak device memory from XLA's memory analysis.
"""
import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from simjax.networks import precond as precond_lib  # noqa: E402
from simjax.parallel import mesh as mesh_lib  # noqa: E402
from simjax.pipelines.image_defaults import base_config  # noqa: E402
from simjax.training import sim_steps  # noqa: E402
from simjax.training import state as state_lib  # noqa: E402
from simjax.training.networks import Denoiser, DistillNetworks  # noqa: E402

SIZES = {
    "digits": dict(img_resolution=8, img_channels=1, model_channels=32, channel_mult=(1, 2), num_blocks=1,
                   attn_resolutions=(4,), augment_dim=0, dropout=0.1, channel_mult_emb=2),
    "cifar10": dict(img_resolution=32, img_channels=3, augment_dim=9, dropout=0.13),  # EDM's DDPM++ (55.7M)
}


def timed(fn, *args, repeats=5, warmup=1):
  for _ in range(warmup):
    jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def matmul_peak(dtype, n=2048, repeats=5):
  a = jnp.ones((n, n), dtype)
  f = jax.jit(lambda a: a @ a)
  return 2 * n**3 / timed(f, a, repeats=repeats)


def random_params(module, seed=0):
  """EDM-scaled random weights drawn with numpy (jax init compiles slowly on CPU and is not timed here)."""
  shapes = precond_lib.param_shapes(module)
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: jnp.asarray(rng.standard_normal(s.shape).astype(np.float32) * 0.05), shapes)


def compile_stats(jitted, *args):
  t0 = time.perf_counter()
  compiled = jitted.lower(*args).compile()
  seconds = time.perf_counter() - t0
  cost = compiled.cost_analysis() or {}
  cost = cost[0] if isinstance(cost, list) else cost
  mem = compiled.memory_analysis()
  peak = None
  if mem is not None:
    peak = int(getattr(mem, "peak_memory_in_bytes", 0) or (mem.temp_size_in_bytes + mem.argument_size_in_bytes
                                                           + mem.output_size_in_bytes))
  return compiled, seconds, float(cost.get("flops", 0.0)), peak


def run_case(size, batch, dtype, repeats, config_overrides=()):
  arch = precond_lib.edm_preset_arch("ddpmpp", label_dim=0, **SIZES[size])
  module = precond_lib.build_precond(arch, dtype=jnp.dtype(dtype))
  variables = random_params(module)
  shape = (arch["img_resolution"], arch["img_resolution"], arch["img_channels"])
  nets = DistillNetworks(generator=Denoiser(module), fake=Denoiser(module), teacher=Denoiser(module),
                         data_shape=shape, label_dim=0, sigma_init=2.5)
  cfg = base_config()
  cfg.batch_size = batch
  for k, v in config_overrides:
    cfg[k] = v
  mesh = mesh_lib.make_mesh((1, 1), devices=jax.devices()[:1])
  params = variables["params"]
  optimizers = {"generator": state_lib.make_optimizer(cfg.optim.generator), "fake": state_lib.make_optimizer(cfg.optim.fake)}
  state = state_lib.new_state({"generator": params, "fake": params}, optimizers, ("generator",))
  specs = {"generator": jax.tree.map(lambda _: jax.sharding.PartitionSpec(), params),
           "fake": jax.tree.map(lambda _: jax.sharding.PartitionSpec(), params),
           "consts": jax.tree.map(lambda _: jax.sharding.PartitionSpec(), {"teacher": variables, "generator": {}, "fake": {}})}
  consts = {"teacher": variables, "generator": {}, "fake": {}}
  results = {"size": size, "batch": batch, "dtype": dtype, "backend": jax.default_backend(),
             "device": str(jax.devices()[0].device_kind), "params_per_network": precond_lib.count_params(params)}

  full = jax.jit(sim_steps.make_sim_iteration(nets, cfg, mesh, specs, optimizers, with_generator=True))
  fake_only = jax.jit(sim_steps.make_sim_iteration(nets, cfg, mesh, specs, optimizers, with_generator=False))
  full_c, full_compile, full_flops, full_peak = compile_stats(full, state, consts)
  fake_c, fake_compile, fake_flops, _ = compile_stats(fake_only, state, consts)
  t_full = timed(full_c, state, consts, repeats=repeats)
  t_fake = timed(fake_c, state, consts, repeats=repeats)

  # The necessary passes, each alone.
  key = jax.random.key(0)
  z = jax.random.normal(key, (batch,) + shape)
  sigma = jnp.full((batch,), 1.0)
  cot = jax.random.normal(jax.random.fold_in(key, 1), (batch,) + shape)
  apply = lambda p, x, s: module.apply({"params": p}, x, s, train=False)
  gen_fwd_bwd = jax.jit(lambda p: jax.vjp(lambda q: apply(q, 2.5 * z, jnp.full((batch,), 2.5)), p)[1](cot))
  net_fwd_vjp = jax.jit(lambda p, x: jax.vjp(lambda v: apply(p, v, sigma), x)[1](cot))
  def dsm_part(p_gen, p_fake):
    x0 = jax.lax.stop_gradient(apply(p_gen, 2.5 * z, jnp.full((batch,), 2.5)))
    return jax.grad(lambda q: jnp.sum((apply(q, x0 + sigma[:, None, None, None] * cot, sigma) - x0) ** 2))(p_fake)
  dsm_j = jax.jit(dsm_part)
  parts = {
      "generator_fwd_bwd": timed(gen_fwd_bwd, params, repeats=repeats),
      "teacher_fwd_vjp": timed(net_fwd_vjp, params, z, repeats=repeats),
      "fake_fwd_vjp": timed(net_fwd_vjp, params, z, repeats=repeats),
      "generator_fwd_fake_fwd_bwd": timed(dsm_j, params, params, repeats=repeats),
  }
  sum_parts = sum(parts.values())
  peak = matmul_peak(jnp.dtype(dtype))
  results.update(
      compile_seconds=full_compile + fake_compile,
      ms_fake_step=1e3 * t_fake, ms_generator_step=1e3 * (t_full - t_fake), ms_iteration=1e3 * t_full,
      images_per_sec=batch / t_full,
      ms_parts={k: 1e3 * v for k, v in parts.items()}, ms_sum_of_parts=1e3 * sum_parts,
      iteration_over_sum_of_parts=t_full / sum_parts,
      flops_per_iteration=full_flops, achieved_flops_per_sec=full_flops / t_full,
      matmul_peak_flops_per_sec=peak, fraction_of_matmul_peak=full_flops / t_full / peak,
      peak_memory_bytes=full_peak)
  return results


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--size", choices=sorted(SIZES), action="append")
  ap.add_argument("--batch", type=int, action="append")
  ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  ap.add_argument("--repeats", type=int, default=5)
  ap.add_argument("--quick", action="store_true", help="2 timed repeats, smallest batch")
  args = ap.parse_args()
  sizes = args.size or ["digits", "cifar10"]
  batches = args.batch or [None]
  repeats = 2 if args.quick else args.repeats
  for size in sizes:
    for batch in batches:
      b = batch or {"digits": 128, "cifar10": 8}[size]
      print(json.dumps(run_case(size, b, args.dtype, repeats)), flush=True)


if __name__ == "__main__":
  main()

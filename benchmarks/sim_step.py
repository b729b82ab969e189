"""Benchmarks the SIM iteration against the sum of its necessary network passes, per perf variant.

  python benchmarks/sim_step.py --config=configs/digits.py                  # one JSON line per case
  python benchmarks/sim_step.py --config=configs/cifar10.py --batch=4 --quick
  python benchmarks/sim_step.py --config=configs/cifar10.py --batch=128 --variant=f32 --variant=bf16   (GPU)
  python benchmarks/sim_step.py --config=configs/cifar10.py --memory --batch=8 --batch=32 --variant=f32 \
      --variant=remat_blocks --variant=remat_full                            # peak memory against batch
  python benchmarks/sim_step.py --config=configs/imagenet64.py --batch=1 --iteration_only   # full size on a CPU

The network is the config's teacher architecture (`teacher.arch`), with EDM-scaled random weights; the
batch is the config's unless --batch is given. A variant is a set of `config.perf` switches (VARIANTS),
so every optimisation is measured against the plain step in the same process.

Per case: compile time; median ms per fake-score step, generator step and full iteration; images/s;
the sum of parts -- the necessary passes each as its own jitted function, in the same dtype and remat
as the step: generator fwd+bwd (train mode, dropout), teacher fwd+vjp, fake fwd+vjp, and the DSM
step's generator fwd + fake fwd+bwd -- and iteration / sum of parts (taken within each timed round,
median and range over the rounds: on a shared machine the rounds drift apart by more than the
overhead being measured); FLOPs per iteration (matmuls and convolutions counted from the program,
recomputation included, the same on every backend; XLA's own cost analysis beside it, which on GPU
leaves out the cuDNN convolutions) and model FLOPs (the parts' FLOPs); achieved FLOP/s as a fraction
of this machine's dense-matmul peak, timed in the same rounds (in the compute dtype; on GPU "float32"
matmuls run as TF32 by XLA's default precision, and so does the peak), and model-FLOPs utilisation
against it; peak device memory from XLA's memory analysis and the process's peak resident host
memory. `--memory` only compiles the generator step (where the three networks' activations meet)
and reports its memory. `--iteration_only` compiles and times the iteration alone (no parts, no matmul probe):
the full-size networks of configs/imagenet64.py and configs/edm2_img512.py on a small machine.
"""
import argparse
import concurrent.futures
import functools
import importlib.util
import json
import resource
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from simjax import xla_cpu  # noqa: E402
from simjax.flops import jaxpr_flops, xla_flops  # noqa: E402
from simjax.networks import precond as precond_lib  # noqa: E402
from simjax.parallel import mesh as mesh_lib  # noqa: E402
from simjax.pipelines.image_teacher import teacher_arch_from_config  # noqa: E402
from simjax.training import perf as perf_lib  # noqa: E402
from simjax.training import sim_steps  # noqa: E402
from simjax.training import state as state_lib  # noqa: E402
from simjax.training.roles import Denoiser, DistillNetworks  # noqa: E402
from simjax.conditioning import CondSpace  # noqa: E402

ALIASES = {"digits": "configs/digits.py", "cifar10": "configs/cifar10.py"}
_ALL = lambda policy: {f"remat.{n}": policy for n in perf_lib.NETWORKS}
VARIANTS = {
    "f32": {"compute_dtype": "float32"},
    "bf16": {"compute_dtype": "bfloat16"},
    "remat_blocks": {"compute_dtype": "float32", **_ALL("blocks")},
    "remat_full": {"compute_dtype": "float32", **_ALL("full")},
    # Teacher and fake recomputed, the generator's activations kept: one network's recompute cost.
    "remat_teacher_fake": {"compute_dtype": "float32", "remat.teacher": "full", "remat.fake": "full"},
    "fused": {"compute_dtype": "float32", "fuse_teacher_fake": True},
    "bf16_fused": {"compute_dtype": "bfloat16", "fuse_teacher_fake": True},
}


def load_config(path):
  spec = importlib.util.spec_from_file_location("bench_config", REPO / path if not Path(path).is_absolute() else path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def apply_variant(config, variant):
  for key, value in VARIANTS[variant].items():
    if key.startswith("remat."):
      config.perf.remat[key.split(".", 1)[1]] = value
    else:
      config.perf[key] = value
  return config


def timed_interleaved(fns, repeats=5, min_seconds=0.2):
  """Seconds per call of each fn() in `fns`, one list per fn with one entry per round, measured in
  interleaved rounds (every fn once per round, in alternating order) so that load drift on a shared
  machine hits all of them alike and ratios taken within a round hold. Each measurement repeats a
  fast fn until it covers `min_seconds`."""
  calls = {}
  for name, fn in fns.items():
    jax.block_until_ready(fn())  # warm-up
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    calls[name] = max(1, int(min_seconds / max(time.perf_counter() - t0, 1e-6)))
  times = {name: [] for name in fns}
  for r in range(repeats):
    # Every other round runs backwards, so a drift during a round does not always favour the same fns.
    for name, fn in list(fns.items())[::-1 if r % 2 else 1]:
      t0 = time.perf_counter()
      for _ in range(calls[name]):
        out = fn()
      jax.block_until_ready(out)
      times[name].append((time.perf_counter() - t0) / calls[name])
  return times


def round_ratios(times, numerator, denominator):
  """sum(times[n]) / sum(times[d]) within each round: a ratio of calls made seconds apart, which a
  shared machine's drift over minutes does not move as it moves a ratio of separate medians."""
  rounds = range(len(next(iter(times.values()))))
  return [sum(times[n][r] for n in numerator) / sum(times[d][r] for d in denominator) for r in rounds]


def matmul_probe(dtype):
  """(fn, FLOPs per call): a dense matmul in `dtype` that runs at this machine's peak, the denominator
  of every utilisation figure. It is timed in the same interleaved rounds as the step, so each round's
  fraction of peak compares the two at the same moment: a shared machine's speed drifts by more than
  a third over minutes. On an accelerator the product is large and chained 10 deep, so dispatch
  latency does not hide the peak."""
  n, chain = (2048, 1) if jax.default_backend() == "cpu" else (8192, 10)
  a = jax.random.normal(jax.random.key(0), (n, n), dtype) / n**0.5
  f = jax.jit(lambda a: functools.reduce(lambda x, _: x @ a, range(chain), a))
  return functools.partial(f, a), chain * 2 * n**3


def random_params(module, seed=0):
  """EDM-scaled random weights drawn with numpy (jax init compiles slowly on CPU and is not timed here)."""
  shapes = precond_lib.param_shapes(module)
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: jnp.asarray(rng.standard_normal(s.shape).astype(np.float32) * 0.05), shapes)


def peak_bytes(mem):
  """Peak device memory of a compiled program: arguments + outputs (less donated aliases) + XLA's temp
  allocation (live-range packed). XLA:CPU's own `peak_memory_in_bytes` leaves out temporaries."""
  if mem is None:
    return None
  total = mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes + mem.temp_size_in_bytes
  return int(max(total, getattr(mem, "peak_memory_in_bytes", 0) or 0))


def compile_stats(jitted, *args):
  """(compiled, compile seconds, FLOPs, XLA's FLOPs, peak bytes) of jitted(*args), traced once. FLOPs are
  the matmuls' and convolutions' counted from the jaxpr (`simjax.flops`), the same on every backend;
  XLA's count of the compiled program is reported beside them (None on GPU, see `xla_flops`)."""
  t0 = time.perf_counter()
  traced = jitted.trace(*args)
  compiled = traced.lower().compile()
  seconds = time.perf_counter() - t0
  return compiled, seconds, jaxpr_flops(traced.jaxpr), xla_flops(compiled), peak_bytes(compiled.memory_analysis())


def build(config, batch, variant):
  """(config, nets, params, state, consts, step specs, optimizers, mesh) for one case on one device."""
  config = apply_variant(config, variant)
  config.batch_size = batch
  arch = teacher_arch_from_config(config)
  module = precond_lib.build_precond(arch)
  variables = random_params(module)
  nets = DistillNetworks(generator=Denoiser(module), fake=Denoiser(module), teacher=Denoiser(module),
                         data_shape=(arch["img_resolution"],) * 2 + (arch["img_channels"],),
                         cond_space=CondSpace(label_dim=int(arch.get("label_dim", 0))), sigma_init=float(config.sigma_init))
  params = variables["params"]
  optimizers = {name: state_lib.make_optimizer(config.optim[name]) for name in ("generator", "fake")}
  # Built by a jitted function so that every leaf is its own buffer (the step donates them all).
  state = jax.jit(lambda p: state_lib.new_state({"generator": p, "fake": p}, optimizers, ("generator",)))(params)
  consts = {"teacher": variables, "generator": {}, "fake": {}}
  rep = lambda t: jax.tree.map(lambda _: P(), t)
  specs = {"generator": rep(params), "fake": rep(params), "consts": rep(consts)}
  mesh = mesh_lib.make_mesh((1, 1), devices=jax.devices()[:1])
  return config, nets, params, state, consts, specs, optimizers, mesh


def necessary_passes(config, nets, params, batch):
  """The passes a SIM iteration cannot avoid, each its own jitted function, with the step's
  compute dtype, remat and dropout: {name: (fn, args)}. Every input (latents, noise levels, noise,
  cotangents, dropout key) is an argument, as in the step: a constant input would let XLA fold the
  preconditioning and noise embedding away and make a part cheaper than any real step."""
  opts = perf_lib.resolve(config)
  gen_nets = perf_lib.configure_networks(nets, opts)
  fake_nets = perf_lib.configure_networks(nets, opts, remat=False)
  keys = jax.random.split(jax.random.key(0), 3)
  labels = None
  z = jax.random.normal(keys[0], (batch,) + nets.data_shape)
  sigma = jnp.exp(jax.random.normal(keys[1], (batch,)) * float(config.fake_p_std) + float(config.fake_p_mean))
  cot = jax.random.normal(keys[2], z.shape)
  rng = jax.random.key(1)

  def generator_fwd_bwd(p, z, cot, rng):
    generate = perf_lib.maybe_remat(lambda q: gen_nets.generate(q, {}, z, labels, train=True, rng=rng),
                                    opts.remat["generator"])
    return jax.vjp(generate, p)[1](cot)

  def fwd_vjp(denoiser, policy):
    return jax.jit(lambda p, x, s, cot: jax.vjp(
        perf_lib.maybe_remat(lambda v: denoiser.apply(p, {}, v, s, labels), policy), x)[1](cot))

  def dsm_step(p_gen, p_fake, z, s, eps, rng):
    x0 = jax.lax.stop_gradient(fake_nets.generate(p_gen, {}, z, labels, train=True, rng=rng))
    x_t = x0 + s[:, None, None, None] * eps
    loss = lambda q: jnp.sum((fake_nets.fake.apply(q, {}, x_t, s, labels, train=True, rng=rng) - x0) ** 2)
    return jax.grad(loss)(p_fake)

  passes = {
      "generator_fwd_bwd": (jax.jit(generator_fwd_bwd), (params, z, cot, rng)),
      "teacher_fwd_vjp": (fwd_vjp(gen_nets.teacher, opts.remat["teacher"]), (params, z, sigma, cot)),
      "fake_fwd_vjp": (fwd_vjp(gen_nets.fake, opts.remat["fake"]), (params, z, sigma, cot)),
      "generator_fwd_fake_fwd_bwd": (jax.jit(dsm_step), (params, params, z, sigma, cot, rng)),
  }
  if opts.fuse_teacher_fake:  # the fused call replaces the two separate ones
    del passes["teacher_fwd_vjp"], passes["fake_fwd_vjp"]
    pair = lambda p, x, s: perf_lib.maybe_remat(
        lambda v: perf_lib.paired_denoise(gen_nets.teacher.module, {"params": p}, {"params": p}, v, s, labels),
        opts.remat["teacher"])(x)
    passes["teacher_and_fake_fwd_vjp"] = (
        jax.jit(lambda p, x, s, cot: jax.vjp(lambda v: pair(p, v, s), x)[1]((cot, cot))), (params, z, sigma, cot))
  return passes


def case_header(path, config, variant, batch, params):
  opts = perf_lib.resolve(config)
  return {"config": path, "variant": variant, "batch": batch,
          "compute_dtype": jnp.dtype(opts.compute_dtype).name, "remat": opts.remat,
          "fuse_teacher_fake": opts.fuse_teacher_fake, "reuse_host_memory": xla_cpu.is_applied(),
          "backend": jax.default_backend(),
          "device": str(jax.devices()[0].device_kind), "params_per_network": precond_lib.count_params(params)}


def run_case(path, batch, variant, repeats, iteration_only=False):
  config = load_config(path)
  batch = batch or int(config.batch_size)
  config, nets, params, state, consts, specs, optimizers, mesh = build(config, batch, variant)
  results = case_header(path, config, variant, batch, params)
  make = lambda with_gen: jax.jit(sim_steps.make_sim_iteration(nets, config, mesh, specs, optimizers,
                                                               with_generator=with_gen), donate_argnums=0)
  full_c, full_compile, full_flops, full_xla_flops, full_peak = compile_stats(make(True), state, consts)
  if iteration_only:
    return dict(results, **iteration_timing(full_c, full_compile, full_flops, full_peak, state, consts, batch, repeats))
  fake_c, fake_compile, _, _, fake_peak = compile_stats(make(False), state, consts)
  # Donated: each call consumes its state, so the timed calls feed the result back in.
  holder = {"full": state, "fake": jax.tree.map(jnp.copy, state)}
  def run(name, compiled):
    holder[name], _ = compiled(holder[name], consts)
    return holder[name].step
  fns = {"iteration": lambda: run("full", full_c), "fake_step": lambda: run("fake", fake_c)}
  passes = necessary_passes(config, nets, params, batch)
  # The passes' compile times are not reported, so they compile concurrently (XLA compiles off the GIL).
  with concurrent.futures.ThreadPoolExecutor(len(passes)) as pool:
    compiled = dict(zip(passes, pool.map(lambda fa: compile_stats(fa[0], *fa[1]), passes.values())))
  model_flops = sum(compiled[name][2] for name in passes)
  fns.update({name: functools.partial(compiled[name][0], *args) for name, (_, args) in passes.items()})
  matmul, matmul_flops = matmul_probe(perf_lib.resolve(config).compute_dtype)
  fns["matmul"] = matmul
  times = timed_interleaved(fns, repeats=repeats)
  med = {name: statistics.median(t) for name, t in times.items()}
  t_full, t_fake = med["iteration"], med["fake_step"]
  t_gen = statistics.median(a - b for a, b in zip(times["iteration"], times["fake_step"]))
  parts = {name: med[name] for name in passes}
  sum_parts = sum(parts.values())
  ratios = round_ratios(times, ["iteration"], list(passes))
  peak = matmul_flops / med["matmul"]
  # Per round: (step FLOP/s) / (matmul FLOP/s) = FLOPs ratio * (matmul time / step time).
  fraction = statistics.median(round_ratios(times, ["matmul"], ["iteration"])) * full_flops / matmul_flops
  results.update(
      compile_seconds=full_compile + fake_compile,
      ms_fake_step=1e3 * t_fake, ms_generator_step=1e3 * t_gen, ms_iteration=1e3 * t_full,
      images_per_sec=batch / t_full,
      ms_parts={k: 1e3 * v for k, v in parts.items()}, ms_sum_of_parts=1e3 * sum_parts,
      iteration_over_sum_of_parts=statistics.median(ratios),
      iteration_over_sum_of_parts_range=[min(ratios), max(ratios)],
      flops_per_iteration=full_flops, xla_flops_per_iteration=full_xla_flops,
      model_flops_per_iteration=model_flops,
      achieved_flops_per_sec=full_flops / t_full, matmul_peak_flops_per_sec=peak,
      matmul_peak_flops_per_sec_range=[matmul_flops / max(times["matmul"]), matmul_flops / min(times["matmul"])],
      fraction_of_matmul_peak=fraction, model_flops_utilisation=fraction * model_flops / full_flops,
      peak_memory_bytes=max(full_peak or 0, fake_peak or 0) or None,
      # The process's, over every case so far (KiB on Linux): what perf.reuse_host_memory trades for speed.
      process_peak_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
  return results


def iteration_timing(compiled, compile_seconds, flops, peak, state, consts, batch, repeats):
  """Seconds per SIM iteration (median of `repeats` after one warm-up call), hours per Mimg, memory."""
  state, _ = compiled(state, consts)  # warm-up
  jax.block_until_ready(state)
  seconds = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    state, _ = compiled(state, consts)
    jax.block_until_ready(state)
    seconds.append(time.perf_counter() - t0)
  per_iteration = statistics.median(seconds)
  return dict(compile_seconds=compile_seconds, ms_iteration=1e3 * per_iteration,
              ms_iteration_range=[1e3 * min(seconds), 1e3 * max(seconds)], images_per_sec=batch / per_iteration,
              hours_per_mimg=1e6 / (batch / per_iteration) / 3600, flops_per_iteration=flops,
              achieved_flops_per_sec=flops / per_iteration, peak_memory_bytes=peak,
              process_peak_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)


def memory_case(path, batch, variant):
  """Peak memory of the generator step alone (compile only): what bounds the batch per chip."""
  config = load_config(path)
  batch = batch or int(config.batch_size)
  config, nets, params, state, consts, specs, _, mesh = build(config, batch, variant)
  grads = sim_steps.make_step_grads(nets, config, mesh, specs).generator
  z = jnp.zeros((batch,) + nets.data_shape)
  args = (params, state.params["fake"], consts, z, None, jnp.ones((batch,)), z, jax.random.key(0))
  compiled, seconds, flops, _, peak = compile_stats(jax.jit(grads), *args)
  results = case_header(path, config, variant, batch, params)
  results.update(generator_step_peak_memory_bytes=peak,
                 generator_step_temp_bytes=int(compiled.memory_analysis().temp_size_in_bytes),
                 generator_step_flops=flops, compile_seconds=seconds)
  return results


def apply_host_memory_mode(config, mode: str):
  """perf.reuse_host_memory=`mode` for the whole process, as `simjax.main` applies it: once, before anything
  is compiled or run."""
  config.perf.reuse_host_memory = mode
  perf_lib.before_backend_start(config)
  perf_lib.apply_process_options(perf_lib.resolve(config))


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--config", action="append", help="config file (repeatable); default: digits and cifar10")
  ap.add_argument("--size", choices=sorted(ALIASES), action="append", help="shorthand for a --config")
  ap.add_argument("--batch", type=int, action="append", help="global batch (repeatable); default: the config's")
  ap.add_argument("--variant", choices=sorted(VARIANTS), action="append", help="perf variant (repeatable); default f32")
  ap.add_argument("--dtype", choices=["float32", "bfloat16"], help="shorthand for --variant=f32/bf16")
  ap.add_argument("--repeats", type=int, default=5, help="timed rounds (each times every function once)")
  ap.add_argument("--memory", action="store_true", help="only compile the generator step and report its memory")
  ap.add_argument("--quick", action="store_true", help="2 timed rounds")
  ap.add_argument("--iteration_only", action="store_true", help="time the iteration alone (full-size networks)")
  ap.add_argument("--reuse_host_memory", choices=perf_lib.HOST_MEMORY_MODES, default="auto",
                  help="perf.reuse_host_memory for the whole process (auto: on for the CPU backend)")
  args = ap.parse_args()
  paths = (args.config or []) + [ALIASES[s] for s in (args.size or [])] or [ALIASES["digits"], ALIASES["cifar10"]]
  apply_host_memory_mode(load_config(paths[0]), args.reuse_host_memory)
  variants = args.variant or [{"float32": "f32", "bfloat16": "bf16"}.get(args.dtype, "f32")]
  repeats = 2 if args.quick else args.repeats
  for path in paths:
    for batch in args.batch or [None]:
      for variant in variants:
        row = (memory_case(path, batch, variant) if args.memory else
               run_case(path, batch, variant, repeats, iteration_only=args.iteration_only))
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
  main()

"""Steps/s of one SIM iteration (fake-score step + generator step) on 1 and 8 devices at the same global batch.

    python benchmarks/scaling.py                                   # gmm and cifar10 on 1 and 8 CPU devices
    python benchmarks/scaling.py --cases=gmm --devices=1,2,4,8 --gmm_batch=1024
    python benchmarks/scaling.py --cases=cifar10 --devices=1 --platform=default   # on this machine's accelerator

Cases:
  gmm      the configs/gmm2d.py networks (residual MLP, 3 x 256) on the analytic 2-D mixture teacher.
  cifar10  EDM's CIFAR-10 DDPM++ (SongUNet, 55.7M parameters) as teacher, generator and fake score,
           unconditional 32x32x3, float32; random weights (they do not affect timing).
Each (case, device count) runs in its own subprocess, because the number of fake CPU devices is fixed
when jax is imported (XLA_FLAGS=--xla_force_host_platform_device_count). One JSON line per case:
compile seconds, seconds per iteration (median after one warm-up), iterations/s, images/s, and XLA's
FLOP count of the compiled iteration (per image: the numbers the scaling plan uses).

On 8 devices the cifar10 case shards parameters and optimizer state over all of them (mesh (1, 8),
FSDP): 8 replicas of 3 networks plus Adam and EMA would need ~15 GB of host memory. The batch is split
over all devices in both layouts. A CPU host emulating 8 devices shares its cores among them, so
8-device numbers on CPU measure overhead (collectives, partitioning), not speed-up.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _simjax_config(batch: int):
  sys.path.insert(0, str(REPO / "configs"))
  import gmm2d  # pylint: disable=import-outside-toplevel
  config = gmm2d.get_config()
  config.batch_size = batch
  config.init.copy_steps = 0
  return config


def _random_like(shapes, seed=0, scale=0.05):
  """Random float32 arrays of the given ShapeDtypeStruct tree, drawn on the host (nothing to compile)."""
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: (scale * rng.standard_normal(s.shape)).astype(np.float32), shapes)


def build_case(case: str, batch: int, dtype: str = "float32"):
  """(config, nets, host params of the generator/fake, consts, optimizers); dtype: cifar10's compute dtype."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from simjax.training import state as state_lib  # pylint: disable=import-outside-toplevel
  from simjax.training.roles import Denoiser, DistillNetworks  # pylint: disable=import-outside-toplevel
  from simjax.conditioning import CondSpace  # pylint: disable=import-outside-toplevel

  config = _simjax_config(batch)
  optimizers = {"generator": state_lib.make_optimizer(config.optim.generator),
                "fake": state_lib.make_optimizer(config.optim.fake)}
  if case == "gmm":
    from simjax.pipelines import gmm  # pylint: disable=import-outside-toplevel
    distillation, _ = gmm.build(config)
    nets = distillation.nets
    mlp = nets.generator.module
    shapes = jax.eval_shape(lambda: mlp.init(jax.random.key(0), jnp.zeros((1, 2)), jnp.ones((1,)))["params"])
    params = _random_like(shapes)
    return config, nets, params, distillation.consts, optimizers
  if case == "cifar10":
    from simjax.networks import precond  # pylint: disable=import-outside-toplevel
    module = precond.build_precond(precond.edm_preset_arch("ddpmpp"), dtype=jnp.dtype(dtype))
    params = _random_like(precond.param_shapes(module)["params"])
    nets = DistillNetworks(generator=Denoiser(module), fake=Denoiser(module), teacher=Denoiser(module),
                           data_shape=(32, 32, 3), cond_space=CondSpace(), sigma_init=float(config.sigma_init))
    consts = {"teacher": {"params": params}, "generator": {}, "fake": {}}
    return config, nets, params, consts, optimizers
  raise ValueError(f"unknown case {case!r}; use gmm or cifar10.")


def run_case(case: str, batch: int, mesh_shape, steps: int, dtype: str = "float32") -> dict:
  """Compiles and times the SIM iteration exactly as distill.train_sim lays it out."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from simjax.flops import jaxpr_flops, xla_flops  # pylint: disable=import-outside-toplevel
  from simjax.networks.precond import count_params  # pylint: disable=import-outside-toplevel
  from simjax.parallel import mesh as mesh_lib  # pylint: disable=import-outside-toplevel
  from simjax.training import distill, perf, sim_steps, state as state_lib  # pylint: disable=import-outside-toplevel

  jax.config.update("jax_threefry_partitionable", True)
  # As simjax.main does, first: build_case starts the backend, after which inline dispatch cannot be set.
  perf.before_backend_start(_simjax_config(batch))
  config, nets, params, consts, optimizers = build_case(case, batch, dtype)
  perf.apply_process_options(perf.resolve(config))
  mesh = mesh_lib.make_mesh(mesh_shape)
  min_size = int(config.fsdp_min_size)
  init_fn = lambda: {"generator": params, "fake": params}
  specs, _ = distill.state_specs(jax.eval_shape(init_fn), mesh, optimizers, ("generator",), min_size)
  shardings = mesh_lib.specs_to_shardings(specs, mesh)
  host_params = {"generator": params, "fake": params}
  state = jax.jit(lambda p: state_lib.new_state(jax.tree.map(jnp.asarray, p), optimizers, ("generator",)),
                  out_shardings=shardings)(host_params)
  consts_specs = mesh_lib.param_specs(consts, mesh, min_size)
  consts = jax.device_put(consts, mesh_lib.specs_to_shardings(consts_specs, mesh))
  step_specs = {"generator": specs.params["generator"], "fake": specs.params["fake"], "consts": consts_specs}
  iteration = sim_steps.make_sim_iteration(nets, config, mesh, step_specs, optimizers)
  t0 = time.perf_counter()
  traced = jax.jit(iteration, donate_argnums=0, out_shardings=(shardings, None)).trace(state, consts)
  compiled = traced.lower().compile()
  compile_s = time.perf_counter() - t0

  state, metrics = compiled(state, consts)  # warm-up
  jax.block_until_ready(metrics)
  times = []
  for _ in range(steps):
    t0 = time.perf_counter()
    state, metrics = compiled(state, consts)
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - t0)
  step_s = statistics.median(times)
  flops = xla_flops(compiled)
  model_flops = jaxpr_flops(traced.jaxpr)
  return {
      "case": case, "compute_dtype": dtype if case == "cifar10" else "float32", "devices": mesh.size,
      "mesh": list(mesh.devices.shape), "global_batch": batch,
      "platform": jax.default_backend(), "device_kind": jax.devices()[0].device_kind,
      "params_per_network": count_params(params), "compile_s": round(compile_s, 2), "timed_steps": steps,
      "step_s": round(step_s, 4), "steps_per_sec": round(1.0 / step_s, 3), "images_per_sec": round(batch / step_s, 2),
      # XLA's count for the compiled program; for SPMD programs it is per device (per shard of the batch).
      "xla_flops_per_iteration_per_device": flops,
      "xla_flops_per_image": None if flops is None else round(flops * mesh.size / batch),
      # Matmul + convolution FLOPs counted from the program: the same on every backend (also on GPU).
      "flops_per_image": round(model_flops / batch),
      "achieved_flops_per_sec_per_device": round(model_flops / step_s / mesh.size),
      "finite": bool(jnp.isfinite(metrics["gen_loss"]) and jnp.isfinite(metrics["fake_loss"])),
      "host_cpus": os.cpu_count(), "load_avg_1m": round(os.getloadavg()[0], 2), "jax": jax.__version__,
  }


# Host memory one emulated CPU device needs for the cifar10 case (measured: 8 devices passed 16 GB while
# compiling): inside the step every device holds the three gathered networks, their gradients and
# its activations.
CIFAR_GB_PER_CPU_DEVICE = 2.2


def _available_gb():
  try:
    with open("/proc/meminfo") as f:
      for line in f:
        if line.startswith("MemAvailable:"):
          return int(line.split()[1]) / 2**20
  except OSError:
    pass
  return None


def _mesh_for(case, devices, fsdp_cases):
  return (1, devices) if case in fsdp_cases and devices > 1 else (devices, 1)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--cases", default="gmm,cifar10")
  parser.add_argument("--devices", default="1,8", help="device counts, comma-separated")
  parser.add_argument("--gmm_batch", type=int, default=256)
  parser.add_argument("--cifar_batch", type=int, default=8)
  parser.add_argument("--gmm_steps", type=int, default=20)
  parser.add_argument("--cifar_steps", type=int, default=2)
  parser.add_argument("--cifar_dtype", default="float32", help="cifar10 compute dtype (parameters stay float32)")
  parser.add_argument("--fsdp_cases", default="cifar10", help="cases sharded with mesh (1, n) on n > 1 devices")
  parser.add_argument("--platform", default="cpu", help="cpu (fake devices), or 'default' for jax's own choice")
  parser.add_argument("--timeout", type=int, default=3600, help="seconds per case")
  parser.add_argument("--force", action="store_true", help="run cifar10 on CPU even if host memory looks short")
  parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
  args = parser.parse_args(argv)

  if args.worker:  # one case in this process: "case:batch:data:fsdp:steps[:dtype]"
    case, batch, data, fsdp, steps, *dtype = args.worker.split(":")
    sys.path.insert(0, str(REPO))
    result = run_case(case, int(batch), (int(data), int(fsdp)), int(steps), *dtype)
    print("RESULT " + json.dumps(result), flush=True)
    return 0

  fsdp_cases = set(filter(None, args.fsdp_cases.split(",")))
  failures = 0
  for case in filter(None, args.cases.split(",")):
    batch = args.gmm_batch if case == "gmm" else args.cifar_batch
    steps = args.gmm_steps if case == "gmm" else args.cifar_steps
    for devices in (int(d) for d in args.devices.split(",")):
      if batch % devices:
        print(json.dumps({"case": case, "devices": devices, "error": f"batch {batch} not divisible by {devices}"}))
        continue
      need = 2.0 + CIFAR_GB_PER_CPU_DEVICE * devices
      available = _available_gb()
      if case == "cifar10" and args.platform == "cpu" and not args.force and available is not None and need > available:
        print(json.dumps({"case": case, "devices": devices, "skipped": f"needs ~{need:.0f} GB of host memory, "
                          f"{available:.0f} GB available; rerun with --force to try anyway"}), flush=True)
        continue
      env = dict(os.environ)
      if args.platform == "cpu":
        env["JAX_PLATFORMS"] = "cpu"
        env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}".strip()
      data, fsdp = _mesh_for(case, devices, fsdp_cases)
      cmd = [sys.executable, __file__, f"--worker={case}:{batch}:{data}:{fsdp}:{steps}:{args.cifar_dtype}"]
      try:
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=args.timeout)
      except subprocess.TimeoutExpired:
        print(json.dumps({"case": case, "devices": devices, "error": f"timed out after {args.timeout}s"}), flush=True)
        failures += 1
        continue
      lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
      if proc.returncode or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        print(json.dumps({"case": case, "devices": devices, "error": tail[0][:500]}), flush=True)
        failures += 1
        continue
      print(lines[-1][len("RESULT "):], flush=True)
  return 1 if failures else 0


if __name__ == "__main__":
  sys.exit(main())

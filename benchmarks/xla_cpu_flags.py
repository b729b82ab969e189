"""XLA:CPU flags, one at a time, on simjax's CIFAR-10 DDPM++ network (batch 8, fp32): each a time ratio to
the default flags measured alternately with it.

  python benchmarks/xla_cpu_flags.py                          # the default flag list, forward + conv probe
  python benchmarks/xla_cpu_flags.py --cases=grad_params --flags=--xla_cpu_use_onednn=true

XLA reads XLA_FLAGS once per process, so the baseline and each variant live in their own persistent
subprocess (`--child`), which compiles every case once and then times one call per request on stdin.
The parent alternates the two processes call by call (order flipped every round), so a shared machine's
drift hits both alike, and reports per variant and case: ms of each (median over rounds) and the
per-round ratio variant / baseline (median and range; < 1 is faster). The baseline process is kept for
all variants. Cases: `forward` (D(x, sigma), eval), `grad_params` (DSM loss, train mode, gradient
w.r.t. all parameters: the dominant pass), `conv_fwd_bwd` (the network's dominant op: 3x3, 32x32,
256->256, input and weight gradients). A flag XLA does not know kills its child: reported as `error`.
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
DEFAULT_FLAGS = ("--xla_cpu_use_onednn=true", "--xla_cpu_use_xnnpack=false", "--xla_cpu_use_thunk_runtime=false",
                 "--xla_cpu_multi_thread_eigen=false", "--xla_cpu_enable_fast_math=true",
                 "--xla_cpu_prefer_vector_width=512",
                 "--xla_cpu_experimental_xnn_graph_fusion_mode=XNN_GRAPH_FUSION_MODE_GREEDY")
CASES = ("forward", "grad_params", "conv_fwd_bwd")


def _fail(message):
  print(f"xla_cpu_flags: {message}", file=sys.stderr)
  sys.exit(2)


def child(cases, calls, batch):
  sys.path.insert(0, str(REPO))
  sys.path.insert(0, str(REPO / "benchmarks"))
  from simjax import xla_cpu  # pylint: disable=import-outside-toplevel
  xla_cpu.run_cpu_programs_inline()
  xla_cpu.keep_freed_memory()
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  import sim_step  # pylint: disable=import-outside-toplevel,import-error
  from simjax.diffusion.edm import edm_loss_weight  # pylint: disable=import-outside-toplevel
  from simjax.networks.precond import build_precond  # pylint: disable=import-outside-toplevel
  from simjax.pipelines.image_teacher import teacher_arch_from_config  # pylint: disable=import-outside-toplevel
  module = build_precond(teacher_arch_from_config(sim_step.load_config("configs/cifar10.py")))
  params = sim_step.random_params(module)["params"]
  rng = np.random.default_rng(1)
  x0 = jnp.asarray(rng.uniform(-1, 1, (batch, 32, 32, 3)).astype(np.float32))
  noise = jnp.asarray(rng.standard_normal(x0.shape).astype(np.float32))
  sigma = jnp.asarray(np.exp(-1.2 + 1.2 * rng.standard_normal(batch)).astype(np.float32))

  def loss(p, x0, s, n, key):
    d = module.apply({"params": p}, x0 + s[:, None, None, None] * n, s, train=True, rngs={"dropout": key})
    return jnp.sum(edm_loss_weight(s)[:, None, None, None] * jnp.square(d - x0)) / x0.shape[0]

  conv = lambda x, w: jax.lax.conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)),
                                                   dimension_numbers=("NHWC", "HWIO", "NHWC"))
  cx = jnp.asarray(rng.standard_normal((batch, 32, 32, 256)).astype(np.float32))
  cw = jnp.asarray((rng.standard_normal((3, 3, 256, 256)) / 48).astype(np.float32))
  table = {
      "forward": (lambda p, x, s: module.apply({"params": p}, x, s), (params, x0 + 0.5 * noise, sigma)),
      "grad_params": (jax.value_and_grad(loss), (params, x0, sigma, noise, jax.random.key(0))),
      "conv_fwd_bwd": (lambda x, w, c: jax.vjp(conv, x, w)[1](c), (cx, cw, cx)),
  }
  ready, compiled = {"xla_flags": os.environ.get("XLA_FLAGS", "")}, {}
  for name in cases:
    fn, fn_args = table[name]
    start = time.perf_counter()
    compiled[name] = (jax.jit(fn).lower(*fn_args).compile(), fn_args)
    ready[f"{name}_compile_s"] = round(time.perf_counter() - start, 1)
    jax.block_until_ready(compiled[name][0](*fn_args))  # warm-up
  print(json.dumps(ready), flush=True)
  for line in sys.stdin:
    fn, fn_args = compiled[line.strip()]
    start = time.perf_counter()
    for _ in range(calls):
      jax.block_until_ready(fn(*fn_args))
    print(json.dumps({"ms": 1e3 * (time.perf_counter() - start) / calls}), flush=True)


class Child:
  """A persistent `--child` process under one XLA_FLAGS."""

  def __init__(self, flags, args):
    self.flags = flags
    self.proc = subprocess.Popen(
        [sys.executable, __file__, "--child", f"--cases={','.join(args.cases)}", f"--calls={args.calls}",
         f"--batch={args.batch}"], env=dict(os.environ, XLA_FLAGS=flags), cwd=REPO, stdin=subprocess.PIPE,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    self.ready = self._reply()

  def _reply(self):
    line = self.proc.stdout.readline()
    if not line:
      self.proc.wait()
      errors = [l for l in self.proc.stderr.read().splitlines() if l.strip()]
      raise RuntimeError((errors or ["child died"])[-1][:200])
    return json.loads(line)

  def time(self, case):
    self.proc.stdin.write(case + "\n")
    self.proc.stdin.flush()
    return self._reply()["ms"]

  def close(self):
    self.proc.stdin.close()
    self.proc.wait()
    warnings = [l for l in self.proc.stderr.read().splitlines() if "no longer supported" in l or "eprecated" in l]
    return warnings[0][-110:] if warnings else None


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--flags", action="append", help="one variant's XLA_FLAGS (repeatable); default: a list")
  parser.add_argument("--cases", default="forward,conv_fwd_bwd", help=f"comma-separated, of {','.join(CASES)}")
  parser.add_argument("--calls", type=int, default=1, help="calls per timing")
  parser.add_argument("--rounds", type=int, default=4)
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
  args = parser.parse_args()
  args.cases = [c for c in args.cases.split(",") if c]
  if min(args.calls, args.batch, args.rounds) < 1:
    _fail(f"--calls={args.calls}, --rounds={args.rounds} and --batch={args.batch} must be >= 1.")
  if not args.cases or set(args.cases) - set(CASES):
    _fail(f"--cases={','.join(args.cases)}: use some of {CASES}.")
  if args.child:
    child(args.cases, args.calls, args.batch)
    return
  base_flags = os.environ.get("XLA_FLAGS", "")
  base = Child(base_flags, args)
  print(json.dumps({"baseline": base_flags, **base.ready}), flush=True)
  for flags in args.flags or DEFAULT_FLAGS:
    summary = {"variant": flags}
    try:
      variant = Child(f"{base_flags} {flags}".strip(), args)
    except RuntimeError as e:
      print(json.dumps({**summary, "error": str(e)}), flush=True)
      continue
    summary.update({k: v for k, v in variant.ready.items() if k != "xla_flags"})
    for case in args.cases:
      times = {"base": [], "variant": []}
      for r in range(args.rounds):
        for name, child_proc in ((("base", base), ("variant", variant))[::-1 if r % 2 else 1]):
          times[name].append(child_proc.time(case))
      ratios = [v / b for b, v in zip(times["base"], times["variant"])]
      summary[case] = {"ratio": round(statistics.median(ratios), 3),
                       "range": [round(min(ratios), 3), round(max(ratios), 3)],
                       "ms": {k: round(statistics.median(v), 1) for k, v in times.items()}}
    warning = variant.close()
    if warning:
      summary["warning"] = warning
    print(json.dumps(summary), flush=True)
  base.close()


if __name__ == "__main__":
  main()

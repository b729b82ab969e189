"""simjax's network passes and ops against the PyTorch peer's (NVlabs/edm), side by side: where the gap is.

  python benchmarks/peer_passes.py --edm=/path/to/NVlabs/edm                  # CIFAR-10 DDPM++, batch 8, fp32
  python benchmarks/peer_passes.py --edm=... --cases=net --passes=grad_params --rounds=3 --json_only

The network is the config's teacher architecture (configs/cifar10.py: EDM's DDPM++, 55.7M parameters) on
both sides: EDM's own `EDMPrecond(SongUNet)` imported from the user's --edm checkout (never copied), and
simjax's `build_precond` of the same kwargs with the peer's weights converted (`convert_state_dict`).
Float32 throughout; torch eager on --threads threads, XLA:CPU on the same cores, simjax in its default
CPU configuration (host memory reuse and inline CPU programs, as a training run sets them; the malloc
setting is process-wide, so the peer runs under it too).

Cases (--cases, comma-separated classes):
- net: whole-network passes, D(x, sigma) with EDM's preconditioning:
  `forward` (eval mode, no gradients), `grad_params` (DSM loss lambda(sigma)|D(x0 + sigma n) - x0|^2,
  train mode with dropout, gradient w.r.t. all parameters: the fake-score step's pass), `grad_input`
  (eval mode, parameters frozen, vector-Jacobian product w.r.t. the input: the generator step's
  teacher/fake pass);
- conv: every distinct convolution of the network at its own shape (read from simjax's forward jaxpr:
  resolution, in/out channels, kernel, and how many times it occurs per forward);
- norm: GroupNorm + SiLU at every (resolution, channels) of the network;
- attn: the attention sub-block (norm, 1x1 qkv, softmax attention with one head, 1x1 proj, residual) at
  its resolutions (16x16, and the 8x8 bottleneck's);
- resample: the [1, 1] FIR 2x up- and down-sampling (EDM's Conv2d with kernel 0) at its shapes.
Per-op cases run `fwd` and `fwd_bwd` (gradient of <out, cotangent> w.r.t. the input and the op's
parameters). Modules are each framework's own (EDM's Conv2d/GroupNorm/AttentionOp, simjax's
EDMConv2d/EDMGroupNorm); the attention's reshapes follow each UNetBlock.

Timing: each row alternates the two frameworks within every round (order flipped every other round),
each measurement repeating the call until it covers --min_seconds, after two warm-up calls. Per row:
ms per call of each (median over rounds) and speed = peer ms / simjax ms per round (> 1: simjax faster),
median and range, and `speed_of_best` (the two frameworks' fastest rounds). Per-op rows also give `count` (occurrences per network forward) and the share of the
whole forward / grad_params pass that count x ms makes on each side. Prints one JSON line per row, then a
table. Exits with status 2 and one line on bad input (no EDM checkout, no torch, non-positive sizes).

On a machine shared with other work, torch's OpenMP threads wait at barriers for a descheduled sibling
(libgomp spins, then sleeps), so its 2-thread times inflate far more than XLA's: there the 2-thread
speeds flatter simjax. `taskset -c 0 python benchmarks/peer_passes.py ... --threads=1` is the control
that load cannot skew this way (one thread each; XLA sizes its pool from the CPUs the process may use).
"""
import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

CLASSES = ("net", "conv", "norm", "attn", "resample")
PASSES = ("forward", "grad_params", "grad_input")


def _fail(message):
  print(f"peer_passes: {message}", file=sys.stderr)
  sys.exit(2)


def _parse():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--edm", required=True, help="path to a checkout of NVlabs/edm")
  parser.add_argument("--config", default="configs/cifar10.py")
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--min_seconds", type=float, default=0.3, help="per measurement: repeat a fast call this long")
  parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads (XLA uses every core)")
  parser.add_argument("--cases", default=",".join(CLASSES), help=f"comma-separated, of {','.join(CLASSES)}")
  parser.add_argument("--passes", default=",".join(PASSES), help=f"net passes, of {','.join(PASSES)}")
  parser.add_argument("--json_only", action="store_true", help="JSON lines only, no table")
  args = parser.parse_args()
  cases = [c for c in args.cases.split(",") if c]
  passes = [p for p in args.passes.split(",") if p]
  if args.batch < 1 or args.rounds < 1 or args.threads < 1 or not args.min_seconds >= 0:
    _fail(f"--batch={args.batch}, --rounds={args.rounds}, --threads={args.threads} must be >= 1 and "
          f"--min_seconds={args.min_seconds} >= 0.")
  bad = sorted(set(cases) - set(CLASSES)) + sorted(set(passes) - set(PASSES))
  if bad or not cases:
    _fail(f"unknown cases/passes {bad or '(none given)'}; --cases from {CLASSES}, --passes from {PASSES}.")
  root = Path(args.edm)
  if not (root / "training" / "networks.py").is_file() or not (root / "torch_utils").is_dir():
    _fail(f"--edm={root} is not a checkout of NVlabs/edm (needs training/networks.py and torch_utils/); "
          "git clone https://github.com/NVlabs/edm and pass --edm=<it>.")
  if not (REPO / args.config).is_file() and not Path(args.config).is_file():
    _fail(f"--config={args.config} does not exist.")
  return args, cases, passes


# ----------------------------------------------------------------------------------------------
# Timing.


def _seconds(fn, calls):
  start = time.perf_counter()
  for _ in range(calls):
    fn()
  return (time.perf_counter() - start) / calls


def alternate(sim_fn, peer_fn, rounds, min_seconds):
  """(simjax seconds per round, peer seconds per round): both warmed up twice, then alternated in every
  round (order flipped every other round); each measurement repeats a call to cover min_seconds."""
  calls = []
  for fn in (sim_fn, peer_fn):
    fn()
    one = _seconds(fn, 1)
    calls.append(max(1, math.ceil(min_seconds / max(one, 1e-6))))
  times = ([], [])
  for r in range(rounds):
    for i in ((0, 1) if r % 2 == 0 else (1, 0)):
      times[i].append(_seconds((sim_fn, peer_fn)[i], calls[i]))
  return times


def row(case, sim_s, peer_s, **extra):
  speed = [p / s for s, p in zip(sim_s, peer_s)]
  return {"case": case, "simjax_ms": round(1e3 * statistics.median(sim_s), 2),
          "peer_ms": round(1e3 * statistics.median(peer_s), 2), "speed": round(statistics.median(speed), 3),
          "speed_range": [round(min(speed), 3), round(max(speed), 3)],
          "speed_of_best": round(min(peer_s) / min(sim_s), 3), **extra,
          "per_round_ms": {"simjax": [round(1e3 * t, 1) for t in sim_s], "peer": [round(1e3 * t, 1) for t in peer_s]}}


# ----------------------------------------------------------------------------------------------
# The network's op shapes.


def conv_shapes(module, params, x, sigma):
  """{(resolution, in, out, kernel): count} of the convolutions in simjax's forward (the CPU form, where
  resampling is not a convolution)."""
  import jax  # pylint: disable=import-outside-toplevel
  jaxpr = jax.make_jaxpr(lambda p, x, s: module.apply({"params": p}, x, s))(params, x, sigma)
  counts = {}

  def walk(jx):
    for eqn in jx.eqns:
      if eqn.primitive.name == "conv_general_dilated":
        lhs, rhs = eqn.invars[0].aval.shape, eqn.invars[1].aval.shape  # NHWC, HWIO
        key = (int(lhs[1]), int(rhs[2]), int(rhs[3]), int(rhs[0]))
        counts[key] = counts.get(key, 0) + 1
      for value in eqn.params.values():
        inner = getattr(value, "jaxpr", None)
        if inner is not None and hasattr(inner, "eqns"):
          walk(inner)
        elif hasattr(value, "eqns"):
          walk(value)

  walk(jaxpr.jaxpr)
  return dict(sorted(counts.items(), key=lambda kv: (-kv[0][0], kv[0][3], kv[0][1], kv[0][2])))


def layout_shapes(arch):
  """GroupNorm (resolution, channels), attention resolutions and resampling (kind, resolution in,
  channels) of the network, each with its count per forward, from simjax's SongUNet layout."""
  from simjax.networks.songunet import song_unet_layout  # pylint: disable=import-outside-toplevel
  res0, channels = int(arch["img_resolution"]), int(arch["img_channels"])
  enc, dec = song_unet_layout(res0, channels, channels, int(arch["model_channels"]), tuple(arch["channel_mult"]),
                              int(arch.get("num_blocks", 4)), tuple(arch.get("attn_resolutions", (16,))),
                              arch.get("encoder_type", "standard"), arch.get("decoder_type", "standard"))
  norms, attns, resamples = {}, {}, {}
  add = lambda d, k: d.__setitem__(k, d.get(k, 0) + 1)
  res = res0
  for spec in enc + dec:
    if spec.kind == "block":
      res_out = res // 2 if spec.down else res * 2 if spec.up else res
      add(norms, (res, spec.in_channels))
      add(norms, (res_out, spec.out_channels))
      if spec.up or spec.down:
        for _ in range(2):  # conv0's and the skip's
          add(resamples, ("up" if spec.up else "down", res, spec.in_channels))
      if spec.attention:
        add(norms, (res_out, spec.out_channels))
        add(attns, (res_out, spec.out_channels))
      res = res_out
    elif spec.kind == "aux_norm":
      add(norms, (res, spec.in_channels))
  return norms, attns, resamples


# ----------------------------------------------------------------------------------------------
# Cases.


class Bench:
  """Both frameworks' networks, inputs and per-op builders."""

  def __init__(self, args, torch, edm, jax, jnp, np):
    self.args, self.torch, self.edm, self.jax, self.jnp, self.np = args, torch, edm, jax, jnp, np
    import sim_step  # pylint: disable=import-outside-toplevel,import-error
    from simjax.pipelines.image_teacher import teacher_arch_from_config  # pylint: disable=import-outside-toplevel
    from simjax.networks.precond import build_precond, count_params  # pylint: disable=import-outside-toplevel
    from simjax.teachers.edm_checkpoints import convert_state_dict  # pylint: disable=import-outside-toplevel
    self.arch = teacher_arch_from_config(sim_step.load_config(args.config))
    kwargs = {k: v for k, v in self.arch.items() if k not in ("precond", "class_name")}
    torch.manual_seed(0)
    precond = getattr(edm, self.arch.get("precond", "EDMPrecond"))
    self.peer_train = precond(**kwargs).train()
    self.peer_frozen = precond(**kwargs).eval().requires_grad_(False)
    self.peer_frozen.load_state_dict(self.peer_train.state_dict())
    state = {k: v.detach().numpy() for k, v in self.peer_train.state_dict().items()}
    arch, variables = convert_state_dict(self.arch, state)
    self.module = build_precond(arch)
    self.params = jax.tree.map(jnp.asarray, variables["params"])
    self.num_params = count_params(self.params)
    b, r, c = args.batch, int(self.arch["img_resolution"]), int(self.arch["img_channels"])
    rng = np.random.default_rng(1)
    self.x0 = rng.uniform(-1, 1, (b, r, r, c)).astype(np.float32)
    self.noise = rng.standard_normal(self.x0.shape).astype(np.float32)
    self.sigma = np.exp(-1.2 + 1.2 * rng.standard_normal(b)).astype(np.float32)
    self.ct = rng.standard_normal(self.x0.shape).astype(np.float32)
    self.rng = rng

  def nchw(self, a):
    return self.torch.from_numpy(self.np.ascontiguousarray(a.transpose(0, 3, 1, 2)))

  def block(self, out):
    return lambda: self.jax.block_until_ready(out())

  # Whole-network passes.

  def net_fns(self, name):
    jax, jnp, torch, module = self.jax, self.jnp, self.torch, self.module
    from simjax.diffusion.edm import edm_loss_weight  # pylint: disable=import-outside-toplevel
    p = self.params
    x0, noise, sigma, ct = (jnp.asarray(a) for a in (self.x0, self.noise, self.sigma, self.ct))
    tx0, tnoise, tct = self.nchw(self.x0), self.nchw(self.noise), self.nchw(self.ct)
    tsigma = torch.from_numpy(self.sigma)
    tx = tx0 + tsigma[:, None, None, None] * tnoise
    weight = (tsigma**2 + 0.5**2) / (tsigma * 0.5) ** 2
    if name == "forward":
      fn = jax.jit(lambda p, x, s: module.apply({"params": p}, x, s))
      args = (p, x0 + sigma[:, None, None, None] * noise, sigma)

      def peer():
        with torch.no_grad():
          self.peer_frozen(tx, tsigma)
    elif name == "grad_params":
      def loss(p, x0, s, n, key):
        d = module.apply({"params": p}, x0 + s[:, None, None, None] * n, s, train=True, rngs={"dropout": key})
        return jnp.sum(edm_loss_weight(s)[:, None, None, None] * jnp.square(d - x0)) / x0.shape[0]
      fn = jax.jit(lambda p, x0, s, n, key: jax.value_and_grad(loss)(p, x0, s, n, key))
      args = (p, x0, sigma, noise, jax.random.key(0))

      def peer():
        d = self.peer_train(tx, tsigma)
        l = (weight[:, None, None, None] * (d - tx0) ** 2).sum() / tx0.shape[0]
        self.peer_train.zero_grad(set_to_none=True)
        l.backward()
    else:
      def vjp(p, x, s, c):
        return jax.vjp(lambda x: module.apply({"params": p}, x, s), x)[1](c)[0]
      fn = jax.jit(vjp)
      args = (p, x0 + sigma[:, None, None, None] * noise, sigma, ct)

      def peer():
        xi = tx.detach().requires_grad_(True)
        self.peer_frozen(xi, tsigma).backward(tct)
    start = time.perf_counter()
    compiled = fn.lower(*args).compile()
    compile_s = time.perf_counter() - start
    return self.block(lambda: compiled(*args)), peer, compile_s

  # Per-op cases: (simjax fn of (params, x), simjax params, torch module or fn, input NHWC shape).

  def _op_pair(self, sim_apply, sim_params, peer_fn, peer_params, shape, mode):
    """(simjax call, peer call) of one op in `mode` fwd or fwd_bwd, at NHWC `shape`."""
    jax, jnp, torch, np = self.jax, self.jnp, self.torch, self.np
    x = self.rng.standard_normal(shape).astype(np.float32)
    jx, tx = jnp.asarray(x), self.nchw(x)
    out_shape = jax.eval_shape(sim_apply, sim_params, jx).shape
    ct = self.rng.standard_normal(out_shape).astype(np.float32)
    jct, tct = jnp.asarray(ct), self.nchw(ct)
    if mode == "fwd":
      fn = jax.jit(sim_apply)
      args = (sim_params, jx)

      def peer():
        with torch.no_grad():
          peer_fn(tx)
    else:
      fn = jax.jit(lambda p, x, c: jax.grad(lambda p, x: jnp.vdot(sim_apply(p, x), c), argnums=(0, 1))(p, x))
      args = (sim_params, jx, jct)

      def peer():
        for t in peer_params:
          t.grad = None
        xi = tx.detach().requires_grad_(True)
        peer_fn(xi).backward(tct)
    compiled = fn.lower(*args).compile()
    return self.block(lambda: compiled(*args)), peer

  def _conv_params(self, cin, cout, k):
    np, jnp = self.np, self.jnp
    w = (self.rng.standard_normal((k, k, cin, cout)) / math.sqrt(cin * k * k)).astype(np.float32)
    b = (0.01 * self.rng.standard_normal(cout)).astype(np.float32)
    return {"kernel": jnp.asarray(w), "bias": jnp.asarray(b)}, w, b

  def conv_case(self, res, cin, cout, k, mode):
    from simjax.networks.songunet import EDMConv2d  # pylint: disable=import-outside-toplevel
    torch = self.torch
    sim = EDMConv2d(cout, k)
    params, w, b = self._conv_params(cin, cout, k)
    peer = self.edm.Conv2d(cin, cout, k)
    with torch.no_grad():
      peer.weight.copy_(torch.from_numpy(w.transpose(3, 2, 0, 1).copy()))
      peer.bias.copy_(torch.from_numpy(b))
    return self._op_pair(lambda p, x: sim.apply({"params": p}, x), params, peer, list(peer.parameters()),
                         (self.args.batch, res, res, cin), mode)

  def norm_case(self, res, channels, mode):
    from simjax.networks.songunet import EDMGroupNorm  # pylint: disable=import-outside-toplevel
    torch, jnp = self.torch, self.jnp
    sim = EDMGroupNorm(eps=1e-6)
    params = {"scale": jnp.ones(channels), "bias": jnp.zeros(channels)}
    peer = self.edm.GroupNorm(channels, eps=1e-6)
    return self._op_pair(lambda p, x: self.jax.nn.silu(sim.apply({"params": p}, x)), params,
                         lambda x: torch.nn.functional.silu(peer(x)), list(peer.parameters()),
                         (self.args.batch, res, res, channels), mode)

  def attn_case(self, res, channels, mode):
    """One head, as DDPM++ (num_heads 1): x + proj(attention(qkv(norm(x)))), each framework's UNetBlock
    reshapes (simjax: channels interleaved [C, 3] in NHWC; EDM: [C, 3, HW] in NCHW) and its softmax
    attention (simjax: einsums; EDM: AttentionOp)."""
    from simjax.networks.songunet import EDMConv2d, EDMGroupNorm  # pylint: disable=import-outside-toplevel
    torch, jax, jnp, np = self.torch, self.jax, self.jnp, self.np
    norm, qkv_conv, proj_conv = EDMGroupNorm(eps=1e-6), EDMConv2d(3 * channels, 1), EDMConv2d(channels, 1)
    qkv_p, qkv_w, qkv_b = self._conv_params(channels, 3 * channels, 1)
    proj_p, proj_w, proj_b = self._conv_params(channels, channels, 1)
    params = {"norm": {"scale": jnp.ones(channels), "bias": jnp.zeros(channels)}, "qkv": qkv_p, "proj": proj_p}

    def sim(p, x):  # simjax's UNetBlock attention (networks/songunet.py), one head
      n, h, w, c = x.shape
      qkv = qkv_conv.apply({"params": p["qkv"]}, norm.apply({"params": p["norm"]}, x)).reshape(n, h * w, 1, c, 3)
      q, k, v = qkv[..., 0], qkv[..., 1] / np.sqrt(c), qkv[..., 2]
      weights = jax.nn.softmax(jnp.einsum("nqhc,nkhc->nhqk", q, k), axis=-1)
      a = jnp.einsum("nhqk,nkhc->nqhc", weights, v).reshape(n, h, w, c)
      return proj_conv.apply({"params": p["proj"]}, a) + x

    peer_norm = self.edm.GroupNorm(channels, eps=1e-6)
    peer_qkv, peer_proj = self.edm.Conv2d(channels, 3 * channels, 1), self.edm.Conv2d(channels, channels, 1)
    with torch.no_grad():
      for conv, w, b in ((peer_qkv, qkv_w, qkv_b), (peer_proj, proj_w, proj_b)):
        conv.weight.copy_(torch.from_numpy(w.transpose(3, 2, 0, 1).copy()))
        conv.bias.copy_(torch.from_numpy(b))

    def peer(x):  # EDM's UNetBlock attention, one head
      q, k, v = peer_qkv(peer_norm(x)).reshape(x.shape[0], x.shape[1], 3, -1).unbind(2)
      w = self.edm.AttentionOp.apply(q, k)
      a = torch.einsum("nqk,nck->ncq", w, v)
      return peer_proj(a.reshape(*x.shape)).add_(x)

    peer_params = [t for m in (peer_norm, peer_qkv, peer_proj) for t in m.parameters()]
    return self._op_pair(sim, params, peer, peer_params, (self.args.batch, res, res, channels), mode)

  def resample_case(self, kind, res, channels, mode):
    from simjax.networks.songunet import EDMConv2d  # pylint: disable=import-outside-toplevel
    f = tuple(self.arch.get("resample_filter", (1, 1)))
    sim = EDMConv2d(channels, 0, up=kind == "up", down=kind == "down", resample_filter=f)
    peer = self.edm.Conv2d(channels, channels, 0, up=kind == "up", down=kind == "down", resample_filter=list(f))
    return self._op_pair(lambda p, x: sim.apply({}, x), {}, peer, [], (self.args.batch, res, res, channels), mode)


def _table(rows):
  lines = ["| case | count | simjax ms | peer ms | speed (peer ms / simjax ms), median [range] | share of fwd / grad pass (simjax, peer) |",
           "|---|---:|---:|---:|---|---|"]
  for r in rows:
    share = r.get("share")
    share_text = "" if not share else f"{share['simjax']} / {share['peer']}"
    lines.append(f"| {r['case']} | {r.get('count', '')} | {r['simjax_ms']} | {r['peer_ms']} | "
                 f"{r['speed']} [{r['speed_range'][0]}, {r['speed_range'][1]}] | {share_text} |")
  return "\n".join(lines)


def main():
  args, cases, passes = _parse()
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError:
    _fail("torch is not installed; pip install -e '.[parity]'.")
  torch.set_num_threads(args.threads)
  sys.path.insert(0, str(Path(args.edm).resolve()))
  import training.networks as edm  # pylint: disable=import-outside-toplevel,import-error
  from simjax import xla_cpu  # pylint: disable=import-outside-toplevel
  xla_cpu.run_cpu_programs_inline()  # simjax's default CPU configuration (training/perf.py, 'auto')
  xla_cpu.keep_freed_memory()
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel

  bench = Bench(args, torch, edm, jax, jnp, np)
  header = {"config": args.config, "batch": args.batch, "params": bench.num_params, "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(), "jax": jax.__version__, "cpus": os.cpu_count(),
            "xla_flags": os.environ.get("XLA_FLAGS", ""), "rounds": args.rounds}
  print(json.dumps(header), flush=True)
  rows, whole = [], {}

  def emit(r):
    rows.append(r)
    print(json.dumps(r), flush=True)

  if "net" in cases:
    for name in passes:
      sim_fn, peer_fn, compile_s = bench.net_fns(name)
      sim_s, peer_s = alternate(sim_fn, peer_fn, args.rounds, 0.0)
      whole[name] = (statistics.median(sim_s), statistics.median(peer_s))
      emit(row(f"net {name}", sim_s, peer_s, count=1, simjax_compile_s=round(compile_s, 1)))

  def op_rows(label, count, make):
    for mode in ("fwd", "fwd_bwd"):
      sim_fn, peer_fn = make(mode)
      sim_s, peer_s = alternate(sim_fn, peer_fn, args.rounds, args.min_seconds)
      extra = {}
      ref = whole.get("forward" if mode == "fwd" else "grad_params")
      if ref:
        extra["share"] = {k: round(count * statistics.median(t) / w, 3)
                          for k, t, w in (("simjax", sim_s, ref[0]), ("peer", peer_s, ref[1]))}
      emit(row(f"{label} {mode}", sim_s, peer_s, count=count, **extra))

  x = jnp.asarray(bench.x0)
  sigma = jnp.asarray(bench.sigma)
  if "conv" in cases:
    for (res, cin, cout, k), count in conv_shapes(bench.module, bench.params, x, sigma).items():
      op_rows(f"conv{k}x{k} {res}x{res} {cin}->{cout}", count,
              lambda mode, a=(res, cin, cout, k): bench.conv_case(*a, mode))
  norms, attns, resamples = layout_shapes(bench.arch)
  if "norm" in cases:
    for (res, channels), count in sorted(norms.items(), key=lambda kv: (-kv[0][0], kv[0][1])):
      op_rows(f"groupnorm+silu {res}x{res}x{channels}", count, lambda mode, a=(res, channels): bench.norm_case(*a, mode))
  if "attn" in cases:
    for (res, channels), count in sorted(attns.items(), reverse=True):
      op_rows(f"attention {res}x{res}x{channels}", count, lambda mode, a=(res, channels): bench.attn_case(*a, mode))
  if "resample" in cases:
    for (kind, res, channels), count in sorted(resamples.items()):
      op_rows(f"{kind}sample {res}x{res}x{channels}", count,
              lambda mode, a=(kind, res, channels): bench.resample_case(*a, mode))

  if not args.json_only:
    print(f"\n{header['config']}, batch {args.batch}, fp32, {bench.num_params / 1e6:.1f}M params; torch "
          f"{torch.__version__} on {torch.get_num_threads()} threads (eager), jax {jax.__version__} "
          f"(XLA_FLAGS={header['xla_flags']!r}); {args.rounds} rounds, frameworks alternated per round.\n")
    print(_table(rows), flush=True)
  if any(not math.isfinite(r["speed"]) for r in rows):
    sys.exit(1)


if __name__ == "__main__":
  main()

"""Performance switches of the SIM trainer (`config.perf`): compute dtype, rematerialisation, fused calls.

Every switch changes speed or memory only, never the maths: parameters, optimizer state and EMA stay
float32, every denoiser returns float32 D (the preconditioner casts F back) and losses are reduced in
float32. benchmarks/sim_step.py measures each switch; tests/test_perf.py checks that each one gives
the same step as the plain one (bfloat16 to bfloat16 tolerance).
"""
import dataclasses
from typing import Callable, Dict, Optional

import jax
import jax.numpy as jnp
import ml_collections

from simjax import xla_cpu
from simjax.errors import UserError
from simjax.training.roles import Denoiser, DistillNetworks

NETWORKS = ("generator", "teacher", "fake")
# none: keep every activation; blocks: each UNet block under jax.checkpoint (flax nn.remat; saves block
# inputs only, the scheduler decides when to recompute); full: keep nothing of the network and rerun
# it in the backward pass once its cotangent has arrived (recompute_in_backward).
REMAT_POLICIES = ("none", "blocks", "full")
COMPUTE_DTYPES = {"auto": None, "float32": jnp.float32, "bfloat16": jnp.bfloat16}


def default_config() -> ml_collections.ConfigDict:
  p = ml_collections.ConfigDict()
  p.compute_dtype = "auto"            # auto: bfloat16 on GPU/TPU, float32 on CPU (XLA:CPU has no fast bf16)
  p.remat = ml_collections.ConfigDict({name: "none" for name in NETWORKS})  # per network, generator step
  p.fuse_teacher_fake = False         # teacher and fake score as one vmapped call over stacked params
  p.reuse_host_memory = "auto"        # auto: on for the CPU backend (glibc); see simjax/xla_cpu.py
  return p


@dataclasses.dataclass(frozen=True)
class PerfOptions:
  compute_dtype: object
  remat: Dict[str, str]
  fuse_teacher_fake: bool
  reuse_host_memory: bool = False


def resolve(config, backend: Optional[str] = None) -> PerfOptions:
  """config.perf -> PerfOptions, with 'auto' decided by the backend; checks values."""
  p = config.perf
  name = str(p.compute_dtype)
  if name not in COMPUTE_DTYPES:
    raise UserError(f"perf.compute_dtype={name!r}; use one of {sorted(COMPUTE_DTYPES)}.")
  dtype = COMPUTE_DTYPES[name]
  if dtype is None:
    dtype = jnp.float32 if (backend or jax.default_backend()) == "cpu" else jnp.bfloat16
  remat = {}
  for net in NETWORKS:
    policy = str(p.remat[net])
    if policy not in REMAT_POLICIES:
      raise UserError(f"perf.remat.{net}={policy!r}; use one of {REMAT_POLICIES}.")
    remat[net] = policy
  unknown = sorted(set(p.remat.keys()) - set(NETWORKS))
  if unknown:
    raise UserError(f"perf.remat has unknown networks {unknown}; use {NETWORKS}.")
  fuse = bool(p.fuse_teacher_fake)
  if fuse and remat["teacher"] != remat["fake"]:
    raise UserError("perf.fuse_teacher_fake runs teacher and fake score as one call, so they need one remat "
                     f"policy; got teacher={remat['teacher']!r}, fake={remat['fake']!r}. Set them equal.")
  return PerfOptions(compute_dtype=dtype, remat=remat, fuse_teacher_fake=fuse,
                     reuse_host_memory=_reuse_host_memory(host_memory_mode(config), backend))


HOST_MEMORY_MODES = ("auto", "on", "off")


def host_memory_mode(config) -> str:
  """config.perf.reuse_host_memory, checked; needs no backend (it is read before JAX starts one)."""
  mode = str(config.perf.reuse_host_memory)
  if mode not in HOST_MEMORY_MODES:
    raise UserError(f"perf.reuse_host_memory={mode!r}; use one of {HOST_MEMORY_MODES}.")
  return mode


def _reuse_host_memory(mode: str, backend: Optional[str]) -> bool:
  """Whether to keep freed host memory (simjax.xla_cpu): 'auto' does so where XLA's buffers live in
  host memory (the CPU backend) and glibc allows it."""
  if mode == "on" and not xla_cpu.supported():
    raise UserError("perf.reuse_host_memory='on' needs glibc's malloc (Linux); set it to 'auto' or 'off'.")
  if mode == "auto":
    return (backend or jax.default_backend()) == "cpu" and xla_cpu.supported()
  return mode == "on"


def before_backend_start(config):
  """The part of host memory reuse that must precede JAX's backends: CPU programs run inline."""
  if host_memory_mode(config) != "off" and xla_cpu.supported():
    xla_cpu.run_cpu_programs_inline()


def apply_process_options(opts: PerfOptions):
  """The process-wide part of `opts` (host memory reuse); call once, before the first step."""
  if opts.reuse_host_memory:
    xla_cpu.keep_freed_memory()


def _network_field(module) -> str:
  """The attribute of a preconditioner holding its network ('model'; EDM2's 'unet')."""
  return getattr(type(module), "NETWORK_FIELD", "model")


def _network_of(module):
  """The module holding the compute options: a preconditioner's network, else the module itself."""
  return getattr(module, _network_field(module), None) or module


def _has_field(module, name) -> bool:
  return name in {f.name for f in dataclasses.fields(module)}


def configure_module(module, *, dtype=jnp.float32, remat_blocks: bool = False, label: str = "network"):
  """A clone of `module` computing in `dtype`, with rematerialised blocks if asked; same parameters.

  Networks without a compute dtype (the MLP, analytic teachers) stay float32; asking them for block
  rematerialisation is an error because they have no blocks.
  """
  net = _network_of(module)
  changes = {}
  if _has_field(net, "dtype") and jnp.dtype(net.dtype) != jnp.dtype(dtype):
    changes["dtype"] = dtype
  if remat_blocks:
    # SongUNet's switch is remat_blocks, the transformer's remat (one per block either way).
    field = next((f for f in ("remat_blocks", "remat") if _has_field(net, f)), None)
    if field is None:
      raise UserError(f"perf.remat.{label}='blocks' needs a network with blocks (SongUNet, the transformer), got "
                       f"{type(net).__name__}; use 'full' or 'none'.")
    changes[field] = True
  if not changes:
    return module
  if net is module:  # a bare network, no preconditioner around it
    return module.clone(**changes)
  return module.clone(**{_network_field(module): net.clone(**changes)})


def configure_networks(nets: DistillNetworks, opts: PerfOptions, *, remat: bool = True) -> DistillNetworks:
  """The three SIM networks in the compute dtype of `opts`, with its block rematerialisation if `remat`."""
  def one(name, denoiser: Denoiser):
    blocks = remat and opts.remat[name] == "blocks"
    module = configure_module(denoiser.module, dtype=opts.compute_dtype, remat_blocks=blocks, label=name)
    return Denoiser(module)
  return dataclasses.replace(nets, generator=one("generator", nets.generator), teacher=one("teacher", nets.teacher),
                             fake=one("fake", nets.fake))


def recompute_in_backward(fn: Callable) -> Callable:
  """fn(*args), keeping none of its activations: its forward pass is re-run in the backward pass.

  jax.checkpoint on accelerators; on XLA:CPU, which hoists jax.checkpoint's recomputation back into the
  forward pass, a custom VJP ordered by a data dependence (simjax/xla_cpu.py). All of fn's arguments get
  cotangents, so close over what is not differentiated.
  """
  if xla_cpu.in_use():
    return xla_cpu.recompute_in_backward(fn)
  return jax.checkpoint(fn, policy=jax.checkpoint_policies.nothing_saveable)


def recompute_pair_in_backward(fn_a: Callable, fn_b: Callable) -> Callable:
  """(args_a, args_b) -> (fn_a(*args_a), fn_b(*args_b)), both recomputed in the backward pass; on XLA:CPU one
  after the other, so only one network's activations are alive at a time (simjax/xla_cpu.py)."""
  if xla_cpu.in_use():
    return xla_cpu.recompute_pair_in_backward(fn_a, fn_b)
  run_a, run_b = recompute_in_backward(fn_a), recompute_in_backward(fn_b)
  return lambda args_a, args_b: (run_a(*args_a), run_b(*args_b))


def maybe_remat(fn: Callable, policy: str) -> Callable:
  """`fn` recomputed in the backward pass for policy 'full' (see recompute_in_backward)."""
  return recompute_in_backward(fn) if policy == "full" else fn


def generator_step_denoisers(teacher_fn: Callable, fake_fn: Callable, pair_fn: Optional[Callable], opts: PerfOptions):
  """The generator step's teacher/fake evaluation under `opts`: (teacher_denoise, fake_denoise, denoise_pair).

  teacher_fn(tp, x, s), fake_fn(fp, x, s) -> D; pair_fn(tp, fp, x, s) -> (D_teacher, D_fake) in one
  call (used when fusing). Recomputed networks take cotangents for x only: their parameters are
  frozen here, and their weight gradients would cost as much as the input gradients. With both on
  'full' and no fusion the recomputations are serialised, so one network's activations live at a time.
  """
  if pair_fn is not None:
    if opts.remat["teacher"] != "full":
      return None, None, pair_fn
    return None, None, lambda tp, fp, x, s: recompute_in_backward(lambda v: pair_fn(tp, fp, v, s))(x)
  wrap = lambda fn: lambda p, x, s: recompute_in_backward(lambda v: fn(p, v, s))(x)
  if opts.remat["teacher"] == "full" and opts.remat["fake"] == "full":
    def serial(tp, fp, x, s):
      return recompute_pair_in_backward(lambda v: teacher_fn(tp, v, s), lambda v: fake_fn(fp, v, s))((x,), (x,))
    return None, None, serial
  pick = lambda fn, net: wrap(fn) if opts.remat[net] == "full" else fn
  return pick(teacher_fn, "teacher"), pick(fake_fn, "fake"), None


def check_fusable(nets: DistillNetworks):
  if nets.teacher.module != nets.fake.module:
    raise UserError("perf.fuse_teacher_fake needs the teacher and the fake score to share one architecture "
                     "(they do when the fake score starts as a copy of a network teacher); set it False.")


def paired_denoise(module, teacher_variables, fake_variables, x, sigma, cond):
  """(D_teacher(x), D_fake(x)) from one call of `module`, vmapped over the two stacked parameter sets.

  Both networks see the same x_t and sigma, so one batched call replaces two, which fills wide
  accelerators better at small per-chip batches.
  """
  stacked = jax.tree.map(lambda a, b: jnp.stack([a, b]), teacher_variables, fake_variables)
  out = jax.vmap(lambda v: module.apply(v, x, sigma, cond, train=False))(stacked)
  return out[0], out[1]

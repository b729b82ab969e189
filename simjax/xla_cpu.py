"""XLA:CPU-only tuning, in one module and off the accelerator path.

Each piece is a form XLA:CPU runs faster (or in less memory) than the plain one, with the same maths; the
model and the step call the plain form on GPU/TPU and this one where `in_use()` (the CPU backend):

1. Host memory reuse (`keep_freed_memory`, `run_cpu_programs_inline`; `perf.reuse_host_memory`).
2. Resampling as slices (`upsample_2x`, `downsample_2x`): EDM's FIR up/down-sampling in polyphase form,
   where XLA:CPU runs depthwise strided and transposed convolutions slowly (networks/songunet.py keeps the
   depthwise convolutions for accelerators).
3. Recomputation ordered by a data dependence (`recompute_in_backward`, `recompute_pair_in_backward`): XLA:CPU
   expands `jax.checkpoint`'s optimisation barriers away and hoists the recomputation into the forward pass,
   which keeps the activations alive after all (measured: no memory saved); accelerators use
   `jax.checkpoint` (training/perf.py).

tests/test_songunet.py, test_perf.py and test_host_memory.py check each piece against the plain form.

Host memory reuse, in detail:

XLA:CPU mallocs each program's temporary buffer at every call and frees it afterwards. glibc serves
blocks above its mmap threshold (at most 32 MiB) with a fresh mmap and unmaps them on free, so on every
call the kernel faults in and zeroes every page again: the digits SIM iteration (72 MiB of temporaries
at batch 64) took ~18.5k page faults per step. Two settings remove them:
- malloc's mmap path and heap trimming are turned off, so a freed block stays in the heap for the next
  call (as an accelerator's pooling allocator keeps its pool); the process keeps its peak host memory.
  Trimming is turned off outright (threshold -1), not set to the largest int: a heap top above 2 GiB
  passes that, and the CIFAR-10 iteration at batch 4 (4.9 GB peak) was still faulting ~1.9 GiB a step;
- single-device CPU programs run on the calling thread (`jax_cpu_enable_async_dispatch=False`). On a
  worker thread glibc allocates from a per-thread arena whose heaps are capped at 64 MiB and mmaps
  anything larger regardless of the first setting; the main thread's heap has no cap. Dispatch is then
  synchronous, which costs the overlap of Python with a step (well under 1% of a step here).
Linux/glibc only; elsewhere nothing is changed.
"""
import contextlib
import ctypes
import ctypes.util
import functools
import platform
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

_forced_off = False


def in_use() -> bool:
  """Whether the XLA:CPU forms apply: on JAX's default backend being the CPU, unless inside `plain_forms()`."""
  return not _forced_off and jax.default_backend() == "cpu"


@contextlib.contextmanager
def plain_forms():
  """Traces with the accelerators' forms on any backend (tests compare the two paths on a CPU)."""
  global _forced_off
  previous, _forced_off = _forced_off, True
  try:
    yield
  finally:
    _forced_off = previous


# 1. Host memory reuse.

_M_TRIM_THRESHOLD = -1  # from glibc's malloc.h
_M_MMAP_MAX = -4
_NEVER = -1  # mallopt(3): a trim threshold of -1 disables trimming (it becomes SIZE_MAX)


@functools.lru_cache(maxsize=None)
def _glibc():
  if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
    return None
  libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
  return libc if hasattr(libc, "mallopt") else None


def supported() -> bool:
  """Whether this process's malloc can be told to keep freed memory (glibc)."""
  return _glibc() is not None


_applied = False


def keep_freed_memory() -> bool:
  """Serves every allocation from the heap and never trims it; idempotent. Returns whether it applied."""
  global _applied
  libc = _glibc()
  if libc is None:
    return False
  if not _applied:
    ok = libc.mallopt(_M_MMAP_MAX, 0) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, _NEVER) == 1
    if not ok:
      raise RuntimeError("glibc refused mallopt(M_MMAP_MAX/M_TRIM_THRESHOLD); set perf.reuse_host_memory='off'.")
    _applied = True
  return True


def run_cpu_programs_inline():
  """Runs single-device CPU programs on the calling thread, whose heap is not capped (see above). Only
  takes effect before JAX starts its backends; other backends are unaffected."""
  jax.config.update("jax_cpu_enable_async_dispatch", False)


def is_applied() -> bool:
  return _applied


# 2. Resampling as slices.


def _resample_taps(resample_filter: Sequence[float]) -> np.ndarray:
  """EDM's 1-D resampling taps f / sum(f); resample_kernel_2d is their outer product."""
  f = np.asarray(resample_filter, np.float32)
  return f / f.sum()


def _pad_axis(x, axis, low, high):
  """Zero-pads (or, for negative amounts, crops) one axis."""
  config = [(0, 0, 0)] * x.ndim
  config[axis] = (low, high, 0)
  return jax.lax.pad(x, jnp.zeros((), x.dtype), config)


def _weighted_sum(terms):
  """sum(tap * x) over (tap, x) pairs, skipping multiplications by exactly 1."""
  total = None
  for tap, x in terms:
    term = x if tap == 1.0 else x * tap
    total = term if total is None else total + term
  return total


def _downsample_axis(x, taps, padding, axis):
  """y[i] = sum_k taps[k] x_pad[2 i + k] along `axis` (torch conv1d, stride 2, zero padding).

  Polyphase form: the padded axis is split into (pairs, 2), so every tap is a unit-stride slice of
  one phase; XLA fuses the whole thing into one loop, where a depthwise strided convolution is slow
  on XLA:CPU.
  """
  num_taps, length = len(taps), x.shape[axis]
  out = (length + 2 * padding - num_taps) // 2 + 1
  pairs = out + (num_taps - 1) // 2
  x = _pad_axis(x, axis, padding, 2 * pairs - length - padding)
  x = x.reshape(x.shape[:axis] + (pairs, 2) + x.shape[axis + 1:])
  phase = lambda k: jax.lax.index_in_dim(x, k % 2, axis + 1, keepdims=False)
  return _weighted_sum((float(tap), jax.lax.slice_in_dim(phase(k), k // 2, k // 2 + out, axis=axis))
                       for k, tap in enumerate(taps))


def _upsample_axis(x, taps, padding, axis):
  """torch conv_transpose1d(x, taps, stride=2, padding) along `axis`: y[2 i + k - padding] += taps[k] x[i].

  Polyphase form: output phase r (o = 2 m + r) gathers the taps k = r + padding (mod 2) as
  y_r[m] = sum_k taps[k] x[m + (r + padding - k) / 2]; the two phases are interleaved by a reshape.
  No multiplications by the zeros a dilated convolution would insert.
  """
  num_taps, length = len(taps), x.shape[axis]
  out = 2 * (length - 1) + num_taps - 2 * padding
  per_phase = (out + 1) // 2
  offsets = {r: [(k, (r + padding - k) // 2) for k in range(num_taps) if (r + padding - k) % 2 == 0] for r in (0, 1)}
  all_offsets = [d for terms in offsets.values() for _, d in terms]
  low = max(0, -min(all_offsets))
  x = _pad_axis(x, axis, low, max(0, per_phase - length + max(all_offsets)))
  phases = [_weighted_sum((float(taps[k]), jax.lax.slice_in_dim(x, d + low, d + low + per_phase, axis=axis))
                          for k, d in offsets[r]) for r in (0, 1)]
  y = jnp.stack(phases, axis=axis + 1)
  y = y.reshape(y.shape[:axis] + (2 * per_phase,) + y.shape[axis + 2:])
  return jax.lax.slice_in_dim(y, 0, out, axis=axis)


def _is_box_2x(resample_filter, padding, x=None):
  """True for DDPM++'s [1, 1] filter without padding on even-sized images: plain 2x2 blocks."""
  box = len(resample_filter) == 2 and resample_filter[0] == resample_filter[1] and padding == 0
  return box and (x is None or (x.shape[1] % 2 == 0 and x.shape[2] % 2 == 0))


def upsample_2x(x, resample_filter, padding):
  """torch conv_transpose2d(x, 4 outer(f, f), groups=C, stride=2, padding) with f = filter / sum.

  The 2-D filter is separable, 4 outer(f, f) = outer(2 f, 2 f), so it is two 1-D passes over H and
  W. For the DDPM++ filter [1, 1] the taps are exactly 1: nearest-neighbour 2x repetition, written
  as a broadcast (the cheapest form on XLA:CPU). Sums run in float32 (as a convolution
  accumulates), the result is cast back to x's dtype.
  """
  if _is_box_2x(resample_filter, padding):
    n, h, w, c = x.shape
    return jnp.broadcast_to(x[:, :, None, :, None, :], (n, h, 2, w, 2, c)).reshape(n, 2 * h, 2 * w, c)
  taps = 2.0 * _resample_taps(resample_filter)
  y = _upsample_axis(x.astype(jnp.float32), taps, padding, axis=1)
  return _upsample_axis(y, taps, padding, axis=2).astype(x.dtype)


def downsample_2x(x, resample_filter, padding):
  """torch conv2d(x, outer(f, f), groups=C, stride=2, padding) with f = filter / sum: filtered 2x
  decimation as two separable 1-D passes; for [1, 1] exactly the mean of each 2x2 block."""
  if _is_box_2x(resample_filter, padding, x):
    n, h, w, c = x.shape
    blocks = x.astype(jnp.float32).reshape(n, h // 2, 2, w // 2, 2, c)
    corner = lambda i, j: blocks[:, :, i, :, j, :]
    return (((corner(0, 0) + corner(0, 1)) + (corner(1, 0) + corner(1, 1))) * 0.25).astype(x.dtype)
  taps = _resample_taps(resample_filter)
  y = _downsample_axis(x.astype(jnp.float32), taps, padding, axis=1)
  return _downsample_axis(y, taps, padding, axis=2).astype(x.dtype)


# 3. Recomputation ordered by a data dependence.


def after(tree, dependency):
  """`tree` made data-dependent on `dependency` (adds 0 * one of its elements), so XLA cannot compute
  anything from the result before `dependency` exists. XLA:CPU expands `optimization_barrier` away
  and then schedules recomputation early; a data dependence holds on every backend. (A non-finite
  dependency makes the result non-finite too, but then the gradient already is: the step is skipped.)"""
  zero = jnp.zeros((), jnp.float32) * jnp.ravel(jax.tree.leaves(dependency)[0])[0].astype(jnp.float32)
  return jax.tree.map(lambda a: a + zero.astype(a.dtype), tree)


def recompute_in_backward(fn: Callable) -> Callable:
  """fn(*args), keeping none of its activations: the backward pass re-runs fn's forward, and only once
  the cotangent has arrived.

  Plain `jax.checkpoint` leaves the order to XLA's scheduler, and XLA:CPU hoists the recomputation
  into the forward pass, which keeps the activations alive after all (measured: no memory saved).
  All of fn's arguments get cotangents, so close over what is not differentiated.
  """
  @jax.custom_vjp
  def run(*args):
    return fn(*args)

  def fwd(*args):
    return fn(*args), args

  def bwd(args, ct):
    return jax.vjp(fn, *after(args, ct))[1](ct)

  run.defvjp(fwd, bwd)
  return run


def recompute_pair_in_backward(fn_a: Callable, fn_b: Callable) -> Callable:
  """(args_a, args_b) -> (fn_a(*args_a), fn_b(*args_b)), both recomputed in the backward pass one after
  the other: b's recomputation waits for a's input cotangents, so only one network's activations are
  alive at a time (the teacher and the fake score of the generator step)."""
  @jax.custom_vjp
  def run(args_a, args_b):
    return fn_a(*args_a), fn_b(*args_b)

  def fwd(args_a, args_b):
    return run(args_a, args_b), (args_a, args_b)

  def bwd(res, cts):
    (args_a, args_b), (ct_a, ct_b) = res, cts
    grads_a = jax.vjp(fn_a, *after(args_a, ct_a))[1](ct_a)
    grads_b = jax.vjp(fn_b, *after(args_b, grads_a))[1](ct_b)
    return grads_a, grads_b

  run.defvjp(fwd, bwd)
  return run

"""Keeps freed host memory in the process, so XLA:CPU's per-call buffers are not page-faulted every step.

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
import ctypes
import ctypes.util
import functools
import platform

import jax

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

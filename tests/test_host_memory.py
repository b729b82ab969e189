"""perf.reuse_host_memory: XLA:CPU's per-call temporaries stop being page-faulted on every call.

Each case runs in a fresh process (the settings are process-wide and must precede the backend); the
program's temporaries (96 MiB) exceed both glibc's mmap threshold and its per-thread heap cap, and a
2.25 GiB block checks that trimming is off for blocks of any size.
"""
import json
import os
import subprocess
import sys

import ml_collections
import pytest

from simjax import xla_cpu
from simjax.training import perf

pytestmark = pytest.mark.skipif(not xla_cpu.supported(), reason="host memory reuse needs Linux with glibc")

PROBE = r"""
import json, resource, sys
import ml_collections
from simjax import xla_cpu
from simjax.training import perf
cfg = ml_collections.ConfigDict({"perf": perf.default_config()})
cfg.perf.reuse_host_memory = sys.argv[1]
perf.before_backend_start(cfg)  # as simjax.main does
import jax, jax.numpy as jnp
perf.apply_process_options(perf.resolve(cfg))
x = jnp.ones((12 * 2**20,), jnp.float32)
step = jax.jit(lambda x: jnp.sum(jnp.sin(x) * jnp.flip(jnp.cos(x)))).lower(x).compile()
step(x).block_until_ready()
faults = []
for _ in range(9):
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  step(x).block_until_ready()
  faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
# The median call: now and then a small allocation lands in the freed block and the heap grows once.
print(json.dumps({"faults_per_call": sorted(faults)[len(faults) // 2], "applied": xla_cpu.is_applied(),
                  "temp_pages": step.memory_analysis().temp_size_in_bytes / resource.getpagesize()}))
"""


def _probe(mode):
  return _run(PROBE, mode)


def _run(script, mode):
  env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "GLIBC_TUNABLES")}
  env["JAX_PLATFORMS"] = "cpu"
  out = subprocess.run([sys.executable, "-c", script, mode], capture_output=True, text=True, env=env, timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  return json.loads(out.stdout.strip().splitlines()[-1])


def test_temporaries_are_reused_instead_of_faulted_in():
  off, on, auto = _probe("off"), _probe("on"), _probe("auto")
  assert off["temp_pages"] > 64 * 2**20 / 4096  # above the per-thread heap cap, where it matters most
  # Control: without the setting every call faults its temporaries in again (what the setting fixes).
  assert off["faults_per_call"] > 0.5 * off["temp_pages"], off
  assert not off["applied"]
  for result in (on, auto):  # auto means on for the CPU backend
    assert result["applied"]
    assert result["faults_per_call"] < 0.05 * result["temp_pages"], result


HEAP_PROBE = r"""
import ctypes, ctypes.util, json, resource, sys
from simjax import xla_cpu
libc = ctypes.CDLL(ctypes.util.find_library("c"))
if sys.argv[1] == "on":
  xla_cpu.keep_freed_memory()
else:  # control: mmap off, but the largest *positive* trim threshold (2 GiB - 1), which a top above it passes
  assert libc.mallopt(xla_cpu._M_MMAP_MAX, 0) == 1 and libc.mallopt(xla_cpu._M_TRIM_THRESHOLD, 2**31 - 1) == 1
libc.malloc.restype, libc.malloc.argtypes, libc.free.argtypes = ctypes.c_void_p, [ctypes.c_size_t], [ctypes.c_void_p]
size = 2**31 + 2**28  # a 2.25 GiB block, like a CIFAR-10 iteration's temporaries at batch 4 on CPU
faults = []
for _ in range(3):
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  block = libc.malloc(size)
  ctypes.memset(block, 1, size)
  libc.free(block)
  faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"faults_after_first": faults[1:], "pages": size / resource.getpagesize()}))
"""


def test_a_heap_top_above_2gib_is_not_trimmed():
  """Freed blocks above 2 GiB stay in the heap too: trimming is turned off, not just raised to the
  largest threshold mallopt's int takes (the CIFAR-10 iteration faulted ~1.9 GiB per step that way)."""
  on, control = _run(HEAP_PROBE, "on"), _run(HEAP_PROBE, "int_max")
  assert min(control["faults_after_first"]) > 0.5 * control["pages"], control
  assert max(on["faults_after_first"]) < 0.05 * on["pages"], on


def _config(mode):
  return ml_collections.ConfigDict({"perf": {**perf.default_config().to_dict(), "reuse_host_memory": mode}})


def test_modes_resolve_and_bad_values_are_refused():
  assert perf.resolve(_config("auto"), backend="cpu").reuse_host_memory
  assert not perf.resolve(_config("auto"), backend="gpu").reuse_host_memory
  assert perf.resolve(_config("on"), backend="gpu").reuse_host_memory
  assert not perf.resolve(_config("off"), backend="cpu").reuse_host_memory
  for call in (lambda: perf.resolve(_config("yes"), backend="cpu"), lambda: perf.host_memory_mode(_config("yes"))):
    with pytest.raises(ValueError, match=r"perf.reuse_host_memory='yes'; use one of"):
      call()

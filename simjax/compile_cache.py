"""The persistent XLA compilation cache: a resumed or repeated run skips recompiling its steps."""
import os

import jax


def enable_compilation_cache():
  """SIMJAX_COMPILATION_CACHE names the directory (default ~/.cache/simjax/xla); 'off' disables it."""
  path = os.environ.get("SIMJAX_COMPILATION_CACHE", os.path.expanduser("~/.cache/simjax/xla"))
  if path and path != "off":
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)

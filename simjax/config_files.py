"""Config files are plain Python files loaded by path (ml_collections' config_flags); this loads their siblings.

configs/*.py share defaults through configs/common.py (flax examples' `default.py` habit) without the
configs directory being a package or on sys.path:

  common = config_files.sibling(__file__, "common")
"""
import importlib.util
import pathlib


def load(path):
  """The Python file at `path` as a fresh module (its own name, so two config trees never collide)."""
  path = pathlib.Path(path).resolve()
  spec = importlib.util.spec_from_file_location(f"simjax_config_file_{path.stem}_{abs(hash(str(path)))}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def sibling(config_file, name: str):
  """configs/NAME.py beside `config_file` (pass `__file__`)."""
  return load(pathlib.Path(config_file).resolve().with_name(f"{name}.py"))

"""`simjax.load_teacher`: one entry point for every teacher format, dispatched on what the path holds."""
from pathlib import Path

import jax.numpy as jnp

from simjax import torch_files
from simjax.teachers import edm_checkpoints, transformer_checkpoints

_TORCH_SUFFIXES = (".pt", ".pth")


def load_teacher(path, *, arch=None, dtype=jnp.float32, precision=None) -> edm_checkpoints.Teacher:
  """A frozen teacher denoiser from:
  - EDM: a network pickle (.pkl), a state dict (.pt/.pth/.npz, with `arch` or an arch file beside it),
    or a `convert_edm` directory;
  - PixArt-alpha / DiT: a diffusers pipeline directory (model_index.json, transformer/, scheduler/), a
    diffusers transformer folder, an original PixArt .pth, SIM's released .pt or DiT's .pt.
  Its `denoise(x, sigma, cond)` is D(x, sigma) on NHWC float32 inputs. `dtype` is the network's
  compute dtype; `arch` overrides or supplies the architecture."""
  path = Path(path)
  if transformer_checkpoints.is_transformer_checkpoint(path):
    return transformer_checkpoints.load_teacher(path, arch=arch, dtype=dtype, precision=precision)
  if path.is_file() and path.suffix in _TORCH_SUFFIXES:
    state = torch_files.load_state_dict(path)  # read once, then dispatched on its tensor names
    if transformer_checkpoints.is_transformer_state(state):
      return transformer_checkpoints.load_teacher(path, arch=arch, state=state, dtype=dtype, precision=precision)
    arch_, variables = edm_checkpoints.read_edm_checkpoint(path, arch=arch, state=state)
    return edm_checkpoints.teacher_from_variables(arch_, variables, dtype=dtype, precision=precision)
  return edm_checkpoints.load_teacher(path, arch=arch, dtype=dtype, precision=precision)

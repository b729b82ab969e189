"""PyTorch-ecosystem weight files (safetensors, torch .bin, sharded sets) read without torch, and the
rule that turns their tensor names into flax parameter paths.

Every loader of a published checkpoint (PixArt / DiT, the VAE, T5) goes through here, so each accepts
the same layouts: one file, a sharded set through its `*.index.json`, or a lone variant such as
`model.fp16.safetensors`. Safetensors are read with safetensors.numpy, and bfloat16 tensors (which
numpy cannot name) through the file's own header with ml_dtypes' bfloat16. torch `.bin` files go
through simjax.torch_files, which runs no code from the file.
"""
import json
import re
import struct
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import flax
import numpy as np

from simjax import torch_files
from simjax.errors import UserError

# diffusers' names for one model's weights (transformer, VAE), in order of preference.
DIFFUSERS_WEIGHTS = ("diffusion_pytorch_model.safetensors.index.json", "diffusion_pytorch_model.safetensors",
                     "diffusion_pytorch_model.bin.index.json", "diffusion_pytorch_model.bin")
_SAFETENSORS_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "I64": np.int64, "I32": np.int32,
                       "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}
_SHARD = re.compile(r"-\d+-of-\d+\.(safetensors|bin)$")


class CheckpointMismatch(UserError):
  """The tensors of a file do not fit the architecture (names the missing/unexpected/misshapen)."""


def flax_path(key: str) -> Tuple[str, ...]:
  """A torch tensor name as a flax path, '.<i>' joined to the list it indexes:
  'transformer_blocks.3.attn2.to_out.0.weight' -> ('transformer_blocks_3', 'attn2', 'to_out_0', 'weight')."""
  parts: List[str] = []
  for part in key.split("."):
    if part.isdigit() and parts:
      parts[-1] = f"{parts[-1]}_{part}"
    else:
      parts.append(part)
  return tuple(parts)


def kernel_from_torch(weight: np.ndarray) -> np.ndarray:
  """A torch weight in flax's layout: convolutions OIHW -> HWIO, linear layers [out, in] -> [in, out]
  (a view, not a copy); other ranks unchanged."""
  if weight.ndim == 4:
    return weight.transpose(2, 3, 1, 0)
  if weight.ndim == 2:
    return weight.T
  return weight


def torch_kernel_shape(shape) -> Tuple[int, ...]:
  """The shape a flax kernel has in torch's layout (the inverse of kernel_from_torch)."""
  shape = tuple(shape)
  if len(shape) == 4:
    h, w, i, o = shape
    return (o, i, h, w)
  return shape[::-1] if len(shape) == 2 else shape


def _read_raw_safetensors(path: Path) -> Dict[str, np.ndarray]:
  """A .safetensors file through its header (8-byte length, JSON, then raw little-endian data), for the
  dtypes safetensors.numpy cannot return (bfloat16)."""
  import ml_dtypes  # pylint: disable=import-outside-toplevel
  dtypes = {**_SAFETENSORS_DTYPES, "BF16": np.dtype(ml_dtypes.bfloat16)}
  with open(path, "rb") as f:
    header_size = struct.unpack("<Q", f.read(8))[0]
    header = json.loads(f.read(header_size))
  data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + header_size)
  state = {}
  for name, info in header.items():
    if name == "__metadata__":
      continue
    if info["dtype"] not in dtypes:
      raise ValueError(f"{path}: tensor {name} has dtype {info['dtype']}, which simjax does not read; save the "
                       "checkpoint in float32, float16 or bfloat16.")
    start, end = info["data_offsets"]
    state[name] = np.array(data[start:end].view(dtypes[info["dtype"]]).reshape(info["shape"]))
  return state


def read_weight_file(path) -> Dict[str, np.ndarray]:
  """Tensor name -> numpy array from one .safetensors file or torch .bin state dict."""
  path = Path(path)
  if path.suffix != ".safetensors":
    return torch_files.load_state_dict(path)
  from safetensors.numpy import load_file  # pylint: disable=import-outside-toplevel
  try:
    return load_file(str(path))
  except TypeError:  # "data type 'bfloat16' not understood"
    return _read_raw_safetensors(path)


def _index_files(index: Path) -> List[Path]:
  files = sorted({index.parent / name for name in json.loads(index.read_text())["weight_map"].values()})
  absent = [f.name for f in files if not f.is_file()]
  if absent:
    raise FileNotFoundError(f"{index} names shards that are not in {index.parent}: {absent[:4]}; download them too.")
  return files


def weight_files(folder, preferred: Sequence[str], what: str) -> List[Path]:
  """The files of one set of weights in `folder`: the first of `preferred` present (an index gives its
  shards), else the folder's only weight set (e.g. a variant such as model.fp16.safetensors)."""
  folder = Path(folder)
  for name in preferred:
    if (folder / name).is_file():
      return _index_files(folder / name) if name.endswith(".index.json") else [folder / name]
  candidates = sorted(folder.glob("*.index.json")) + [
      p for p in sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.bin")) if not _SHARD.search(p.name)]
  if len(candidates) != 1:
    raise FileNotFoundError(f"{folder} has {'several' if candidates else 'no'} {what} weight sets "
                            f"{[c.name for c in candidates]}; expected {' or '.join(preferred)}.")
  return _index_files(candidates[0]) if candidates[0].name.endswith(".index.json") else candidates


def read_weights(folder, preferred: Sequence[str], what: str) -> Dict[str, np.ndarray]:
  """Every tensor of the weight set `weight_files` picks."""
  state: Dict[str, np.ndarray] = {}
  for f in weight_files(folder, preferred, what):
    state.update(read_weight_file(f))
  return state


def component_folder(path, subfolder: str, what: str) -> Path:
  """The folder holding a model's config.json: `path` itself, or `path/<subfolder>` in a pipeline root."""
  path = Path(path)
  if not path.exists():
    raise FileNotFoundError(f"no such file or directory: {path}")
  if not path.is_dir():
    raise FileNotFoundError(f"{path} is a file; give the {what} folder (config.json + weights) or the pipeline "
                            f"root holding {subfolder}/.")
  for folder in (path, path / subfolder):
    if (folder / "config.json").is_file():
      return folder
  raise FileNotFoundError(f"{path} is neither a {what} folder (config.json + weights) nor a pipeline with one "
                          f"under {subfolder}/.")


def fit_params(flat, expected, *, what: str, names=None, file_shapes=None, torch_name=None, torch_shape=None,
               hint: str = ""):
  """`{'params': ...}` from converted leaves `flat` ({flax path: array}) once they are exactly the
  `expected` ones ({flax path: ShapeDtypeStruct}); else a CheckpointMismatch naming the missing,
  unexpected or misshapen tensors. `names` / `file_shapes` give each converted leaf's name and shape in
  the file; `torch_name(path)` / `torch_shape(path, shape)` name an expected leaf as the file would
  (default: the flax path and shape)."""
  names = names or {}
  file_shapes = file_shapes or {}
  label = lambda k: names.get(k, "/".join(k))
  missing = sorted(torch_name(k) if torch_name else "/".join(k) for k in expected if k not in flat)
  unexpected = sorted(label(k) for k in flat if k not in expected)
  if missing or unexpected:
    raise CheckpointMismatch(f"{what} does not match the architecture: missing {missing[:8]}, "
                             f"unexpected {unexpected[:8]}{hint}.")
  wrong = [f"{label(k)} {tuple(file_shapes.get(k, flat[k].shape))} != "
           f"{torch_shape(k, v.shape) if torch_shape else tuple(v.shape)}"
           for k, v in expected.items() if flat[k].shape != v.shape]
  if wrong:
    raise CheckpointMismatch(f"{what}: tensor shapes do not match the architecture: {wrong[:8]}{hint}.")
  return {"params": flax.traverse_util.unflatten_dict(flat)}

"""transformers T5 checkpoints -> simjax's Flax T5 encoder (`simjax.networks.t5`), without torch.

Reads a transformers folder (`config.json` + `model.safetensors`, sharded through
`model.safetensors.index.json`, or `pytorch_model.bin` / its index through simjax.torch_files, which
runs no code from the file), or a diffusers pipeline root holding one under `text_encoder/` (PixArt's
T5-v1_1-XXL). The file may be an encoder-only `T5EncoderModel` or a full T5 (`T5ForConditionalGeneration`,
`T5Model`): `decoder.*` and `lm_head.*` are ignored. The input embedding is `shared.weight`, which
transformers ties to `encoder.embed_tokens.weight`; either (or both, if equal) may be in the file. Any
other missing, unexpected or misshapen tensor is a CheckpointMismatch naming it by its name in the file.

Files are read by simjax.weight_files (bfloat16 safetensors included). Parameters are float32 whatever
the file holds.

`load_text_encoder` returns a `TextEncoder` whose jitted `encode(token_ids, mask)` gives the
[N, L, d_model] float32 caption features PixArt cross-attends to.
"""
import dataclasses
import functools
import json
import re
from typing import Any, Dict, Mapping, Tuple

import flax
import jax
import jax.numpy as jnp
import numpy as np

from simjax import weight_files
from simjax.networks.t5 import FEED_FORWARD_KINDS, T5Encoder
from simjax.weight_files import CheckpointMismatch

# Model types whose encoder is T5's (mT5 is T5 v1.1 with a larger vocabulary). UMT5 is not: every one of
# its layers has its own position-bias table.
MODEL_TYPES = ("t5", "mt5")
# transformers' T5Config defaults, which a config.json relies on for the keys it omits.
CONFIG_DEFAULTS = dict(vocab_size=32128, d_model=512, d_kv=64, d_ff=2048, num_layers=6, num_heads=8,
                       relative_attention_num_buckets=32, relative_attention_max_distance=128,
                       layer_norm_epsilon=1e-6, feed_forward_proj="relu")
EMBEDDING_NAMES = ("encoder.embed_tokens.weight", "shared.weight")  # tied: the first is what the encoder reads
IGNORED_PREFIXES = ("decoder.", "lm_head.")
# Weight files in order of preference; a lone variant (model.fp16.safetensors, ...) is taken otherwise.
WEIGHT_SETS = ("model.safetensors.index.json", "model.safetensors", "pytorch_model.bin.index.json",
               "pytorch_model.bin")

def arch_from_config(config: Mapping[str, Any]) -> Dict[str, Any]:
  """T5Encoder kwargs from a transformers T5 `config.json` (absent keys take T5Config's defaults)."""
  model_type = config.get("model_type", "t5")
  if model_type not in MODEL_TYPES:
    raise ValueError(f"model_type={model_type!r} is not a T5 encoder; simjax reads {MODEL_TYPES} configs "
                     "(UMT5's per-layer position biases are not supported).")
  if config.get("is_decoder", False):
    raise ValueError("this config is a T5 decoder (is_decoder=true); point at the encoder's checkpoint "
                     "(T5EncoderModel, or a full T5 whose encoder is read).")
  arch = {key: config.get(key, default) for key, default in CONFIG_DEFAULTS.items()}
  if arch["feed_forward_proj"] not in FEED_FORWARD_KINDS:
    raise ValueError(f"feed_forward_proj={arch['feed_forward_proj']!r} is not supported; simjax's T5 encoder has "
                     f"{FEED_FORWARD_KINDS} (T5 v1.1 / the original T5).")
  for key in CONFIG_DEFAULTS:
    if key not in ("layer_norm_epsilon", "feed_forward_proj"):
      arch[key] = int(arch[key])
  arch["layer_norm_epsilon"] = float(arch["layer_norm_epsilon"])
  if arch["num_layers"] < 1:
    raise ValueError(f"num_layers={arch['num_layers']}: this config has no encoder blocks.")
  return arch


# ----------------------------------------------------------------------------------------------
# Names.


def _to_torch_name(path: Tuple[str, ...]) -> str:
  """The inverse of weight_files.flax_path + _to_flax_leaf's renaming (only `block` and `layer` are lists)."""
  parts = [re.sub(r"^(block|layer)_(\d+)$", r"\1.\2", p) for p in path[:-1]]
  return ".".join(parts + ["weight"])


def _to_flax_leaf(path: Tuple[str, ...], value: np.ndarray) -> Tuple[Tuple[str, ...], np.ndarray]:
  if path[-1] != "weight" or len(path) < 2:
    return path, value  # a bias or anything else: unexpected, reported by name
  if path[-2].endswith("layer_norm"):
    return path[:-1] + ("scale",), value
  if path[-2] in ("relative_attention_bias", "shared"):
    return path[:-1] + ("embedding",), value
  return path[:-1] + ("kernel",), weight_files.kernel_from_torch(value)


def _torch_shape(path: Tuple[str, ...], shape) -> Tuple[int, ...]:
  return weight_files.torch_kernel_shape(shape) if path[-1] == "kernel" else tuple(shape)


def _embedding(state: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
  """The input embedding as `shared.weight`, from whichever tied copies the file holds."""
  copies = {name: state.pop(name) for name in EMBEDDING_NAMES if name in state}
  if len(copies) == 2:
    first, second = copies.values()
    if first.shape != second.shape or not np.array_equal(first, second):
      raise CheckpointMismatch(f"{' and '.join(EMBEDDING_NAMES)} differ; T5 ties them, so the file is inconsistent "
                               "(re-save it with transformers).")
  return {"shared.weight": next(iter(copies.values()))} if copies else {}


def param_shapes(module: T5Encoder) -> dict:
  """The variables' shapes (jax.ShapeDtypeStruct pytree) without materialising them."""
  ids = jnp.zeros((1, 2), jnp.int32)
  return jax.eval_shape(lambda: module.init(jax.random.key(0), ids, jnp.ones((1, 2), jnp.float32)))


def convert_state_dict(arch: Mapping[str, Any], state: Mapping[str, np.ndarray]) -> dict:
  """Flax `{'params': ...}` for T5Encoder(**arch) from a transformers-named T5 state dict. float32
  tensors are not copied (kernels are transposed views), so converting XXL costs no second 19 GB."""
  state = {k: v for k, v in state.items() if not k.startswith(IGNORED_PREFIXES)}
  state.update(_embedding(state))
  flat, names, file_shapes = {}, {}, {}
  for key, value in state.items():
    value = np.asarray(value)
    path, leaf = _to_flax_leaf(weight_files.flax_path(key), value)
    flat[path], names[path], file_shapes[path] = np.asarray(leaf, np.float32), key, value.shape
  expected = flax.traverse_util.flatten_dict(param_shapes(T5Encoder(**arch))["params"])
  return weight_files.fit_params(flat, expected, what="the T5 checkpoint", names=names, file_shapes=file_shapes,
                                 torch_name=_to_torch_name, torch_shape=_torch_shape)


# ----------------------------------------------------------------------------------------------
# Files.


def read_text_encoder_checkpoint(path) -> Tuple[Dict[str, Any], dict]:
  """(arch, {'params': ...}) of a transformers T5 folder or a diffusers pipeline root."""
  folder = weight_files.component_folder(path, "text_encoder", "transformers T5")
  arch = arch_from_config(json.loads((folder / "config.json").read_text()))
  return arch, convert_state_dict(arch, weight_files.read_weights(folder, WEIGHT_SETS, "T5"))


def _to_torch_tensor(path: Tuple[str, ...], value: np.ndarray) -> Tuple[str, np.ndarray]:
  """The inverse of _to_flax_leaf: a flax leaf as its transformers name and layout."""
  value = np.asarray(value, np.float32)
  if path[-1] == "kernel":
    value = np.ascontiguousarray(value.T)
  return _to_torch_name(path), value


def save_text_encoder(out_dir, arch: Mapping[str, Any], params) -> None:
  """A transformers-format T5EncoderModel folder (config.json + model.safetensors) of T5Encoder(**arch) with
  `params`, written whole or not at all; `load_text_encoder` (and transformers) read it back."""
  from safetensors.numpy import save as save_safetensors  # pylint: disable=import-outside-toplevel
  from simjax import storage  # pylint: disable=import-outside-toplevel
  config = {"model_type": "t5", "architectures": ["T5EncoderModel"], "is_encoder_decoder": True,
            **{key: arch[key] for key in CONFIG_DEFAULTS}}
  tensors = dict(_to_torch_tensor(path, value) for path, value in
                 flax.traverse_util.flatten_dict(jax.device_get(dict(params))).items())
  with storage.staged_directory(out_dir, replace=True) as staging:
    (staging / "config.json").write_text(json.dumps(config, indent=1, sort_keys=True))
    (staging / "model.safetensors").write_bytes(save_safetensors(tensors))


# ----------------------------------------------------------------------------------------------
# The loaded encoder.


@functools.partial(jax.jit, static_argnames="module")
def _encode(module: T5Encoder, params, token_ids, mask):
  return module.apply(params, token_ids, mask)


@dataclasses.dataclass(frozen=True)
class TextEncoder:
  """A loaded T5 encoder (see load_text_encoder). Jitted once per module and shape, shared by every
  TextEncoder with the same architecture."""
  module: T5Encoder
  params: Any
  arch: Dict[str, Any]

  def encode(self, token_ids, mask) -> jax.Array:
    """token_ids [N, L] int, mask [N, L] (1 token, 0 padding; a tokenizer's output) -> [N, L, d_model] float32."""
    if not isinstance(token_ids, jax.core.Tracer):
      ids = np.asarray(token_ids)
      if ids.size and (ids.min() < 0 or ids.max() >= self.module.vocab_size):
        raise ValueError(f"token ids span [{ids.min()}, {ids.max()}] but this T5 encoder's vocabulary is "
                         f"[0, {self.module.vocab_size}); use the tokenizer that came with the checkpoint.")
    return _encode(self.module, self.params, jnp.asarray(token_ids, jnp.int32), jnp.asarray(mask, jnp.float32))


def load_text_encoder(path, *, dtype=jnp.float32, precision=None) -> TextEncoder:
  """The T5 encoder of a transformers folder or pipeline root; `dtype` is the compute dtype (float32 or
  bfloat16; parameters stay float32), `precision` every matmul's (jax.lax.Precision; None is XLA's
  default, TF32 for float32 on recent NVIDIA GPUs; HIGHEST for exact float32)."""
  arch, variables = read_text_encoder_checkpoint(path)
  module = T5Encoder(**arch, dtype=dtype, precision=precision)
  return TextEncoder(module=module, params=jax.tree.map(jnp.asarray, variables), arch=arch)

"""PixArt-alpha and DiT checkpoints -> simjax's DiffusionTransformer, without torch and without running
code from the files.

Formats read:
- a diffusers transformer folder (`config.json` + `diffusion_pytorch_model*.safetensors`, sharded or
  not, or a `.bin` state dict), or a diffusers pipeline directory (`model_index.json` with it under
  `transformer/`);
- PixArt-alpha's original `.pth` (`state_dict` key), SIM's released `.pt` (`ema` key, `module.`
  prefixes), facebookresearch/DiT's `.pt` (a bare state dict): their names are mapped to diffusers'
  and the architecture is read from the tensor shapes.

The names are diffusers' (`simjax.networks.dit` explains the mapping); a missing, unexpected or
misshapen tensor is an error naming it. PixArt's learned null caption (`y_embedder.y_embedding`,
[L, 4096]), present in the original files and dropped by diffusers' converter, is returned beside the
parameters so guidance can use it.
"""
import json
import math
import re
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Tuple

import flax
import jax
import jax.numpy as jnp
import numpy as np

from simjax import torch_files, weight_files
from simjax.weight_files import CheckpointMismatch
from simjax.networks.discrete_vp import DiscreteVPPrecond
from simjax.networks.dit import DiffusionTransformer, stack_blocks

# diffusers config keys -> DiffusionTransformer fields.
_PIXART_CLASSES = ("PixArtTransformer2DModel", "Transformer2DModel")
_DIT_CLASSES = ("DiTTransformer2DModel",)
# Attention heads of the published widths (not recoverable from the shapes of the original files).
_HEADS_OF_WIDTH = {384: 6, 768: 12, 1024: 16, 1152: 16}
NULL_CAPTION = "y_embedding"


def arch_from_diffusers_config(config: Mapping[str, Any]) -> Dict[str, Any]:
  """DiffusionTransformer kwargs from a diffusers transformer `config.json`."""
  name = config.get("_class_name", "PixArtTransformer2DModel")
  if name not in _PIXART_CLASSES + _DIT_CLASSES:
    raise ValueError(f"{name} is not a PixArt or DiT transformer; simjax reads {_PIXART_CLASSES + _DIT_CLASSES}.")
  dit = name in _DIT_CLASSES or config.get("norm_type") == "ada_norm_zero"
  if not dit and config.get("norm_type", "ada_norm_single") != "ada_norm_single":
    raise ValueError(f"norm_type={config.get('norm_type')!r} is not supported; PixArt uses 'ada_norm_single'.")
  if config.get("activation_fn", "gelu-approximate") != "gelu-approximate" or not config.get("attention_bias", True):
    raise ValueError("only tanh-GELU feed-forwards with biased attention (PixArt's and DiT's) are supported.")
  in_channels = int(config.get("in_channels", 4))
  sample_size = int(config.get("sample_size", 32 if dit else 128))
  # The classes' own defaults where a key is absent: PixArt 8 output channels, DiT in_channels.
  out_channels = config.get("out_channels", None if dit else 8)
  arch = dict(sample_size=sample_size, in_channels=in_channels, out_channels=int(out_channels or in_channels),
              patch_size=int(config.get("patch_size", 2)), num_heads=int(config.get("num_attention_heads", 16)),
              head_dim=int(config.get("attention_head_dim", 72)), depth=int(config.get("num_layers", 28)),
              norm_eps=float(config.get("norm_eps", 1e-5 if dit else 1e-6)))
  if dit:
    arch.update(adaln="zero", num_classes=int(config.get("num_embeds_ada_norm", 1000)), freq_shift=1.0)
  else:
    micro = config.get("use_additional_conditions")
    scale = config.get("interpolation_scale")
    arch.update(adaln="single", caption_channels=int(config.get("caption_channels") or 0),
                micro_conditions=bool(sample_size == 128 if micro is None else micro),
                interpolation_scale=float(max(sample_size // 64, 1) if scale is None else scale))
  return arch


# ----------------------------------------------------------------------------------------------
# Original (PixArt-alpha / DiT repository) names -> diffusers' names.


def _split_fused(state, out, src, dsts):
  """A fused [k*D, ...] projection (qkv, kv) -> k diffusers projections."""
  for suffix in ("weight", "bias"):
    for dst, part in zip(dsts, np.split(state.pop(f"{src}.{suffix}"), len(dsts), axis=0)):
      out[f"{dst}.{suffix}"] = part


def _move(state, out, src, dst):
  for suffix in ("weight", "bias"):
    if f"{src}.{suffix}" in state:
      out[f"{dst}.{suffix}"] = state.pop(f"{src}.{suffix}")


def _original_to_diffusers(state: Dict[str, np.ndarray]) -> Tuple[Dict[str, np.ndarray], Dict[str, Any]]:
  """(diffusers-named state with DiT's embedder as `emb.*`, the architecture read from the shapes)."""
  state = dict(state)
  pixart = "t_block.1.weight" in state
  out: Dict[str, np.ndarray] = {}
  positions = state.pop("pos_embed", None)
  _move(state, out, "x_embedder.proj", "pos_embed.proj")
  conv = out.get("pos_embed.proj.weight")
  if conv is None:
    raise CheckpointMismatch("no patch embedding (x_embedder.proj.weight): not a PixArt or DiT checkpoint.")
  width, in_channels, patch = conv.shape[0], conv.shape[1], conv.shape[2]
  depth = 1 + max(int(m.group(1)) for m in (re.match(r"blocks\.(\d+)\.", k) for k in state) if m)
  emb = "adaln_single.emb" if pixart else "emb"
  _move(state, out, "t_embedder.mlp.0", f"{emb}.timestep_embedder.linear_1")
  _move(state, out, "t_embedder.mlp.2", f"{emb}.timestep_embedder.linear_2")
  if pixart:
    _move(state, out, "t_block.1", "adaln_single.linear")
    _move(state, out, "y_embedder.y_proj.fc1", "caption_projection.linear_1")
    _move(state, out, "y_embedder.y_proj.fc2", "caption_projection.linear_2")
    _move(state, out, "csize_embedder.mlp.0", "adaln_single.emb.resolution_embedder.linear_1")
    _move(state, out, "csize_embedder.mlp.2", "adaln_single.emb.resolution_embedder.linear_2")
    _move(state, out, "ar_embedder.mlp.0", "adaln_single.emb.aspect_ratio_embedder.linear_1")
    _move(state, out, "ar_embedder.mlp.2", "adaln_single.emb.aspect_ratio_embedder.linear_2")
    _move(state, out, "final_layer.linear", "proj_out")
    if "final_layer.scale_shift_table" in state:
      out["scale_shift_table"] = state.pop("final_layer.scale_shift_table")
  else:
    if "y_embedder.embedding_table.weight" in state:
      out["emb.class_embedder.embedding_table.weight"] = state.pop("y_embedder.embedding_table.weight")
    _move(state, out, "final_layer.adaLN_modulation.1", "proj_out_1")
    _move(state, out, "final_layer.linear", "proj_out_2")
  for i in range(depth):
    src, dst = f"blocks.{i}", f"transformer_blocks.{i}"
    _split_fused(state, out, f"{src}.attn.qkv", [f"{dst}.attn1.to_{c}" for c in "qkv"])
    _move(state, out, f"{src}.attn.proj", f"{dst}.attn1.to_out.0")
    _move(state, out, f"{src}.mlp.fc1", f"{dst}.ff.net.0.proj")
    _move(state, out, f"{src}.mlp.fc2", f"{dst}.ff.net.2")
    if pixart:
      out[f"{dst}.scale_shift_table"] = state.pop(f"{src}.scale_shift_table")
      _move(state, out, f"{src}.cross_attn.q_linear", f"{dst}.attn2.to_q")
      _split_fused(state, out, f"{src}.cross_attn.kv_linear", [f"{dst}.attn2.to_k", f"{dst}.attn2.to_v"])
      _move(state, out, f"{src}.cross_attn.proj", f"{dst}.attn2.to_out.0")
    else:
      _move(state, out, f"{src}.adaLN_modulation.1", f"{dst}.norm1.linear")
  final = out["proj_out.weight" if pixart else "proj_out_2.weight"]
  tokens = positions.shape[-2] if positions is not None else None
  grid = int(round(math.sqrt(tokens))) if tokens else None
  arch = dict(in_channels=int(in_channels), out_channels=int(final.shape[0] // patch**2), patch_size=int(patch),
              depth=depth, norm_eps=1e-6, width=int(width))
  if width in _HEADS_OF_WIDTH:
    arch.update(num_heads=_HEADS_OF_WIDTH[width], head_dim=width // _HEADS_OF_WIDTH[width])
  if grid:
    arch["sample_size"] = grid * patch
  if pixart:
    arch.update(adaln="single", caption_channels=int(out["caption_projection.linear_1.weight"].shape[1]),
                micro_conditions="adaln_single.emb.resolution_embedder.linear_1.weight" in out)
    if grid:
      arch["interpolation_scale"] = float(max(grid * patch // 64, 1))
  else:
    table = out.get("emb.class_embedder.embedding_table.weight")
    arch.update(adaln="zero", num_classes=int(table.shape[0] - 1) if table is not None else 0, freq_shift=0.0)
  leftover = sorted(k for k in state if k != f"y_embedder.{NULL_CAPTION}")
  if leftover:
    raise CheckpointMismatch(f"unexpected tensors in the checkpoint: {leftover[:8]}")
  return out, arch


def _shared_dit_embedder(state: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
  """diffusers' DiT repeats the timestep/label embedder in every block: keep one copy as `emb.*`
  (refused if the copies differ, since the shared-embedder network could not reproduce it)."""
  pattern = re.compile(r"transformer_blocks\.(\d+)\.norm1\.emb\.(.+)")
  copies: Dict[str, list] = {}
  out = {}
  for key, value in state.items():
    m = pattern.fullmatch(key)
    if m:
      copies.setdefault(m.group(2), []).append((int(m.group(1)), value))
    else:
      out[key] = value
  for name, values in copies.items():
    values.sort(key=lambda iv: iv[0])
    first = values[0][1]
    if any(not np.array_equal(first, v) for _, v in values[1:]):
      raise CheckpointMismatch(f"the blocks' copies of norm1.emb.{name} differ; simjax's DiT shares one "
                               "timestep/label embedder (as facebookresearch/DiT does).")
    out[f"emb.{name}"] = first
  return out


def _to_flax_leaf(path: Tuple[str, ...], value: np.ndarray) -> Tuple[Tuple[str, ...], np.ndarray]:
  if path[-1] != "weight":
    return path, value
  if path[-2] == "embedding_table":
    return path[:-1] + ("embedding",), value
  return path[:-1] + ("kernel",), weight_files.kernel_from_torch(value)


def convert_state_dict(arch: Mapping[str, Any], state: Mapping[str, np.ndarray]) -> dict:
  """Flax `{'params': ...}` for DiffusionTransformer(**arch) from a diffusers-named state dict."""
  state = {k: np.asarray(v) for k, v in state.items()}
  if arch.get("adaln") == "zero":
    state = _shared_dit_embedder(state)
  flat = {}
  for key, value in state.items():
    path, leaf = _to_flax_leaf(weight_files.flax_path(key), value)
    flat[path] = np.asarray(leaf, np.float32)
  module = DiffusionTransformer(**{**arch, "scan_blocks": False})
  expected = flax.traverse_util.flatten_dict(param_shapes(module)["params"])
  return weight_files.fit_params(flat, expected, what="the transformer checkpoint")


def example_inputs(module: DiffusionTransformer, batch_size: int = 1, text_length: int = 8):
  """Zero inputs (x NHWC, t, cond) of the right shapes for `module`."""
  x = jnp.zeros((batch_size, module.sample_size, module.sample_size, module.in_channels), jnp.float32)
  t = jnp.zeros((batch_size,), jnp.float32)
  if module.caption_channels:
    cond = {"emb": jnp.zeros((batch_size, text_length, module.caption_channels), jnp.float32),
            "mask": jnp.ones((batch_size, text_length), jnp.float32)}
  elif module.num_classes:
    cond = jnp.zeros((batch_size, module.num_classes), jnp.float32)
  else:
    cond = None
  return x, t, cond


def param_shapes(module: DiffusionTransformer) -> dict:
  """The variables' shapes (jax.ShapeDtypeStruct pytree) without materialising them."""
  return jax.eval_shape(lambda: module.init(jax.random.key(0), *example_inputs(module)))


# ----------------------------------------------------------------------------------------------
# Files.


def _read_diffusers_folder(folder: Path) -> Tuple[Dict[str, Any], Dict[str, np.ndarray]]:
  config = json.loads((folder / "config.json").read_text())
  arch = arch_from_diffusers_config(config)
  return arch, weight_files.read_weights(folder, weight_files.DIFFUSERS_WEIGHTS, "transformer")


def _strip_prefix(state: Dict[str, np.ndarray], prefix: str = "module.") -> Dict[str, np.ndarray]:
  return {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in state.items()}


def read_transformer_checkpoint(path, *, arch: Optional[Mapping[str, Any]] = None
                                ) -> Tuple[Dict[str, Any], dict, Optional[np.ndarray]]:
  """(arch, {'params': ...}, the learned null caption [L, D] or None) from any format above.
  `arch` entries override what is read (e.g. num_heads for an unpublished width)."""
  path = Path(path)
  if not path.exists():
    raise FileNotFoundError(f"no such file or directory: {path}")
  if path.is_dir():
    read_arch, state = _read_diffusers_folder(weight_files.component_folder(path, "transformer", "diffusers transformer"))
    arch = {**read_arch, **dict(arch or {})}
    return arch, convert_state_dict(arch, state), None
  return read_original_state(torch_files.load_state_dict(path), arch=arch)


def read_original_state(state: Mapping[str, np.ndarray], *, arch: Optional[Mapping[str, Any]] = None
                        ) -> Tuple[Dict[str, Any], dict, Optional[np.ndarray]]:
  """read_transformer_checkpoint for the tensors of an original PixArt / SIM / DiT file."""
  state = _strip_prefix(dict(state))
  null_caption = state.get(f"y_embedder.{NULL_CAPTION}")
  state, read_arch = _original_to_diffusers(state)
  arch = {**read_arch, **dict(arch or {})}
  width = arch.pop("width")
  if "num_heads" not in arch:
    raise CheckpointMismatch(f"width {width} is not a published PixArt/DiT width {sorted(_HEADS_OF_WIDTH)}: "
                             "pass arch={'num_heads': ...}.")
  arch.setdefault("head_dim", width // arch["num_heads"])
  return arch, convert_state_dict(arch, state), None if null_caption is None else np.asarray(null_caption, np.float32)


# ----------------------------------------------------------------------------------------------
# Teachers.

# diffusers' DDPMScheduler defaults, which PixArt's and DiT's scheduler configs keep.
SCHEDULE_DEFAULTS = dict(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear")


def read_schedule(path) -> Dict[str, Any]:
  """The training noise schedule: a pipeline's `scheduler/scheduler_config.json`, else the defaults."""
  path = Path(path)
  config_file = path / "scheduler" / "scheduler_config.json"
  schedule = dict(SCHEDULE_DEFAULTS)
  if path.is_dir() and config_file.is_file():
    config = json.loads(config_file.read_text())
    schedule.update({k: config[k] for k in SCHEDULE_DEFAULTS if k in config})
  if schedule["beta_schedule"] not in ("linear", "scaled_linear"):
    raise ValueError(f"{config_file}: beta_schedule={schedule['beta_schedule']!r}; simjax reads 'linear' and "
                     "'scaled_linear'.")
  return schedule


CONVERTED_NETWORK = "DiffusionTransformer"  # arch.json's `network` in a converted folder
# How the network runs, not what it is: accepted in `arch`, never stored in a converted folder.
RUNTIME_FIELDS = ("scan_blocks", "remat", "attention_implementation")


def _is_converted(path: Path) -> bool:
  from simjax.teachers.edm_checkpoints import ARCH_FILE  # pylint: disable=import-outside-toplevel
  arch_file = path / ARCH_FILE
  if not arch_file.is_file():
    return False
  try:
    arch = json.loads(arch_file.read_text())
  except (OSError, json.JSONDecodeError):
    return False
  return isinstance(arch, dict) and arch.get("network") == CONVERTED_NETWORK


def is_transformer_checkpoint(path) -> bool:
  """Whether `path` is a diffusers PixArt/DiT pipeline or transformer folder, or a folder written by
  `python -m simjax.convert_transformer` (files: see is_transformer_state)."""
  path = Path(path)
  if not path.is_dir():
    return False
  if _is_converted(path):
    return True
  if (path / "model_index.json").is_file():
    return (path / "transformer" / "config.json").is_file()
  config = path / "config.json"
  return config.is_file() and json.loads(config.read_text()).get("_class_name") in _PIXART_CLASSES + _DIT_CLASSES


def is_transformer_state(state: Mapping[str, np.ndarray]) -> bool:
  """Whether a state dict is an original PixArt/DiT (or SIM) checkpoint."""
  return any(k.endswith("x_embedder.proj.weight") for k in state)


def build_teacher_module(arch: Mapping[str, Any], schedule: Mapping[str, Any], *, dtype=jnp.float32,
                         precision=None) -> DiscreteVPPrecond:
  """The denoiser D(x, sigma) of a DiffusionTransformer(**arch) trained on `schedule`."""
  net = DiffusionTransformer(**arch, dtype=dtype, precision=precision)
  return DiscreteVPPrecond(model=net, img_resolution=int(arch.get("sample_size", 32)),
                           img_channels=int(arch.get("in_channels", 4)), label_dim=int(arch.get("num_classes", 0)),
                           **schedule)


def read_any(path, *, arch=None, state=None):
  """(arch, schedule, {'params': ...}, null caption or None) from any source load_teacher reads."""
  if state is not None:
    arch, variables, null_caption = read_original_state(state, arch=arch)
  elif _is_converted(Path(path)):
    return load_converted(path, arch=arch)
  else:
    arch, variables, null_caption = read_transformer_checkpoint(path, arch=arch)
  return arch, read_schedule(path), variables, null_caption


def _converted_record(arch, schedule, variables, null_caption):
  record = {**{k: v for k, v in arch.items() if k not in RUNTIME_FIELDS}, **schedule, "network": CONVERTED_NETWORK}
  tree = {"params": variables["params"]}
  if null_caption is not None:
    record["null_caption_shape"] = list(null_caption.shape)
    tree["null_caption"] = np.asarray(null_caption, np.float32)
  return record, tree


def save_converted(out_dir, arch, schedule, variables, null_caption=None) -> Path:
  """OUT_DIR/arch.json (the architecture, the schedule, `network`) + params/ (orbax, with PixArt's null
  caption beside the parameters when there is one), written whole or not at all."""
  from simjax.teachers import edm_checkpoints  # pylint: disable=import-outside-toplevel
  return edm_checkpoints.save_converted(out_dir, *_converted_record(arch, schedule, variables, null_caption))


def write_converted(directory, arch, schedule, variables, null_caption=None):
  """save_converted's files into an existing, empty (staging) directory."""
  from simjax.teachers import edm_checkpoints  # pylint: disable=import-outside-toplevel
  edm_checkpoints.write_converted(directory, *_converted_record(arch, schedule, variables, null_caption))


def load_converted(path, *, arch=None):
  """read_any for a folder written by save_converted (`arch`: runtime switches such as scan_blocks)."""
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
  from simjax.teachers import edm_checkpoints  # pylint: disable=import-outside-toplevel
  unknown = sorted(set(arch or {}) - set(RUNTIME_FIELDS))
  if unknown:  # before the (slow) restore
    raise ValueError(f"a converted folder fixes the architecture; only {RUNTIME_FIELDS} can be set, not {unknown}.")
  path = Path(path).absolute()
  record = edm_checkpoints.read_arch_file(path / edm_checkpoints.ARCH_FILE)
  record.pop("network")
  null_shape = record.pop("null_caption_shape", None)
  schedule = {k: record.pop(k) for k in SCHEDULE_DEFAULTS if k in record}
  abstract = {"params": param_shapes(DiffusionTransformer(**record))["params"]}
  if null_shape is not None:
    abstract["null_caption"] = jax.ShapeDtypeStruct(tuple(null_shape), jnp.float32)
  checkpointer = ocp.StandardCheckpointer()
  try:
    tree = checkpointer.restore(path / edm_checkpoints.PARAMS_DIR, abstract)
  finally:
    checkpointer.close()
  null_caption = tree.pop("null_caption", None)
  record.update(arch or {})
  return record, {**SCHEDULE_DEFAULTS, **schedule}, tree, None if null_caption is None else np.asarray(null_caption)


def load_teacher(path, *, arch=None, state=None, dtype=jnp.float32, precision=None):
  """An `edm_checkpoints.Teacher` whose `denoise(x, sigma, cond)` is the transformer's D (NHWC latents;
  cond a text condition {'emb': [N, L, D], 'mask': [N, L]} for PixArt, one-hot labels for DiT).
  `state`: the file's tensors when the caller has read them already."""
  from simjax.teachers.edm_checkpoints import Teacher  # pylint: disable=import-outside-toplevel
  arch, schedule, variables, null_caption = read_any(path, arch=arch, state=state)
  module = build_teacher_module(arch, schedule, dtype=dtype, precision=precision)
  null_cond = None
  if null_caption is not None:
    null_cond = {"emb": jnp.asarray(null_caption), "mask": jnp.ones(null_caption.shape[:1], jnp.float32)}
  params = variables["params"]
  if arch.get("scan_blocks"):  # checkpoints hold one subtree per block; the scanned network one stack
    params = stack_blocks(params, int(arch["depth"]))
  params = {"params": {"model": jax.tree.map(jnp.asarray, params)}}
  return Teacher(module=module, params=params, arch={**arch, **schedule}, null_cond=null_cond)

"""Reads PyTorch files without PyTorch and without running code from them.

Pickle can call any importable function while loading, so a downloaded checkpoint is a program. Here
every pickle goes through `_RestrictedUnpickler`, whose `find_class` admits only an explicit
allow-list of globals, each mapped to an inert stand-in of ours:
- tensor/storage rebuilders (`torch._utils._rebuild_tensor_v2`, `torch.storage._load_from_bytes`,
  ...) produce numpy arrays from the raw little-endian storage bytes;
- torch storage classes, dtypes, `torch.Size`, `torch.device` become plain values;
- EDM's `torch_utils.persistence._reconstruct_persistent_obj(meta)` builds a `PersistentObject`
  from `meta['state']` and never executes the pickled `meta['module_src']`;
- torch.nn container classes (ModuleDict, ...) become `TorchModuleStandIn` records.
Anything else raises `UnsafePickleError` naming the refused global.

Formats: torch.save zip archives (`<root>/data.pkl` + `<root>/data/<key>`), torch's legacy
non-zip format (also what `pickle.dumps(tensor)` embeds via `_load_from_bytes`), `.npz`, and EDM
network pickles (`dict(ema=EDMPrecond(...), ...)`, NVlabs/edm `training/training_loop.py`) and EDM2's
(`EasyDict(ema=Precond(...), encoder=..., ...)`, the training snapshots and the post-hoc EMA
reconstructions of NVlabs/edm2 alike).
"""
import collections
import io
import os
import pickle
import struct
import zipfile
from typing import Any, Callable, Dict, Mapping, Tuple

import numpy as np

from simjax.errors import UserError

try:  # bfloat16 numpy dtype; ships with jax.
  import ml_dtypes
  _BFLOAT16 = np.dtype(ml_dtypes.bfloat16)
except ImportError:  # pragma: no cover
  _BFLOAT16 = None

_LEGACY_MAGIC = 0x1950a86a20f9469cfc6c  # torch.serialization.MAGIC_NUMBER
_LEGACY_PROTOCOL = 1001
# EDM's preconditioner classes, and EDM2's (`training.networks_edm2.Precond`) under simjax's name for it.
_PRECOND_CLASSES = {"EDMPrecond": "EDMPrecond", "VPPrecond": "VPPrecond", "VEPrecond": "VEPrecond",
                    "iDDPMPrecond": "iDDPMPrecond", "Precond": "EDM2Precond"}


class UnsafePickleError(UserError):
  """A pickle asked for a global outside the allow-list (it may try to run code)."""


# ----------------------------------------------------------------------------------------------
# Stand-ins for torch objects.


class StorageType:
  """Stands in for torch.FloatStorage & co.: only records the element dtype. Not callable."""

  def __init__(self, name: str, dtype):
    self.name, self.dtype = name, dtype

  def __repr__(self):
    return f"StorageType({self.name})"


_STORAGE_DTYPES = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
    "BFloat16Storage": _BFLOAT16, "LongStorage": np.int64, "IntStorage": np.int32, "ShortStorage": np.int16,
    "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_,
}
_TORCH_DTYPES = {
    "float32": np.float32, "float": np.float32, "float64": np.float64, "double": np.float64, "float16": np.float16,
    "half": np.float16, "bfloat16": _BFLOAT16, "int64": np.int64, "long": np.int64, "int32": np.int32,
    "int": np.int32, "int16": np.int16, "int8": np.int8, "uint8": np.uint8, "bool": np.bool_,
}


class _TypeMarker:
  """Stands in for a tensor class named by `_rebuild_from_type_v2`; not callable."""

  def __init__(self, name: str):
    self.name = name


class _StorageHolder:
  """A storage whose bytes arrive after the pickle that references it (torch's legacy format):
  allocated from the persistent id's element count, filled in place once the bytes are read."""

  def __init__(self, dtype, numel: int):
    self.dtype = np.dtype(dtype)
    self.array = np.zeros(numel, self.dtype)
    self.filled = False


class TorchModuleStandIn:
  """Inert record of a pickled torch.nn container (ModuleDict, ...): its `__dict__` state only."""
  torch_class = "torch.nn.Module"

  def __setstate__(self, state):
    if isinstance(state, tuple) and len(state) == 2:  # (dict state, slots state)
      state = {**(state[0] or {}), **(state[1] or {})}
    if not isinstance(state, dict):
      raise UnsafePickleError(f"unexpected state of type {type(state).__name__} for {self.torch_class}")
    self.__dict__.update(state)


class PersistentObject:
  """An EDM `persistence`-pickled object: class name and `__dict__` state; its source is never run."""

  def __init__(self, class_name: str, state: Dict[str, Any], version: Any = None):
    self.class_name, self.state, self.version = class_name, state, version

  def __repr__(self):
    return f"PersistentObject({self.class_name})"


class EasyDictStandIn(dict):
  """dnnlib.EasyDict without behaviour: a plain dict subclass."""


def _module_standin(qualname: str):
  return type(qualname.rsplit(".", 1)[-1], (TorchModuleStandIn,), {"torch_class": qualname})


def _storage_array(storage) -> np.ndarray:
  if isinstance(storage, _StorageHolder):
    return storage.array
  if isinstance(storage, np.ndarray) and storage.ndim == 1:
    return storage
  raise UnsafePickleError(f"tensor storage of unexpected type {type(storage).__name__}")


def _rebuild_tensor(storage, storage_offset, size, stride, *unused) -> np.ndarray:
  """numpy copy of a strided view of a flat storage, bounds-checked (torch._utils._rebuild_tensor_v2)."""
  flat = _storage_array(storage)
  size, stride, offset = tuple(int(s) for s in size), tuple(int(s) for s in stride), int(storage_offset)
  if len(size) != len(stride) or any(s < 0 for s in size) or any(s < 0 for s in stride) or offset < 0:
    raise ValueError(f"corrupt tensor: size {size}, stride {stride}, offset {offset}")
  if 0 in size:
    return np.zeros(size, flat.dtype)
  last = offset + sum((n - 1) * s for n, s in zip(size, stride))
  if last >= flat.size:
    raise ValueError(f"corrupt tensor: size {size} / stride {stride} overruns its storage of {flat.size} elements")
  view = np.lib.stride_tricks.as_strided(flat[offset:], shape=size, strides=[s * flat.itemsize for s in stride],
                                         writeable=False)
  if isinstance(storage, _StorageHolder) and not storage.filled:
    return view  # legacy format: the bytes come later and fill the storage in place; copied by the caller
  return np.array(view)


def _rebuild_parameter(data, *unused):
  return data


def _rebuild_from_type_v2(func, new_type, args, state):
  del new_type, state  # Parameter/Tensor subclass wrappers: the data is what matters.
  if func not in (_rebuild_tensor, _rebuild_parameter):
    raise UnsafePickleError("_rebuild_from_type_v2 with a non-tensor rebuild function")
  return func(*args)


def _torch_size(*args):
  return tuple(args[0]) if args else ()


def _torch_device(*args):
  return str(args[0]) if args else "cpu"


def _numpy_scalar(dtype, data=None):
  dtype = np.dtype(dtype)
  if dtype.hasobject or not isinstance(data, (bytes, bytearray)):
    raise UnsafePickleError("numpy scalar with object dtype")
  return np.frombuffer(bytes(data), dtype)[0]


def _numpy_dtype(spec, align=False, copy=False):
  dtype = np.dtype(spec, align=align, copy=copy)
  if dtype.hasobject:
    raise UnsafePickleError("numpy object dtype")
  return dtype


def _numpy_reconstruct(subtype, shape, dtype):
  if subtype is not np.ndarray:
    raise UnsafePickleError("numpy array of a subclass")
  return np.ndarray.__new__(np.ndarray, shape, _numpy_dtype(dtype))


def _codecs_encode(text, encoding="utf-8"):
  if not isinstance(text, str) or encoding not in ("latin1", "latin-1", "utf-8", "utf8"):
    raise UnsafePickleError("_codecs.encode with unexpected arguments")
  return text.encode(encoding)


def _copyreg_reconstructor(cls, base, state):
  if not (isinstance(cls, type) and issubclass(cls, (TorchModuleStandIn, EasyDictStandIn)) and base is object):
    raise UnsafePickleError("copyreg._reconstructor of a class outside the allow-list")
  return cls.__new__(cls)


def _reconstruct_persistent_obj(meta):
  """Stand-in for EDM's torch_utils.persistence._reconstruct_persistent_obj: no exec of module_src."""
  if not isinstance(meta, dict) or meta.get("type") != "class" or not isinstance(meta.get("class_name"), str):
    raise ValueError("not an EDM persistence record (expected meta with type='class' and class_name)")
  state = meta.get("state") or {}
  if not isinstance(state, dict):
    raise ValueError(f"EDM persistent object {meta['class_name']} has a non-dict state")
  return PersistentObject(meta["class_name"], dict(state), meta.get("version"))


def _allowed_globals(load_from_bytes: Callable) -> Dict[Tuple[str, str], Any]:
  allowed = {
      ("collections", "OrderedDict"): collections.OrderedDict,
      ("builtins", "set"): set,
      ("builtins", "frozenset"): frozenset,
      ("builtins", "bytearray"): bytearray,
      ("_codecs", "encode"): _codecs_encode,
      ("copyreg", "_reconstructor"): _copyreg_reconstructor,
      ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
      ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
      ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
      ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
      ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type_v2,
      ("torch.storage", "_load_from_bytes"): load_from_bytes,
      ("torch", "Size"): _torch_size,
      ("torch", "device"): _torch_device,
      ("torch", "Tensor"): _TypeMarker("torch.Tensor"),
      ("torch.nn.parameter", "Parameter"): _TypeMarker("torch.nn.parameter.Parameter"),
      ("torch_utils.persistence", "_reconstruct_persistent_obj"): _reconstruct_persistent_obj,
      ("dnnlib.util", "EasyDict"): EasyDictStandIn,
      ("numpy", "dtype"): _numpy_dtype,
      ("numpy", "ndarray"): np.ndarray,
  }
  for numpy_core in ("numpy.core.multiarray", "numpy._core.multiarray"):
    allowed[(numpy_core, "scalar")] = _numpy_scalar
    allowed[(numpy_core, "_reconstruct")] = _numpy_reconstruct
  for name, dtype in _STORAGE_DTYPES.items():
    if dtype is not None:
      allowed[("torch", name)] = StorageType(name, dtype)
  for name, dtype in _TORCH_DTYPES.items():
    if dtype is not None:
      allowed[("torch", name)] = np.dtype(dtype)
  for qualname in ("container.ModuleDict", "container.ModuleList", "container.Sequential",
                   "container.ParameterDict", "container.ParameterList", "module.Module", "linear.Linear",
                   "linear.Identity", "conv.Conv2d", "normalization.GroupNorm", "activation.SiLU",
                   "dropout.Dropout"):
    module, name = f"torch.nn.modules.{qualname}".rsplit(".", 1)
    allowed[(module, name)] = _module_standin(f"{module}.{name}")
  return allowed


class _RestrictedUnpickler(pickle.Unpickler):
  """pickle.Unpickler that resolves globals only through the allow-list (never imports)."""

  def __init__(self, file, *, persistent_load=None, what="pickle"):
    super().__init__(file)
    self._allowed = _allowed_globals(_load_from_bytes)
    self._persistent_load_fn = persistent_load
    self._what = what

  def find_class(self, module, name):
    try:
      return self._allowed[(module, name)]
    except KeyError:
      raise UnsafePickleError(
          f"refusing to load {self._what}: it references the global '{module}.{name}', which is not on simjax's "
          "allow-list of tensor/EDM types (it could run code); re-save the weights as a plain state dict "
          "(.pt/.npz).") from None

  def persistent_load(self, pid):
    if self._persistent_load_fn is None:
      raise UnsafePickleError(f"unexpected persistent id {pid!r} in {self._what}")
    return self._persistent_load_fn(pid)


def _storage_pid(pid):
  """Validates a torch storage persistent id ('storage', StorageType, key, location, numel[, view])."""
  if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage" and isinstance(pid[1], StorageType)):
    raise UnsafePickleError(f"unsupported persistent id {pid!r}")
  return pid[1].dtype, str(pid[2]), int(pid[4])


# ----------------------------------------------------------------------------------------------
# torch.save formats.


def _load_legacy(stream: io.BufferedIOBase, what: str):
  """torch's non-zip format: magic, protocol, sys_info pickles; the object pickle with storage
  persistent ids; the sorted storage keys; then per key an int64 element count and raw bytes."""
  load = lambda: _RestrictedUnpickler(stream, what=what).load()
  if load() != _LEGACY_MAGIC:
    raise ValueError(f"{what} is not a torch.save file (bad magic number)")
  if load() != _LEGACY_PROTOCOL:
    raise ValueError(f"{what} uses an unsupported torch legacy protocol")
  sys_info = load()
  byteorder = "<" if (not isinstance(sys_info, dict) or sys_info.get("little_endian", True)) else ">"
  holders: Dict[str, _StorageHolder] = {}

  def persistent_load(pid):
    dtype, key, numel = _storage_pid(pid)
    if key not in holders:
      holders[key] = _StorageHolder(dtype, numel)
    holder = holders[key]
    if len(pid) > 5 and pid[5] is not None:
      raise ValueError(f"{what} uses storage views (torch < 1.0 format); re-save it with a recent torch")
    return holder

  result = _RestrictedUnpickler(stream, persistent_load=persistent_load, what=what).load()
  keys = load()
  for key in keys:
    (numel,) = struct.unpack(byteorder + "q", stream.read(8))
    holder = holders.get(str(key))
    if holder is None or numel != holder.array.size:
      raise ValueError(f"corrupt {what}: storage {key!r} is not referenced or has the wrong size")
    nbytes = numel * holder.dtype.itemsize
    raw = stream.read(nbytes)
    if len(raw) != nbytes:
      raise ValueError(f"corrupt {what}: storage {key!r} is truncated")
    holder.array[:] = np.frombuffer(raw, holder.dtype.newbyteorder(byteorder))
    holder.filled = True
  if any(not holder.filled for holder in holders.values()):
    raise ValueError(f"corrupt {what}: a tensor refers to storage bytes that are missing")
  return _resolve_holder(result)


def _resolve_holder(obj):
  """Replaces a bare storage (the object a storage pickle holds) by its array."""
  return obj.array if isinstance(obj, _StorageHolder) else obj


def _load_from_bytes(data):
  """Stand-in for torch.storage._load_from_bytes: a storage saved in torch's legacy format."""
  if not isinstance(data, (bytes, bytearray)):
    raise UnsafePickleError("_load_from_bytes expects bytes")
  return _load_legacy(io.BytesIO(bytes(data)), "embedded tensor storage")


def _load_zip(path: str):
  with zipfile.ZipFile(path) as archive:
    names = archive.namelist()
    pkl = [n for n in names if n.endswith("/data.pkl") or n == "data.pkl"]
    if not pkl:
      raise ValueError(f"{path} is a zip file but not a torch.save archive (no data.pkl)")
    root = pkl[0][:-len("data.pkl")]
    byteorder = "<"
    if f"{root}byteorder" in names and archive.read(f"{root}byteorder").strip() == b"big":
      byteorder = ">"
    storages: Dict[str, np.ndarray] = {}

    def persistent_load(pid):
      dtype, key, numel = _storage_pid(pid)
      if key not in storages:
        raw = archive.read(f"{root}data/{key}")
        dtype = np.dtype(dtype)
        if len(raw) < numel * dtype.itemsize:
          raise ValueError(f"corrupt torch file {path}: storage {key} is truncated")
        storages[key] = np.frombuffer(raw[:numel * dtype.itemsize], dtype.newbyteorder(byteorder)).astype(dtype)
      return storages[key]

    with archive.open(pkl[0]) as f:
      return _RestrictedUnpickler(io.BytesIO(f.read()), persistent_load=persistent_load, what=path).load()


def load_torch_file(path) -> Any:
  """Loads a torch.save file (zip or legacy) with tensors as numpy arrays; runs no code from it."""
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"no such file: {path}")
  if zipfile.is_zipfile(path):
    return _load_zip(path)
  with open(path, "rb") as f:
    return _load_legacy(f, path)


def _flat_state(obj, path) -> Dict[str, np.ndarray]:
  if isinstance(obj, Mapping) and obj and all(isinstance(v, np.ndarray) for v in obj.values()):
    return {str(k): v for k, v in obj.items()}
  if isinstance(obj, Mapping):
    for key in ("state_dict", "ema", "model"):  # common wrappers around a state dict
      if isinstance(obj.get(key), Mapping):
        return _flat_state(obj[key], path)
  raise ValueError(f"{path} does not hold a state dict (a mapping of tensor names to tensors); "
                   "for EDM network pickles use load_edm_pickle.")


def load_state_dict(path) -> Dict[str, np.ndarray]:
  """Tensor-name -> numpy array from a torch.save state dict (.pt/.pth) or an `.npz`.

  In an `.npz` whose keys start with 'state/' (simjax's fixtures), only those entries are returned,
  prefix stripped. torch files may wrap the dict under 'state_dict', 'ema' or 'model'.
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"no such file: {path}")
  if path.endswith(".npz"):
    with np.load(path, allow_pickle=False) as data:
      prefixed = {k[len("state/"):]: data[k] for k in data.files if k.startswith("state/")}
      return prefixed or {k: data[k] for k in data.files}
  # Copies: tensors of legacy-format files are views into their (shared) storages.
  return {name: np.array(value) for name, value in _flat_state(load_torch_file(path), path).items()}


# ----------------------------------------------------------------------------------------------
# EDM network pickles.


def module_state_dict(obj, prefix: str = "") -> Dict[str, np.ndarray]:
  """torch's state_dict() of an unpickled module record: parameters, persistent buffers, then
  submodules, in registration order, names joined by '.'."""
  state = obj.state if isinstance(obj, PersistentObject) else getattr(obj, "__dict__", {})
  out: Dict[str, np.ndarray] = {}
  non_persistent = set(state.get("_non_persistent_buffers_set") or ())
  for name, value in (state.get("_parameters") or {}).items():
    if value is not None:
      out[prefix + name] = np.asarray(value)
  for name, value in (state.get("_buffers") or {}).items():
    if value is not None and name not in non_persistent:
      out[prefix + name] = np.asarray(value)
  for name, child in (state.get("_modules") or {}).items():
    if child is not None:
      out.update(module_state_dict(child, f"{prefix}{name}."))
  return out


def load_plain_pickle(path) -> Any:
  """A plain pickle of dicts, lists and numpy arrays (EDM2's dataset-refs statistics), through the restricted
  unpickler: any other global is refused (UnsafePickleError)."""
  with open(os.fspath(path), "rb") as f:
    try:
      return _RestrictedUnpickler(f, what=os.fspath(path)).load()
    except UnsafePickleError:
      raise
    except (pickle.UnpicklingError, EOFError, TypeError, AttributeError, IndexError, KeyError) as e:
      raise ValueError(f"{path} is not a readable pickle ({type(e).__name__}: {e})") from None


def _load_network_pickle(path):
  """The top-level dict of an EDM / EDM2 network pickle, read through the restricted unpickler."""
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"no such file: {path}")
  with open(path, "rb") as f:
    try:
      data = _RestrictedUnpickler(f, what=path).load()
    except UnsafePickleError:
      raise
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError) as e:
      raise ValueError(f"{path} is not an EDM network pickle ({type(e).__name__}: {e})") from None
  if not (isinstance(data, dict) and "ema" in data):
    raise ValueError(f"{path} is not an EDM network pickle: expected a dict with key 'ema' "
                     f"(found {type(data).__name__})")
  return data


def read_edm_network_pickle(path) -> Tuple[Dict[str, Any], Dict[str, np.ndarray], Dict[str, Any]]:
  """(precond_kwargs, state, encoder) of the EMA network in an EDM or EDM2 network pickle, from one read and
  without executing it.

  precond_kwargs are the network's recorded constructor kwargs (EDM persistence `init_kwargs`)
  plus `precond` = its class name ('EDMPrecond', ...; EDM2's `Precond` as 'EDM2Precond'); state is its
  state_dict with EDM's names (`model.enc.32x32_conv.weight`, ...) as numpy arrays, in the file's dtype
  (EDM2 saves float16); encoder is the pixel <-> network-space encoder EDM2 records beside the network
  (NVlabs/edm2 training/encoders.py), as plain values: {'class_name': 'StabilityVAEEncoder', 'vae_name',
  'scale' [C], 'bias' [C]} for latent networks, {'class_name': 'StandardRGBEncoder'} for pixel ones, {} when
  the pickle has none (EDM's).
  """
  data = _load_network_pickle(path)
  ema = data["ema"]
  if not (isinstance(ema, PersistentObject) and ema.class_name in _PRECOND_CLASSES):
    raise ValueError(f"{path}: 'ema' is not an EDM preconditioned network (found {ema!r})")
  init_kwargs = ema.state.get("_init_kwargs")
  if not isinstance(init_kwargs, dict):
    raise ValueError(f"{path}: the EMA network has no recorded init_kwargs; it was not saved by EDM's persistence")
  if ema.state.get("_init_args"):
    raise ValueError(f"{path}: the EMA network was built with positional arguments; simjax needs keyword init_kwargs")
  kwargs = {"precond": _PRECOND_CLASSES[ema.class_name], **_plain(init_kwargs)}
  return kwargs, module_state_dict(ema), _encoder_record(data.get("encoder"), path)


def load_edm_pickle(path) -> Tuple[Dict[str, Any], Dict[str, np.ndarray]]:
  """(precond_kwargs, state) of `read_edm_network_pickle`."""
  kwargs, state, _ = read_edm_network_pickle(path)
  return kwargs, state


def load_edm_pickle_encoder(path) -> Dict[str, Any]:
  """The encoder record of `read_edm_network_pickle`."""
  return _encoder_record(_load_network_pickle(path).get("encoder"), path)


def _encoder_record(encoder, path) -> Dict[str, Any]:
  if encoder is None:
    return {}
  if not isinstance(encoder, PersistentObject):
    raise ValueError(f"{path}: its 'encoder' is not an EDM2 encoder record (found {type(encoder).__name__})")
  out = {"class_name": encoder.class_name}
  if encoder.class_name == "StabilityVAEEncoder":
    for key in ("scale", "bias"):
      value = np.asarray(encoder.state.get(key), np.float64)
      if value.ndim != 1 or not value.size or not np.all(np.isfinite(value)):
        raise ValueError(f"{path}: the StabilityVAEEncoder's {key} is not a finite per-channel vector")
      out[key] = [float(v) for v in value]
    out["vae_name"] = str(encoder.state.get("vae_name", ""))
  return out


def _plain(value):
  """EasyDicts/tuples/numpy scalars -> JSON-friendly dicts/lists/python scalars."""
  if isinstance(value, Mapping):
    return {str(k): _plain(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_plain(v) for v in value]
  if isinstance(value, np.generic):
    return value.item()
  return value

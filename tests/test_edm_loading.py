"""Safe reading of PyTorch/EDM files, conversion, converted checkpoints and the convert_edm command.

The default suite needs no torch: EDM-format pickles are crafted byte by byte with a small pickler
that writes torch's globals (`torch._utils._rebuild_tensor_v2`, EDM's
`torch_utils.persistence._reconstruct_persistent_obj`, ...) without importing them. Tests marked
with `importorskip("torch")` repeat the round trip with files made by real torch.
"""
import collections
import io
import json
import os
import pickle
import struct
import subprocess
import sys
import types
import zipfile
from pathlib import Path

import jax
import numpy as np
import pytest

from simjax.convert_edm import main as convert_main
from simjax.networks.precond import build_precond
from simjax.teachers.edm_checkpoints import Teacher, convert_state_dict, load_teacher, save_converted
from simjax.torch_files import UnsafePickleError, load_edm_pickle, load_state_dict

from conftest import FIXTURES  # tests/fixtures, in the repository

REPO = Path(__file__).resolve().parents[1]
FIXTURE_NAMES = ["edm_ddpmpp_tiny_uncond", "edm_ddpmpp_tiny_cond", "edm_ncsnpp_tiny_uncond"]
_BUFFERS = ("resample_filter", "freqs", "phases")
HIGHEST = jax.lax.Precision.HIGHEST  # parity within 1e-4 also on GPUs, whose float32 default is TF32


def _fixture(name):
  path = FIXTURES / f"{name}.npz"
  assert path.is_file(), f"EDM reference fixture {path} is missing: it is part of the repository (tests/fixtures)"
  with np.load(path) as data:
    config = json.loads(str(data["config_json"]))
    state = {k[len("state/"):]: data[k] for k in data.files if k.startswith("state/")}
    inputs = {k: data[k] for k in ("x_nchw", "sigma", "class_labels", "augment_labels", "denoised_nchw")
              if k in data.files}
  return path, config, state, inputs


def _assert_same_state(actual, expected):
  assert list(actual) == list(expected)  # torch's state_dict order is preserved
  for name, value in expected.items():
    assert actual[name].dtype == value.dtype and actual[name].shape == value.shape, name
    np.testing.assert_array_equal(actual[name], value, err_msg=name)


# ----------------------------------------------------------------------------------------------
# A pickler that writes torch's and EDM's globals by name, without torch.


class Global:
  """A reference `module.name`, written as a GLOBAL opcode and never imported."""

  def __init__(self, module, name):
    self.module, self.name = module, name

  def __call__(self, *args):  # pickle's save_reduce insists that the function is callable
    raise AssertionError("never called")


class Call:
  """Pickles as REDUCE: func(*args) at load time."""

  def __init__(self, func, *args):
    self.func, self.args = func, args

  def __reduce__(self):
    return self.func, self.args


class NewObj:
  """Pickles as NEWOBJ cls() + BUILD state: how pickle protocol 2+ writes a torch.nn.ModuleDict."""

  def __init__(self, cls, state):
    self.cls, self.state = cls, state


class NewDict:
  """Pickles as NEWOBJ cls() + SETITEMS: how pickle writes a dict subclass such as dnnlib.EasyDict (EDM2's
  network pickles)."""

  def __init__(self, cls, items):
    self.cls, self.items = cls, dict(items)


class StorageRef:
  """Pickles as the persistent id torch writes for a storage."""

  def __init__(self, pid):
    self.pid = pid


class _CraftingPickler(pickle._Pickler):  # pylint: disable=protected-access

  def persistent_id(self, obj):
    return obj.pid if isinstance(obj, StorageRef) else None

  def save(self, obj, save_persistent_id=True):
    if isinstance(obj, Global):
      self.write(pickle.GLOBAL + f"{obj.module}\n{obj.name}\n".encode())
    elif isinstance(obj, NewObj):
      self.save(obj.cls)
      self.save(())
      self.write(pickle.NEWOBJ)
      self.save(obj.state)
      self.write(pickle.BUILD)
    elif isinstance(obj, NewDict):
      self.save(obj.cls)
      self.save(())
      self.write(pickle.NEWOBJ)
      self._batch_setitems(iter(obj.items.items()))
    else:
      super().save(obj, save_persistent_id)


def craft(obj, protocol=4) -> bytes:
  buffer = io.BytesIO()
  _CraftingPickler(buffer, protocol=protocol).dump(obj)
  return buffer.getvalue()


_STORAGE_NAMES = {np.dtype(np.float32): "FloatStorage", np.dtype(np.float16): "HalfStorage",
                  np.dtype(np.int64): "LongStorage", np.dtype(np.float64): "DoubleStorage"}
_ORDERED_DICT = Global("collections", "OrderedDict")


def _legacy_storage_bytes(flat: np.ndarray, inner_payload=None) -> bytes:
  """What torch.storage.TypedStorage.__reduce__ embeds: torch.save(storage) in the legacy format."""
  pid = ("storage", Global("torch", _STORAGE_NAMES[flat.dtype]), "0", "cpu", flat.size, None)
  sys_info = dict(protocol_version=1001, little_endian=True, type_sizes=dict(short=2, int=4, long=4))
  head = [pickle.dumps(0x1950a86a20f9469cfc6c, protocol=2), pickle.dumps(1001, protocol=2),
          pickle.dumps(sys_info, protocol=2)]
  body = craft(inner_payload if inner_payload is not None else StorageRef(pid), protocol=2)
  tail = pickle.dumps(["0"], protocol=2) + struct.pack("<q", flat.size) + flat.astype(flat.dtype.newbyteorder("<")).tobytes()
  return b"".join(head) + body + tail


def _crafted_tensor(array: np.ndarray, parameter: bool):
  array = np.array(array, order="C")  # not ascontiguousarray: it turns a 0-d tensor (EDM2's gains) into 1-d
  storage = Call(Global("torch.storage", "_load_from_bytes"), _legacy_storage_bytes(array.reshape(-1)))
  strides = tuple(s // array.itemsize for s in array.strides)
  tensor = Call(Global("torch._utils", "_rebuild_tensor_v2"), storage, 0, tuple(array.shape), strides, False,
                Call(_ORDERED_DICT))
  return Call(Global("torch._utils", "_rebuild_parameter"), tensor, True, Call(_ORDERED_DICT)) if parameter else tensor


def _class_name(path, params):
  """EDM's class for a module at `path` (only used as the persistence record's class_name)."""
  if not path:
    return "EDMPrecond"
  if path == ("model",):
    return "SongUNet"
  if path[-1] == "map_noise":
    return "FourierEmbedding"
  weight = params.get("weight")
  if weight is None:
    return "UNetBlock"
  return {4: "Conv2d", 2: "Linear", 1: "GroupNorm"}[weight.ndim]


def _module_tree(state):
  """Nested {'params', 'buffers', 'children'} from dotted torch names."""
  root = {"params": {}, "buffers": {}, "children": {}}
  for name, value in state.items():
    *parents, leaf = name.split(".")
    node = root
    for part in parents:
      node = node["children"].setdefault(part, {"params": {}, "buffers": {}, "children": {}})
    node["buffers" if leaf in _BUFFERS else "params"][leaf] = value
  return root


MODULE_SRC = "import os\nos.system('touch {marker}')\n"  # EDM pickles embed code: it must never run.


def _crafted_module(node, path, init_kwargs, marker, extra_state=None):
  state = {
      "training": False,
      "_parameters": {k: _crafted_tensor(v, True) for k, v in node["params"].items()},
      "_buffers": {k: _crafted_tensor(v, False) for k, v in node["buffers"].items()},
      "_non_persistent_buffers_set": set(),
      "_modules": {},
  }
  for name, child in node["children"].items():
    child_path = path + (name,)
    if name in ("enc", "dec"):  # EDM's torch.nn.ModuleDict: a plain torch class, not persistent
      state["_modules"][name] = NewObj(Global("torch.nn.modules.container", "ModuleDict"), {
          "training": False, "_parameters": {}, "_buffers": {}, "_non_persistent_buffers_set": set(),
          "_modules": {k: _crafted_module(v, child_path + (k,), None, marker) for k, v in child["children"].items()},
      })
    else:
      state["_modules"][name] = _crafted_module(child, child_path, None, marker)
  state["_init_args"] = ()
  state["_init_kwargs"] = dict(init_kwargs or {})
  state.update(extra_state or {})
  meta = dict(type="class", version=6, module_src=MODULE_SRC.format(marker=marker),
              class_name=_class_name(path, node["params"]), state=state)
  return Call(Global("torch_utils.persistence", "_reconstruct_persistent_obj"), meta)


def _edm_init_kwargs(config):
  kwargs = {k: v for k, v in config.items() if k != "precond"}
  return dict(kwargs, use_fp16=False)


def _crafted_edm_pickle(config, state, marker, extra_state=None) -> bytes:
  ema = _crafted_module(_module_tree(state), (), _edm_init_kwargs(config), marker, extra_state)
  loss_meta = dict(type="class", version=6, module_src=MODULE_SRC.format(marker=marker), class_name="EDMLoss",
                   state={"P_mean": -1.2, "P_std": 1.2, "sigma_data": 0.5, "_init_args": (), "_init_kwargs": {}})
  data = dict(ema=ema, loss_fn=Call(Global("torch_utils.persistence", "_reconstruct_persistent_obj"), loss_meta),
              augment_pipe=None, dataset_kwargs=dict(class_name="training.dataset.ImageFolderDataset", path="c.zip"))
  return craft(data)


class _Evil:
  """A payload that runs a shell command when unpickled by plain pickle."""

  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return os.system, (f"touch {self.marker}",)


# ----------------------------------------------------------------------------------------------
# Torch-free tests.


@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_crafted_edm_pickle_gives_init_kwargs_and_state(name, tmp_path):
  _, config, state, _ = _fixture(name)
  marker = tmp_path / "module_src_was_executed"
  path = tmp_path / "network-snapshot.pkl"
  path.write_bytes(_crafted_edm_pickle(config, state, marker))
  kwargs, loaded = load_edm_pickle(path)
  assert kwargs == dict(config, use_fp16=False)  # precond class name + EDMPrecond's init_kwargs
  _assert_same_state(loaded, state)
  assert not marker.exists()


def test_crafted_edm_pickle_teacher_reproduces_edm(tmp_path):
  """EDM pickle -> load_teacher -> D(x) equals EDM's reference output (NCSN++: Fourier buffer)."""
  _, config, state, inputs = _fixture("edm_ncsnpp_tiny_uncond")
  path = tmp_path / "net.pkl"
  path.write_bytes(_crafted_edm_pickle(config, state, tmp_path / "marker"))
  teacher = load_teacher(path, precision=HIGHEST)
  assert isinstance(teacher, Teacher)
  assert (teacher.img_resolution, teacher.img_channels, teacher.label_dim) == (8, 3, 0)
  assert teacher.arch["fourier_freqs"] == [float(v) for v in state["model.map_noise.freqs"]]
  out = teacher.denoise(inputs["x_nchw"].transpose(0, 2, 3, 1), inputs["sigma"])
  np.testing.assert_allclose(np.asarray(out), inputs["denoised_nchw"].transpose(0, 2, 3, 1), atol=1e-4, rtol=0)


def test_crafted_torch_zip_state_dict(tmp_path):
  """torch.save's zip layout, incl. a transposed (strided) view, float16 and an offset into a shared storage."""
  shared = np.arange(12, dtype=np.float32)
  half = np.array([1.5, -2.0, 3.25], np.float16)

  def tensor(key, dtype, offset, size, stride, numel):
    pid = ("storage", Global("torch", _STORAGE_NAMES[np.dtype(dtype)]), key, "cpu", numel)
    return Call(Global("torch._utils", "_rebuild_tensor_v2"), StorageRef(pid), offset, size, stride, False,
                Call(_ORDERED_DICT))

  state = Call(_ORDERED_DICT, [
      ["w", tensor("0", np.float32, 0, (3, 2), (1, 3), 12)],  # the transpose of a [2, 3] tensor
      ["tail", tensor("0", np.float32, 6, (2, 3), (3, 1), 12)],
      ["h", tensor("1", np.float16, 0, (3,), (1,), 3)],
  ])
  path = tmp_path / "weights.pt"
  with zipfile.ZipFile(path, "w") as archive:
    archive.writestr("weights/data.pkl", craft(state, protocol=2))
    archive.writestr("weights/byteorder", "little")
    archive.writestr("weights/data/0", shared.tobytes())
    archive.writestr("weights/data/1", half.tobytes())
  loaded = load_state_dict(path)
  np.testing.assert_array_equal(loaded["w"], shared[:6].reshape(2, 3).T)
  np.testing.assert_array_equal(loaded["tail"], shared[6:].reshape(2, 3))
  assert loaded["h"].dtype == np.float16
  np.testing.assert_array_equal(loaded["h"], half)


def test_tensor_that_overruns_its_storage_is_rejected(tmp_path):
  storage = Call(Global("torch.storage", "_load_from_bytes"), _legacy_storage_bytes(np.zeros(4, np.float32)))
  bad = Call(Global("torch._utils", "_rebuild_tensor_v2"), storage, 0, (100, 100), (100, 1), False, Call(_ORDERED_DICT))
  path = tmp_path / "net.pkl"
  path.write_bytes(craft({"ema": bad}))
  with pytest.raises(ValueError, match="overruns"):
    load_edm_pickle(path)


def test_malicious_pickle_is_refused_and_never_runs(tmp_path):
  marker = tmp_path / "pwned"
  payload = pickle.dumps({"ema": _Evil(marker)})
  path = tmp_path / "evil.pkl"
  path.write_bytes(payload)
  with pytest.raises(UnsafePickleError, match=r"(posix|os)\.system"):
    load_edm_pickle(path)
  with pytest.raises(UnsafePickleError, match="system"):
    load_teacher(path)
  assert not marker.exists()
  # The payload is real: plain pickle runs it. (This is what the restricted unpickler prevents.)
  pickle.loads(payload)
  assert marker.exists()


def test_payload_hidden_inside_an_edm_pickle_is_refused(tmp_path):
  _, config, state, _ = _fixture("edm_ddpmpp_tiny_uncond")
  marker = tmp_path / "pwned"
  evil = Call(Global("os", "system"), f"touch {marker}")
  path = tmp_path / "net.pkl"
  path.write_bytes(_crafted_edm_pickle(config, state, tmp_path / "src_marker", extra_state={"sneaky": evil}))
  with pytest.raises(UnsafePickleError, match=r"os\.system"):
    load_edm_pickle(path)
  # ... and inside the torch.save bytes of an embedded storage.
  inner = Call(Global("builtins", "exec"), f"open({str(marker)!r}, 'w').close()")
  storage = Call(Global("torch.storage", "_load_from_bytes"),
                 _legacy_storage_bytes(np.zeros(1, np.float32), inner_payload=inner))
  path.write_bytes(craft({"ema": Call(Global("torch._utils", "_rebuild_tensor_v2"), storage, 0, (1,), (1,), False,
                                      Call(_ORDERED_DICT))}))
  with pytest.raises(UnsafePickleError, match=r"builtins\.exec"):
    load_edm_pickle(path)
  assert not marker.exists()


def test_not_an_edm_pickle(tmp_path):
  path = tmp_path / "plain.pkl"
  path.write_bytes(pickle.dumps({"weights": [1, 2, 3]}))
  with pytest.raises(ValueError, match="not an EDM network pickle"):
    load_edm_pickle(path)
  with pytest.raises(FileNotFoundError):
    load_edm_pickle(tmp_path / "missing.pkl")


def test_converter_rejects_mismatched_state_dicts():
  _, config, state, _ = _fixture("edm_ddpmpp_tiny_uncond")
  missing = {k: v for k, v in state.items() if k != "model.enc.8x8_block0.conv0.weight"}
  with pytest.raises(ValueError, match=r"missing 1 tensors \(model\.enc\.8x8_block0\.conv0\.weight\)"):
    convert_state_dict(config, missing)
  misshapen = dict(state, **{"model.map_layer0.weight": state["model.map_layer0.weight"].T})
  with pytest.raises(ValueError, match="misshapen.*model.map_layer0.weight"):
    convert_state_dict(config, misshapen)
  with pytest.raises(ValueError, match="does not use.*model.map_label.weight"):
    convert_state_dict(config, dict(state, **{"model.map_label.weight": np.zeros((32, 10), np.float32)}))
  with pytest.raises(ValueError, match="resample_filter"):
    convert_state_dict(dict(config, resample_filter=[1, 3, 3, 1]), state)


def test_converted_directory_round_trip(tmp_path):
  """save_converted -> load_teacher(dir): same arch, same params, same D as the direct apply."""
  path, config, state, inputs = _fixture("edm_ncsnpp_tiny_uncond")
  arch, variables = convert_state_dict(config, state)
  out_dir = save_converted(tmp_path / "teacher", arch, variables)
  assert json.loads((out_dir / "arch.json").read_text()) == arch
  teacher = load_teacher(out_dir)
  assert teacher.arch == arch
  jax.tree_util.tree_map(np.testing.assert_array_equal, teacher.params, variables)
  x = inputs["x_nchw"].transpose(0, 2, 3, 1)
  direct = jax.jit(build_precond(arch).apply)(variables, x, inputs["sigma"])
  np.testing.assert_array_equal(np.asarray(teacher.denoise(x, inputs["sigma"])), np.asarray(direct))
  with pytest.raises(ValueError, match="already exists"):
    save_converted(out_dir, arch, variables)
  # The .npz fixture itself also loads (its config_json is the arch).
  from_npz = load_teacher(path)
  assert from_npz.arch == arch
  jax.tree_util.tree_map(np.testing.assert_array_equal, from_npz.params, variables)


def test_bare_state_dict_needs_an_arch(tmp_path):
  _, config, state, _ = _fixture("edm_ddpmpp_tiny_uncond")
  path = tmp_path / "weights.npz"
  np.savez(path, **state)
  with pytest.raises(ValueError, match="arch.json"):
    load_teacher(path)
  (tmp_path / "arch.json").write_text(json.dumps(config))
  assert load_teacher(path).arch["model_channels"] == 16


def test_convert_edm_command(tmp_path, capsys):
  _, config, state, _ = _fixture("edm_ddpmpp_tiny_cond")
  pkl = tmp_path / "net.pkl"
  pkl.write_bytes(_crafted_edm_pickle(config, state, tmp_path / "marker"))
  assert convert_main([str(pkl), str(tmp_path / "out")]) == 0
  printed = capsys.readouterr().out
  assert '"label_dim": 10' in printed and "parameters: " in printed
  assert (tmp_path / "out" / "arch.json").is_file() and (tmp_path / "out" / "params").is_dir()
  # An existing empty OUT_DIR is accepted (e.g. made by a job script); a non-empty one is refused untouched.
  (tmp_path / "empty_out").mkdir()
  assert convert_main([str(pkl), str(tmp_path / "empty_out")]) == 0
  assert (tmp_path / "empty_out" / "arch.json").is_file()
  capsys.readouterr()
  (tmp_path / "taken").mkdir()
  (tmp_path / "taken" / "mine.txt").write_text("keep")
  assert convert_main([str(pkl), str(tmp_path / "taken")]) == 2
  assert "not empty" in capsys.readouterr().err
  assert sorted(p.name for p in (tmp_path / "taken").iterdir()) == ["mine.txt"]

  # Missing tensors: one line, status 2, nothing written.
  bad_state = tmp_path / "partial.npz"
  np.savez(bad_state, config_json=json.dumps(config),
           **{f"state/{k}": v for k, v in state.items() if "dec.8x8_block0" not in k})
  assert convert_main([str(bad_state), str(tmp_path / "out2")]) == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and "missing" in err
  assert not (tmp_path / "out2").exists()
  assert convert_main([str(tmp_path / "nope.pkl"), str(tmp_path / "out3")]) == 2
  assert "no such file" in capsys.readouterr().err and not (tmp_path / "out3").exists()


def test_convert_edm_module_refuses_malicious_pickle(tmp_path):
  """`python -m simjax.convert_edm` on a malicious pickle: exit 2, one line, nothing run or written."""
  marker = tmp_path / "pwned"
  path = tmp_path / "evil.pkl"
  path.write_bytes(pickle.dumps({"ema": _Evil(marker)}))
  env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
             JAX_PLATFORMS="cpu")
  result = subprocess.run([sys.executable, "-m", "simjax.convert_edm", str(path), str(tmp_path / "out")],
                          capture_output=True, text=True, env=env, timeout=120, check=False)
  assert result.returncode == 2, result.stderr
  assert result.stderr.count("\n") == 1 and "system" in result.stderr
  assert not marker.exists() and not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------------------------
# With real torch (optional).


def _torch_edm_pickle(torch, monkeypatch, config, state, marker):
  """An EDM-format pickle made by real torch and stand-in persistence classes (EDM's mechanism)."""
  persistence = types.ModuleType("torch_utils.persistence")

  def _reconstruct_persistent_obj(meta):  # what EDM would do: exec(meta['module_src']); never called here
    raise AssertionError(meta["class_name"])

  _reconstruct_persistent_obj.__module__ = "torch_utils.persistence"
  _reconstruct_persistent_obj.__qualname__ = "_reconstruct_persistent_obj"
  persistence._reconstruct_persistent_obj = _reconstruct_persistent_obj
  package = types.ModuleType("torch_utils")
  package.persistence = persistence
  monkeypatch.setitem(sys.modules, "torch_utils", package)
  monkeypatch.setitem(sys.modules, "torch_utils.persistence", persistence)

  class Persistent(torch.nn.Module):

    def __init__(self, class_name, init_kwargs=None):
      super().__init__()
      self._edm_class_name = class_name
      self._init_args, self._init_kwargs = (), dict(init_kwargs or {})

    def __reduce__(self):  # EDM's persistent_class.__reduce__: state + source, rebuilt by the reconstructor
      fields = list(super().__reduce__())
      meta = dict(type="class", version=6, module_src=MODULE_SRC.format(marker=marker),
                  class_name=self._edm_class_name, state=fields[2])
      return _reconstruct_persistent_obj, (meta,), None

  def build(node, path, init_kwargs=None):
    module = Persistent(_class_name(path, node["params"]), init_kwargs)
    for name, value in node["params"].items():
      module.register_parameter(name, torch.nn.Parameter(torch.from_numpy(value.copy())))
    for name, value in node["buffers"].items():
      module.register_buffer(name, torch.from_numpy(value.copy()))
    for name, child in node["children"].items():
      if name in ("enc", "dec"):
        module.add_module(name, torch.nn.ModuleDict({k: build(v, path + (name, k)) for k, v in child["children"].items()}))
      else:
        module.add_module(name, build(child, path + (name,)))
    return module

  ema = build(_module_tree(state), (), _edm_init_kwargs(config)).eval().requires_grad_(False)
  return ema, pickle.dumps(dict(ema=ema, augment_pipe=None, dataset_kwargs={}))


def test_torch_made_edm_pickle_and_state_dicts(tmp_path, monkeypatch):
  torch = pytest.importorskip("torch", reason="optional: checks files written by real torch")
  _, config, state, inputs = _fixture("edm_ddpmpp_tiny_cond")
  marker = tmp_path / "module_src_was_executed"
  ema, payload = _torch_edm_pickle(torch, monkeypatch, config, state, marker)
  pkl = tmp_path / "net.pkl"
  pkl.write_bytes(payload)
  kwargs, loaded = load_edm_pickle(pkl)
  assert kwargs == dict(config, use_fp16=False)
  _assert_same_state(loaded, {k: v.numpy() for k, v in ema.state_dict().items()})
  _assert_same_state(loaded, state)
  assert not marker.exists()

  # torch.save state dicts, zip and legacy formats.
  torch.save(ema.state_dict(), tmp_path / "zip.pt")
  torch.save(ema.state_dict(), tmp_path / "legacy.pth", _use_new_zipfile_serialization=False)
  _assert_same_state(load_state_dict(tmp_path / "zip.pt"), state)
  _assert_same_state(load_state_dict(tmp_path / "legacy.pth"), state)
  teacher = load_teacher(tmp_path / "zip.pt", arch=config, precision=HIGHEST)
  out = teacher.denoise(inputs["x_nchw"].transpose(0, 2, 3, 1), inputs["sigma"], inputs["class_labels"],
                        inputs["augment_labels"])
  np.testing.assert_allclose(np.asarray(out), inputs["denoised_nchw"].transpose(0, 2, 3, 1), atol=1e-4, rtol=0)


def test_torch_bfloat16_and_noncontiguous_tensors(tmp_path):
  torch = pytest.importorskip("torch", reason="optional: checks files written by real torch")
  base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
  tensors = {"t": base.t(), "slice": base[1:3, ::2], "bf16": base.to(torch.bfloat16)[0], "i64": torch.arange(5)}
  torch.save(collections.OrderedDict(tensors), tmp_path / "w.pt")
  loaded = load_state_dict(tmp_path / "w.pt")
  for name, value in tensors.items():
    np.testing.assert_array_equal(loaded[name].astype(np.float64), value.to(torch.float64).numpy(), err_msg=name)
  assert str(loaded["bf16"].dtype) == "bfloat16" and loaded["i64"].dtype == np.int64

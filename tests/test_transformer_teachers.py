"""PixArt-alpha / DiT in Flax against diffusers' PyTorch modules built with random weights (float32,
tiny configurations), the discrete-VP denoiser against diffusers' schedulers and PixArt's pipeline, and
the checkpoint formats `simjax.load_teacher` reads."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="parity against diffusers needs torch (pip install -e '.[test]')")
diffusers = pytest.importorskip("diffusers", reason="parity against diffusers needs diffusers (pip install -e '.[test]')")

import simjax  # pylint: disable=wrong-import-position
from simjax.diffusion import samplers  # pylint: disable=wrong-import-position
from simjax.networks import dit  # pylint: disable=wrong-import-position
from simjax.networks.discrete_vp import ddpm_sigmas, nearest_timestep  # pylint: disable=wrong-import-position
from simjax.teachers import guidance, transformer_checkpoints as tc  # pylint: disable=wrong-import-position

TOL = 1e-4
HIGHEST = jax.lax.Precision.HIGHEST


def _randomize(model, seed=0, scale=0.1):
  """Every parameter N(0, scale^2), biases and tables included (diffusers zero-inits some)."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for p in model.parameters():
      p.copy_(torch.randn(p.shape, generator=gen) * scale)
  return model.eval()


def _pixart(micro=False, seed=0):
  return _randomize(diffusers.PixArtTransformer2DModel(
      num_attention_heads=3, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=2,
      cross_attention_dim=24, sample_size=8, patch_size=2, caption_channels=12,
      use_additional_conditions=micro), seed)


def _dit(seed=0, share_embedder=True):
  model = _randomize(diffusers.DiTTransformer2DModel(
      num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=2, sample_size=8,
      patch_size=2, num_embeds_ada_norm=10), seed)
  if share_embedder:  # as converted DiT checkpoints are: every block holds block 0's embedder
    state = model.state_dict()
    with torch.no_grad():
      for key, value in state.items():
        if ".norm1.emb." in key and not key.startswith("transformer_blocks.0."):
          value.copy_(state["transformer_blocks.0." + key.split(".", 2)[2]])
  return model


def _state(model):
  return {k: v.detach().numpy() for k, v in model.state_dict().items()}


def _flax(model):
  config = {**model.config, "_class_name": type(model).__name__}
  arch = tc.arch_from_diffusers_config(config)
  return arch, tc.convert_state_dict(arch, _state(model))


def _nhwc(x):
  return jnp.asarray(np.asarray(x).transpose(0, 2, 3, 1))


def _nchw(x):
  return np.asarray(x).transpose(0, 3, 1, 2)


def _text(n=3, length=5, width=12, seed=1):
  emb = np.random.RandomState(seed).randn(n, length, width).astype(np.float32)
  mask = np.zeros((n, length), np.float32)
  for i in range(n):
    mask[i, : max(1, length - 2 * i)] = 1  # rows padded differently, one down to a single token
  return emb, mask


X = np.random.RandomState(0).randn(3, 4, 8, 8).astype(np.float32)
T = np.array([0.0, 440.0, 999.0], np.float32)


@pytest.mark.parametrize("micro", [False, True])
def test_pixart_matches_diffusers(micro):
  model = _pixart(micro)
  arch, params = _flax(model)
  emb, mask = _text()
  kwargs = {"added_cond_kwargs": {"resolution": None, "aspect_ratio": None}}
  sizes = [{}]
  if micro:  # the default (from the latent size, 8 px per latent) and an explicit non-square size
    sizes = [dict(resolution=[[64.0, 64.0]] * 3, aspect_ratio=[[1.0]] * 3),
             dict(resolution=[[64.0, 48.0]] * 3, aspect_ratio=[[4 / 3]] * 3)]
  for i, size in enumerate(sizes):
    if micro:
      kwargs = {"added_cond_kwargs": {k: torch.tensor(v) for k, v in size.items()}}
    with torch.no_grad():
      ref = model(torch.tensor(X), encoder_hidden_states=torch.tensor(emb), timestep=torch.tensor(T),
                  encoder_attention_mask=torch.tensor(mask), **kwargs).sample.numpy()
    net = dit.DiffusionTransformer(**arch, precision=HIGHEST)
    flax_size = {k: np.asarray(v, np.float32) for k, v in size.items()} if i else {}
    out = _nchw(net.apply(params, _nhwc(X), T, {"emb": emb, "mask": mask}, **flax_size))
    err = np.abs(out - ref).max()
    print(f"PixArt micro={micro} size={size or 'default'}: max abs error {err:.2e} (|ref| max {np.abs(ref).max():.1f})")
    assert err <= TOL, (micro, size, err)
  # The padding matters: the same captions unmasked give a different output.
  out_unmasked = _nchw(net.apply(params, _nhwc(X), T, {"emb": emb, "mask": np.ones_like(mask)}))
  assert np.abs(out_unmasked - ref).max() > 100 * TOL


def test_scanned_and_rematerialised_blocks_equal_the_loop():
  arch, params = _flax(_pixart())
  emb, mask = _text()
  cond = {"emb": emb, "mask": mask}
  loop = dit.DiffusionTransformer(**arch, precision=HIGHEST).apply(params, _nhwc(X), T, cond)
  stacked = {"params": dit.stack_blocks(params["params"], arch["depth"])}
  for remat in (False, True):
    net = dit.DiffusionTransformer(**arch, scan_blocks=True, remat=remat, precision=HIGHEST)
    np.testing.assert_allclose(net.apply(stacked, _nhwc(X), T, cond), loop, atol=1e-5)
  back = dit.unstack_blocks(stacked["params"], arch["depth"])
  assert jax.tree.all(jax.tree.map(np.array_equal, back, params["params"]))


def test_dit_matches_diffusers():
  model = _dit()
  arch, params = _flax(model)
  labels = np.array([3, 7, 10])  # 10 = the null class
  with torch.no_grad():
    ref = model(torch.tensor(X), timestep=torch.tensor(T), class_labels=torch.tensor(labels)).sample.numpy()
  onehot = np.eye(11, dtype=np.float32)[labels][:, :10]  # the null class is the all-zero row
  out = _nchw(dit.DiffusionTransformer(**arch, precision=HIGHEST).apply(params, _nhwc(X), T, onehot))
  print(f"DiT: max abs error {np.abs(out - ref).max():.2e}")
  assert np.abs(out - ref).max() <= TOL


def test_dit_with_differing_per_block_embedders_is_refused():
  model = _dit(share_embedder=False)
  with pytest.raises(tc.CheckpointMismatch, match="copies of norm1.emb"):
    _flax(model)


def test_missing_unexpected_and_misshapen_tensors_are_named():
  model = _pixart()
  arch, _ = _flax(model)
  state = _state(model)
  bad = dict(state)
  bad.pop("transformer_blocks.1.attn2.to_k.weight")
  bad["transformer_blocks.1.extra.weight"] = np.zeros((2, 2), np.float32)
  with pytest.raises(tc.CheckpointMismatch, match=r"missing \['transformer_blocks_1/attn2/to_k/kernel'\].*"
                                                  r"unexpected \['transformer_blocks_1/extra/kernel'\]"):
    tc.convert_state_dict(arch, bad)
  bad = dict(state, **{"proj_out.bias": np.zeros(5, np.float32)})
  with pytest.raises(tc.CheckpointMismatch, match="proj_out/bias"):
    tc.convert_state_dict(arch, bad)


def test_discrete_vp_denoiser_matches_the_ddpm_scheduler():
  sigmas = ddpm_sigmas()
  assert int(nearest_timestep(2.5, sigmas)) == 440  # SIM's release: sigma_init 2.5 is t = 440
  mid = 0.5 * (sigmas[100] + sigmas[101])
  assert int(nearest_timestep(mid * 0.999, sigmas)) == 100 and int(nearest_timestep(mid * 1.001, sigmas)) == 101
  assert int(nearest_timestep(1e-5, sigmas)) == 0 and int(nearest_timestep(1e5, sigmas)) == 999

  model = _pixart()
  arch, params = _flax(model)
  module = tc.build_teacher_module(arch, tc.SCHEDULE_DEFAULTS, precision=HIGHEST)
  scheduler = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02,
                                      beta_schedule="linear", variance_type="learned_range",
                                      clip_sample=False)
  emb, mask = _text()
  x0 = np.random.RandomState(3).randn(3, 4, 8, 8).astype(np.float32)
  noise = np.random.RandomState(4).randn(3, 4, 8, 8).astype(np.float32)
  for t in (0, 37, 440, 999):
    abar = float(scheduler.alphas_cumprod[t])
    x_t = (np.sqrt(abar) * x0 + np.sqrt(1 - abar) * noise).astype(np.float32)
    with torch.no_grad():
      eps = model(torch.tensor(x_t), encoder_hidden_states=torch.tensor(emb), timestep=torch.full((3,), t),
                  encoder_attention_mask=torch.tensor(mask), added_cond_kwargs={"resolution": None,
                                                                                "aspect_ratio": None}).sample
      ref = np.stack([scheduler.step(eps[i:i + 1], t, torch.tensor(x_t[i:i + 1])).pred_original_sample[0].numpy()
                      for i in range(3)])
    sigma = np.sqrt((1 - abar) / abar)
    out = module.apply({"params": {"model": params["params"]}}, _nhwc(x_t / np.float32(np.sqrt(abar))),
                       np.full((3,), sigma, np.float32), {"emb": emb, "mask": mask})
    err = np.abs(_nchw(out) - ref).max() / max(1.0, np.abs(ref).max())
    print(f"discrete VP vs DDPMScheduler x0 at t={t}: relative error {err:.2e}")
    assert err <= TOL, (t, err)


def _save_pipeline(tmp_path, model, scheduler_config=None):
  """A diffusers pipeline directory with only what simjax reads: model_index.json, transformer/, scheduler/."""
  root = tmp_path / "pipeline"
  model.save_pretrained(root / "transformer")  # safetensors
  (root / "model_index.json").write_text(json.dumps({"_class_name": "PixArtAlphaPipeline",
                                                     "transformer": ["diffusers", type(model).__name__]}))
  (root / "scheduler").mkdir()
  (root / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler_config or {
      "_class_name": "DPMSolverMultistepScheduler", "num_train_timesteps": 1000, "beta_start": 1e-4,
      "beta_end": 0.02, "beta_schedule": "linear"}))
  return root


def _to_original_pixart(state, depth):
  """diffusers names -> PixArt-alpha's repository names (what its .pth files hold), fusing q/k/v."""
  out = {"x_embedder.proj.weight": state["pos_embed.proj.weight"], "x_embedder.proj.bias": state["pos_embed.proj.bias"]}
  renames = {"caption_projection.linear_1": "y_embedder.y_proj.fc1", "caption_projection.linear_2": "y_embedder.y_proj.fc2",
             "adaln_single.emb.timestep_embedder.linear_1": "t_embedder.mlp.0",
             "adaln_single.emb.timestep_embedder.linear_2": "t_embedder.mlp.2",
             "adaln_single.linear": "t_block.1", "proj_out": "final_layer.linear"}
  for src, dst in renames.items():
    for suffix in ("weight", "bias"):
      out[f"{dst}.{suffix}"] = state[f"{src}.{suffix}"]
  out["final_layer.scale_shift_table"] = state["scale_shift_table"]
  for i in range(depth):
    s, d = f"transformer_blocks.{i}", f"blocks.{i}"
    out[f"{d}.scale_shift_table"] = state[f"{s}.scale_shift_table"]
    for suffix in ("weight", "bias"):
      out[f"{d}.attn.qkv.{suffix}"] = np.concatenate([state[f"{s}.attn1.to_{c}.{suffix}"] for c in "qkv"])
      out[f"{d}.attn.proj.{suffix}"] = state[f"{s}.attn1.to_out.0.{suffix}"]
      out[f"{d}.cross_attn.q_linear.{suffix}"] = state[f"{s}.attn2.to_q.{suffix}"]
      out[f"{d}.cross_attn.kv_linear.{suffix}"] = np.concatenate([state[f"{s}.attn2.to_{c}.{suffix}"] for c in "kv"])
      out[f"{d}.cross_attn.proj.{suffix}"] = state[f"{s}.attn2.to_out.0.{suffix}"]
      out[f"{d}.mlp.fc1.{suffix}"] = state[f"{s}.ff.net.0.proj.{suffix}"]
      out[f"{d}.mlp.fc2.{suffix}"] = state[f"{s}.ff.net.2.{suffix}"]
  out["pos_embed"] = np.zeros((1, 16, 24), np.float32)  # the fixed positions buffer (4x4 patches)
  out["y_embedder.y_embedding"] = np.random.RandomState(5).randn(5, 12).astype(np.float32)  # learned null caption
  return out


def _to_original_dit(state, depth):
  """diffusers names -> facebookresearch/DiT's names (block 0's embedder as the shared one)."""
  out = {"x_embedder.proj.weight": state["pos_embed.proj.weight"], "x_embedder.proj.bias": state["pos_embed.proj.bias"],
         "y_embedder.embedding_table.weight": state["transformer_blocks.0.norm1.emb.class_embedder.embedding_table.weight"],
         "pos_embed": np.zeros((1, 16, 16), np.float32)}
  renames = {"transformer_blocks.0.norm1.emb.timestep_embedder.linear_1": "t_embedder.mlp.0",
             "transformer_blocks.0.norm1.emb.timestep_embedder.linear_2": "t_embedder.mlp.2",
             "proj_out_1": "final_layer.adaLN_modulation.1", "proj_out_2": "final_layer.linear"}
  for i in range(depth):
    renames.update({f"transformer_blocks.{i}.attn1.to_out.0": f"blocks.{i}.attn.proj",
                    f"transformer_blocks.{i}.ff.net.0.proj": f"blocks.{i}.mlp.fc1",
                    f"transformer_blocks.{i}.ff.net.2": f"blocks.{i}.mlp.fc2",
                    f"transformer_blocks.{i}.norm1.linear": f"blocks.{i}.adaLN_modulation.1"})
    for suffix in ("weight", "bias"):
      out[f"blocks.{i}.attn.qkv.{suffix}"] = np.concatenate(
          [state[f"transformer_blocks.{i}.attn1.to_{c}.{suffix}"] for c in "qkv"])
  for src, dst in renames.items():
    for suffix in ("weight", "bias"):
      out[f"{dst}.{suffix}"] = state[f"{src}.{suffix}"]
  return out


def test_load_teacher_reads_every_pixart_format_to_the_same_denoiser(tmp_path):
  model = _pixart()
  pipeline = _save_pipeline(tmp_path, model)
  original = _to_original_pixart(_state(model), depth=2)
  torch.save({"state_dict": {k: torch.tensor(v) for k, v in original.items()}}, tmp_path / "PixArt-tiny.pth")
  # SIM's release: the EMA generator under 'ema', saved from a DistributedDataParallel module.
  torch.save({"ema": {f"module.{k}": torch.tensor(v) for k, v in original.items()}}, tmp_path / "sim.pt")
  emb, mask = _text()
  cond = {"emb": emb, "mask": mask}
  sigma = np.array([0.05, 2.5, 80.0], np.float32)
  x = np.asarray(_nhwc(X))
  outs = {}
  for name in (pipeline, pipeline / "transformer", tmp_path / "PixArt-tiny.pth", tmp_path / "sim.pt"):
    # The original files do not record the head count of an unpublished width.
    arch = None if name.is_dir() else {"num_heads": 3}
    teacher = simjax.load_teacher(name, arch=arch, precision=HIGHEST)
    outs[name.name] = np.asarray(teacher.denoise(x, sigma, cond))
  ref = outs.pop("pipeline")
  for name, out in outs.items():
    np.testing.assert_allclose(out, ref, atol=1e-6, err_msg=name)
  # Scanned, rematerialised blocks are a runtime switch of the same checkpoint.
  scanned = simjax.load_teacher(pipeline, arch={"scan_blocks": True, "remat": True}, precision=HIGHEST)
  assert "transformer_blocks" in scanned.params["params"]["model"]
  np.testing.assert_allclose(np.asarray(scanned.denoise(x, sigma, cond)), ref, atol=TOL)
  # The original files keep PixArt's learned null caption; diffusers' folders do not.
  teacher = simjax.load_teacher(tmp_path / "sim.pt", arch={"num_heads": 3})
  np.testing.assert_array_equal(teacher.null_cond["emb"], original["y_embedder.y_embedding"])
  assert simjax.load_teacher(pipeline).null_cond is None
  # The same denoiser as the torch model through the scheduler's x0 prediction.
  abar = 1 / (1 + sigma.astype(np.float64) ** 2)
  t = nearest_timestep(sigma, ddpm_sigmas())
  with torch.no_grad():
    eps = model(torch.tensor(_nchw(x) * np.sqrt(abar)[:, None, None, None], dtype=torch.float32),
                encoder_hidden_states=torch.tensor(emb), timestep=torch.tensor(np.asarray(t)),
                encoder_attention_mask=torch.tensor(mask),
                added_cond_kwargs={"resolution": None, "aspect_ratio": None}).sample.numpy()[:, :4]
  expected = _nchw(x) - sigma[:, None, None, None] * eps
  assert np.abs(_nchw(ref) - expected).max() <= TOL * max(1.0, np.abs(expected).max())


def test_load_teacher_reads_dit_folders_and_original_files(tmp_path):
  model = _dit()
  model.save_pretrained(tmp_path / "dit")
  original = _to_original_dit(_state(model), depth=2)
  torch.save({k: torch.tensor(v) for k, v in original.items()}, tmp_path / "DiT-tiny.pt")
  folder = simjax.load_teacher(tmp_path / "dit", precision=HIGHEST)
  from_pt = simjax.load_teacher(tmp_path / "DiT-tiny.pt", arch={"num_heads": 2}, precision=HIGHEST)
  assert folder.label_dim == from_pt.label_dim == 10
  # diffusers' DiT shifts its timestep frequencies (downscale_freq_shift=1) and its blocks' LayerNorm eps is
  # 1e-5; the original DiT uses 0 and 1e-6.
  assert folder.module.model.freq_shift == 1.0 and from_pt.module.model.freq_shift == 0.0
  labels = np.eye(10, dtype=np.float32)[[2, 5, 9]]
  x, sigma = np.asarray(_nhwc(X)), np.array([0.1, 1.0, 10.0], np.float32)
  a = np.asarray(folder.denoise(x, sigma, labels))
  b = np.asarray(from_pt.denoise(x, sigma, labels))
  assert np.all(np.isfinite(a)) and np.abs(a - b).max() > 1e-6  # only the frequency shift and eps differ
  same = simjax.load_teacher(tmp_path / "DiT-tiny.pt", arch={"num_heads": 2, "freq_shift": 1.0, "norm_eps": 1e-5},
                             precision=HIGHEST)
  np.testing.assert_allclose(np.asarray(same.denoise(x, sigma, labels)), a, atol=1e-6)


def test_guided_ddim_sampling_matches_the_pixart_pipeline(tmp_path):
  """4 DDIM steps with guidance 4.5 through PixArtAlphaPipeline (latent output, given prompt embeddings
  and noise) equal simjax's Euler sampler on the same trained levels with the guided teacher."""
  model = _pixart(seed=2)
  scheduler = diffusers.DDIMScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02,
                                      beta_schedule="linear", clip_sample=False, set_alpha_to_one=True)
  pipe = diffusers.PixArtAlphaPipeline(tokenizer=None, text_encoder=None, vae=None, transformer=model,
                                       scheduler=scheduler)
  emb, mask = _text(n=2)
  null_emb = np.repeat(np.random.RandomState(9).randn(1, 5, 12).astype(np.float32), 2, axis=0)  # one null caption
  null_mask = np.repeat(np.array([[1, 1, 1, 0, 0]], np.float32), 2, axis=0)
  latents = np.random.RandomState(7).randn(2, 4, 8, 8).astype(np.float32)
  with torch.no_grad():
    ref = pipe(negative_prompt=None, prompt_embeds=torch.tensor(emb), prompt_attention_mask=torch.tensor(mask),
               negative_prompt_embeds=torch.tensor(null_emb), negative_prompt_attention_mask=torch.tensor(null_mask),
               latents=torch.tensor(latents), num_inference_steps=4, guidance_scale=4.5, height=64, width=64,
               output_type="latent", use_resolution_binning=False, return_dict=False)[0].numpy()
  scheduler.set_timesteps(4)
  sigmas = np.append(ddpm_sigmas()[scheduler.timesteps.numpy()], 0.0)

  teacher = simjax.load_teacher(_save_pipeline(tmp_path, model), precision=HIGHEST)
  null = {"emb": null_emb[0], "mask": null_mask[0]}
  denoise = guidance.guided(lambda x, s, c: teacher.denoise(x, s, c), 4.5, null=null)
  # diffusers starts from x_T ~ N(0, I) in x_t units; EDM's x = x_T / sqrt(abar_T) = x_T sqrt(1 + sigma^2).
  start = _nhwc(latents) * np.sqrt(1 + sigmas[0] ** 2) / sigmas[0]
  cond = {"emb": emb, "mask": mask}
  out = samplers.edm_sample(lambda x, s: denoise(x, s, cond), start, sigmas=sigmas, solver="euler")
  err = np.abs(_nchw(out) - ref).max()
  print(f"guided DDIM vs PixArtAlphaPipeline: max abs error {err:.2e} (|ref| max {np.abs(ref).max():.1f})")
  assert err <= TOL * max(1.0, np.abs(ref).max()), err


def _count(tree):
  return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(tree))


def _meta_count(model_cls, **config):
  with torch.device("meta"):
    model = model_cls(**config)
  return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", ["PixArt-XL-2-512x512", "PixArt-XL-2-1024-MS", "DiT-XL-2-256"])
def test_full_size_parameter_counts_match_diffusers(name):
  """simjax's counts at the published sizes equal diffusers' (less DiT's 27 repeated embedders)."""
  if name.startswith("PixArt"):
    sample = 64 if "512" in name else 128
    config = dict(sample_size=sample, caption_channels=4096)
    theirs = _meta_count(diffusers.PixArtTransformer2DModel, **config)
    arch = tc.arch_from_diffusers_config({"_class_name": "PixArtTransformer2DModel", **config})
  else:
    config = dict(sample_size=32, in_channels=4, out_channels=8, num_embeds_ada_norm=1000)
    theirs = _meta_count(diffusers.DiTTransformer2DModel, **config)
    width = 1152
    embedder = (256 * width + width) + (width * width + width) + 1001 * width
    theirs -= 27 * embedder
    arch = tc.arch_from_diffusers_config({"_class_name": "DiTTransformer2DModel", **config})
  ours = _count(tc.param_shapes(dit.DiffusionTransformer(**arch))["params"])
  assert ours == theirs, (name, ours, theirs)
  if name.startswith("DiT"):  # DiT's own count (its train.py log) includes the frozen 256 x 1152 positions
    assert ours + 256 * 1152 == 675_129_632
  assert (name == "PixArt-XL-2-1024-MS") == arch.get("micro_conditions", False)


def test_convert_transformer_writes_a_folder_load_teacher_reads(tmp_path, capsys):
  from simjax import convert_transformer  # pylint: disable=import-outside-toplevel
  model = _pixart()
  pipeline = _save_pipeline(tmp_path, model)
  original = _to_original_pixart(_state(model), depth=2)
  torch.save({"ema": {f"module.{k}": torch.tensor(v) for k, v in original.items()}}, tmp_path / "sim.pt")
  assert convert_transformer.main([str(pipeline), str(tmp_path / "from_pipeline")]) == 0
  assert convert_transformer.main([str(tmp_path / "sim.pt"), str(tmp_path / "from_sim"),
                                   "--arch", '{"num_heads": 3}']) == 0
  assert "learned null caption [5, 12]" in capsys.readouterr().out
  emb, mask = _text()
  x, sigma = np.asarray(_nhwc(X)), np.array([0.05, 2.5, 80.0], np.float32)
  ref = np.asarray(simjax.load_teacher(pipeline, precision=HIGHEST).denoise(x, sigma, {"emb": emb, "mask": mask}))
  for name in ("from_pipeline", "from_sim"):
    teacher = simjax.load_teacher(tmp_path / name, arch={"scan_blocks": True}, precision=HIGHEST)
    np.testing.assert_allclose(np.asarray(teacher.denoise(x, sigma, {"emb": emb, "mask": mask})), ref, atol=TOL)
  converted = simjax.load_teacher(tmp_path / "from_sim")
  np.testing.assert_array_equal(converted.null_cond["emb"], original["y_embedder.y_embedding"])
  assert converted.arch["beta_schedule"] == "linear" and converted.module.sigma_max > 150

  # Bad input: exit 2, one line naming the problem, nothing written.
  edm_like = tmp_path / "edm.pt"
  torch.save({"model.enc.conv.weight": torch.zeros(2, 2)}, edm_like)
  cases = [([str(tmp_path / "absent"), str(tmp_path / "o1")], "neither"),
           ([str(pipeline), str(tmp_path / "from_pipeline")], "not empty"),
           ([str(edm_like), str(tmp_path / "o2")], "convert_edm"),
           ([str(tmp_path / "sim.pt"), str(tmp_path / "o3")], "num_heads"),
           ([str(pipeline), str(tmp_path / "o4"), "--arch", "[1]"], "JSON object")]
  for argv, phrase in cases:
    assert convert_transformer.main(argv) == 2, argv
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and phrase in err, (argv, err)
  assert not any((tmp_path / f"o{i}").exists() for i in range(1, 5))

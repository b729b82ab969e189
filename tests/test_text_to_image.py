"""The text-to-image pipeline: the guided text teacher against a direct computation, noise levels on the
teacher's grid, and the digits default end to end with tiny sizes (joint T5 + transformer teacher,
embedding cache, SIM from prompts, evaluation on held-out phrasings, export, sampling from a prompt file).
"""
import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import REPO

TINY = ["--config.teacher_train.num_steps=150", "--config.teacher_train.batch_size=64",
        "--config.teacher_train.log_every=50", "--config.teacher_train.checkpoint_every=150",
        "--config.teacher.arch.depth=2", "--config.text.encoder_arch.num_layers=1", "--config.captions.per_image=2",
        "--config.batch_size=16", "--config.log_every=10", "--config.checkpoint_every=20", "--config.grid_every=20",
        "--config.eval.samples_per_prompt=1", "--config.eval.batch_size=120", "--config.eval.teacher_steps=4",
        "--config.eval.guidance_sweep=(1.0,)", "--config.eval.classifier.steps=100", "--config.text.shard_size=512"]
SIM_STEPS = 20


def main(workdir, *args, check=True, config="configs/digits_t2i.py"):
  cmd = [sys.executable, "-m", "simjax.main", f"--config={config}", f"--workdir={workdir}"] + TINY + list(args)
  proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=1500)
  if check and proc.returncode != 0:
    raise AssertionError(f"main failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
  return proc


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  wd = tmp_path_factory.mktemp("digits_t2i")
  proc = main(wd, f"--config.num_steps={SIM_STEPS}")
  return wd, json.loads((wd / "eval" / "final.json").read_text()), proc


def read_jsonl(path):
  return [json.loads(l) for l in path.read_text().splitlines() if l.strip()]


# ----------------------------------------------------------------------------------------------
# Pieces

def _tiny_text_teacher(seed=0):
  from simjax.teachers import transformer_checkpoints as tc  # pylint: disable=import-outside-toplevel
  arch = dict(sample_size=4, in_channels=1, out_channels=1, adaln="single", caption_channels=6, pixels_per_latent=1,
              patch_size=2, num_heads=2, head_dim=4, depth=1)
  module = tc.build_teacher_module(arch, dict(num_train_timesteps=100, beta_start=1e-3, beta_end=0.05,
                                              beta_schedule="linear"))
  cond = {"emb": jnp.zeros((1, 5, 6)), "mask": jnp.ones((1, 5))}
  variables = module.init(jax.random.key(seed), jnp.zeros((1, 4, 4, 1)), jnp.ones((1,)), cond)
  # Non-zero output layers (the transformer zero-initialises them), so D depends on the caption.
  variables = jax.tree.map(lambda a: a + 0.2 * jax.random.normal(jax.random.key(seed + 1), a.shape), variables)
  return module, variables


def test_the_guided_text_teacher_is_the_null_plus_w_times_the_conditional_minus_the_null():
  """The SIM step's guided teacher (guidance.guided_teacher with the run's null caption) against two plain calls:
  D_null + w (D_c - D_null), with the null caption (not zeros) in the null call."""
  from simjax.teachers import guidance  # pylint: disable=import-outside-toplevel
  from simjax.training.roles import Denoiser  # pylint: disable=import-outside-toplevel
  module, variables = _tiny_text_teacher()
  k = jax.random.split(jax.random.key(3), 4)
  x = jax.random.normal(k[0], (3, 4, 4, 1))
  sigma = jnp.asarray([0.3, 1.0, 4.0])
  cond = {"emb": jax.random.normal(k[1], (3, 5, 6)), "mask": jnp.asarray([[1, 1, 1, 0, 0]] * 3, jnp.float32)}
  null = {"emb": jax.random.normal(k[2], (5, 6)), "mask": jnp.asarray([1, 0, 0, 0, 0], jnp.float32)}
  w = 3.5
  guided = jax.jit(guidance.guided_teacher(Denoiser(module), w, null))(variables, x, sigma, cond)
  apply = jax.jit(module.apply)
  d_c = apply(variables, x, sigma, cond)
  d_null = apply(variables, x, sigma, jax.tree.map(lambda a: jnp.broadcast_to(a, (3,) + a.shape), null))
  np.testing.assert_allclose(guided, d_null + w * (d_c - d_null), rtol=1e-5, atol=1e-5)
  # The zeros null (what a class-label teacher uses) is a different teacher: the check can fail.
  zeros = jax.jit(guidance.guided_teacher(Denoiser(module), w))(variables, x, sigma, cond)
  assert float(jnp.max(jnp.abs(zeros - guided))) > 1e-3


def test_loss_noise_levels_snap_to_the_teachers_trained_levels():
  from simjax.conditioning import CondSpace  # pylint: disable=import-outside-toplevel
  from simjax.training.roles import Denoiser, DistillNetworks  # pylint: disable=import-outside-toplevel
  module, _ = _tiny_text_teacher()
  grid = tuple(float(s) for s in module.sigmas)
  nets = DistillNetworks(generator=Denoiser(module), fake=Denoiser(module), teacher=Denoiser(module),
                         data_shape=(4, 4, 1), cond_space=CondSpace(text_length=5, text_dim=6), sigma_init=2.5,
                         sigma_grid=grid)
  sigma = jnp.exp(jax.random.normal(jax.random.key(0), (500,)) * 1.5)
  snapped = np.asarray(nets.snap_sigma(sigma))
  table = np.asarray(grid, np.float32)
  assert np.all(np.isin(snapped, table))
  nearest = table[np.abs(table[None] - np.asarray(sigma)[:, None]).argmin(1)]
  np.testing.assert_array_equal(snapped, nearest)
  # The teacher reads each snapped level as the timestep it was trained at.
  np.testing.assert_array_equal(np.asarray(module.timestep(jnp.asarray(snapped))),
                                np.abs(table[None] - snapped[:, None]).argmin(1))


def test_the_trained_text_encoder_is_a_transformers_t5_folder(tmp_path):
  """save_text_encoder's folder reads back through load_text_encoder (and so through transformers)."""
  from simjax.networks.t5 import T5Encoder  # pylint: disable=import-outside-toplevel
  from simjax.text import t5_checkpoints  # pylint: disable=import-outside-toplevel
  arch = dict(t5_checkpoints.CONFIG_DEFAULTS, vocab_size=259, d_model=16, d_kv=4, d_ff=32, num_layers=2, num_heads=4,
              feed_forward_proj="gated-gelu")
  module = T5Encoder(**arch)
  ids = jnp.asarray([[5, 9, 1, 0], [7, 1, 0, 0]], jnp.int32)
  mask = (ids > 0).astype(jnp.float32)
  params = module.init(jax.random.key(0), ids, mask)["params"]
  t5_checkpoints.save_text_encoder(tmp_path / "enc", arch, params)
  assert json.loads((tmp_path / "enc" / "config.json").read_text())["d_model"] == 16
  loaded = t5_checkpoints.load_text_encoder(str(tmp_path / "enc"))
  np.testing.assert_allclose(loaded.encode(ids, mask), module.apply({"params": params}, ids, mask), atol=1e-5)
  torch = pytest.importorskip("torch", reason="the transformers check needs torch (pip install -e '.[test]')")
  transformers = pytest.importorskip("transformers", reason="the transformers check needs transformers")
  ref = transformers.T5EncoderModel.from_pretrained(str(tmp_path / "enc")).eval()
  with torch.no_grad():
    out = ref(input_ids=torch.as_tensor(np.array(ids), dtype=torch.long),
              attention_mask=torch.as_tensor(np.array(mask))).last_hidden_state.numpy()
  np.testing.assert_allclose(out, np.asarray(loaded.encode(ids, mask)), atol=1e-4)


# ----------------------------------------------------------------------------------------------
# End to end

def test_the_teacher_and_its_encoder_train_together_and_export(run):
  wd, _, _ = run
  rows = read_jsonl(wd / "teacher" / "metrics.jsonl")
  assert [r["step"] for r in rows] == [50, 100, 150]
  assert rows[-1]["loss"] < 0.8 * rows[0]["loss"], rows
  assert (wd / "teacher" / "final" / "arch.json").exists()
  assert json.loads((wd / "teacher" / "text_encoder" / "config.json").read_text())["model_type"] == "t5"
  import simjax  # pylint: disable=import-outside-toplevel
  teacher = simjax.load_teacher(str(wd / "teacher" / "final"))
  assert teacher.null_cond is not None and teacher.null_cond["emb"].shape == (48, 64)


def test_the_encoder_learns_to_name_the_captions_digit(run):
  """teacher_train.caption_digit_weight (on in configs/digits_t2i.py): the digit head's cross-entropy starts near
  chance (ln 10) and falls, its accuracy rises well above chance (0.1), and the head is not exported."""
  wd, _, _ = run
  rows = read_jsonl(wd / "teacher" / "metrics.jsonl")
  assert rows[0]["caption_digit_loss"] > 1.5 and rows[-1]["caption_digit_loss"] < 0.5 * rows[0]["caption_digit_loss"]
  assert rows[-1]["caption_digit_accuracy"] > 0.5, rows
  exported = " ".join(str(p) for p in (wd / "teacher").rglob("*") if "checkpoints" not in p.parts)
  assert "caption_digit_head" not in exported


def test_without_the_digit_weight_the_teacher_trains_no_head():
  """Weight 0 (configs/common.py's default) is the teacher as before the key: no head, the same initial networks."""
  from simjax import config_files  # pylint: disable=import-outside-toplevel
  from simjax.pipelines import text_teacher  # pylint: disable=import-outside-toplevel
  config = config_files.load(REPO / "configs" / "digits_t2i.py").get_config()
  with_head = jax.eval_shape(lambda: text_teacher.init_networks(config, jax.random.key(0)))
  config.teacher_train.caption_digit_weight = 0.0
  plain = text_teacher.init_networks(config, jax.random.key(0))
  assert set(with_head) == {"denoiser", "encoder", "caption_digit_head"} and set(plain) == {"denoiser", "encoder"}
  config.teacher_train.caption_digit_weight = 0.1
  again = text_teacher.init_networks(config, jax.random.key(0))
  for name in plain:
    jax.tree.map(np.testing.assert_array_equal, plain[name], again[name])


def test_the_prompts_are_encoded_once_into_the_cache(run):
  wd, _, proc = run
  manifest = json.loads((wd / "embeddings" / "cache.json").read_text())
  from simjax.data.digits import load_digits_splits  # pylint: disable=import-outside-toplevel
  num_train = len(load_digits_splits(0.2, 0)[0].labels)
  # Two captions per training image (--config.captions.per_image=2), T5's width, the configured length.
  assert manifest["num_prompts"] == 2 * num_train and manifest["text_dim"] == 64 and manifest["max_length"] == 48
  assert len(list((wd / "embeddings").glob("shard-*.npz"))) == manifest["num_shards"] == -(-2 * num_train // 512)
  assert "[embed]" in proc.stdout


def test_sim_from_prompts_runs_and_evaluates_on_held_out_phrasings(run):
  wd, final, _ = run
  assert set(final) >= {"generator", "teacher", "reference", "guidance_sweep"}
  g, t, r = final["generator"], final["teacher"], final["reference"]
  assert g["nfe"] == 1 and t["nfe"] > 1 and r["nfe"] == 0 and g["step"] == SIM_STEPS
  for row in (g, t, r):
    assert 0 <= row["caption_accuracy"] <= 1 and np.isfinite(row["frechet_distance"])
    assert 0 <= row["attribute_accuracy"] <= 1 and row["thickness_captions"] > 0
  # Real held-out digits under their own captions: the classifier reads them right, whichever way the caption
  # writes the digit and in every held-out phrasing.
  assert r["caption_accuracy"] > 0.85, r
  assert r["caption_accuracy_words"] > 0.85 and r["caption_accuracy_numerals"] > 0.85, r
  from simjax.data import digit_captions  # pylint: disable=import-outside-toplevel
  for row in (g, t, r):
    assert set(row["caption_accuracy_by_phrasing"]) == set(digit_captions.EVAL_TEMPLATES), row
  assert min(r["caption_accuracy_by_phrasing"].values()) > 0.8, r
  rows = [row for row in read_jsonl(wd / "metrics.jsonl") if "gen_loss" in row]
  assert [row["step"] for row in rows] == list(range(10, SIM_STEPS + 1, 10))
  assert all(row["step_ok"] == 1 and np.isfinite(row["gen_loss"]) for row in rows), rows
  with np.load(wd / "samples" / "generator.npz") as f:
    assert f["x"].shape == (len(f["prompts"]), 8, 8, 1) and all(len(p) for p in f["prompts"])
  assert (wd / "samples" / "generator_captioned.png").exists() and (wd / "samples" / "grid_step0000020.png").exists()


def test_the_exported_generator_samples_from_prompts(run):
  import simjax  # pylint: disable=import-outside-toplevel
  wd, _, _ = run
  gen = simjax.load_generator(str(wd))
  x = gen.sample(3, seed=0, prompts=["a 7", "the digit three", "a 7"])
  assert x.shape == (3, 8, 8, 1) and np.all(np.abs(x) <= 1)
  # The same seed and prompt give the same image; another prompt another one.
  again = gen.sample(3, seed=0, prompts=["a 7", "the digit three", "a 7"])
  np.testing.assert_array_equal(x, again)
  assert np.abs(x[0] - x[1]).max() > 1e-3


def test_sampling_from_a_prompt_file(run, tmp_path):
  wd, _, _ = run
  prompts = tmp_path / "prompts.txt"
  prompts.write_text("a 4\n\nthe number nine\n")
  for source in ("generator", "teacher"):
    main(wd, f"--config.num_steps={SIM_STEPS}", "--mode=sample", f"--config.sample.prompts={prompts}",
         f"--config.sample.source={source}", "--config.sample.per_prompt=2")
    with np.load(wd / "samples" / f"sample_{source}.npz") as f:
      assert list(f["prompts"]) == ["a 4", "a 4", "the number nine", "the number nine"]
      assert f["x"].shape == (4, 8, 8, 1)
    assert len(list((wd / "samples" / f"prompts_{source}").glob("*.png"))) == 4
    assert (wd / "samples" / f"sample_{source}.png").exists()


def test_a_continued_run_does_not_redo_the_teacher_or_the_embeddings(run):
  wd, _, _ = run
  proc = main(wd, f"--config.num_steps={SIM_STEPS + 10}", "--mode=train")
  assert "[teacher]" not in proc.stdout and "[embed]" not in proc.stdout, proc.stdout[-2000:]
  rows = [row["step"] for row in read_jsonl(wd / "metrics.jsonl") if "gen_loss" in row]
  assert rows == list(range(10, SIM_STEPS + 11, 10))


BAD_INPUTS = [("--mode=sample", "sample.prompts"), ("--config.text.prompts=/nonexistent/prompts.txt", "text.prompts"),
              ("--config.teacher.null=zeros", "teacher.null"), ("--config.eval.features=inception", "eval.features"),
              ("--config.captions.distractors=1.5", "captions.distractors"),
              ("--config.captions.word_fraction=-0.1", "captions.word_fraction"),
              ("--config.teacher_train.caption_digit_weight=-1", "teacher_train.caption_digit_weight")]


def test_bad_text_to_image_input_exits_2_before_writing(tmp_path):
  """Each refused in one line naming the setting, the workdir untouched (the cases run concurrently)."""
  procs = []
  for i, (flag, message) in enumerate(BAD_INPUTS):
    cmd = [sys.executable, "-m", "simjax.main", "--config=configs/digits_t2i.py", f"--workdir={tmp_path / str(i)}", flag]
    procs.append((subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True), message, i))
  for proc, message, i in procs:
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 2, err[-2000:]
    lines = [l for l in err.splitlines() if l.startswith("simjax: error:")]
    assert len(lines) == 1 and message in lines[0], err[-2000:]
    assert not (tmp_path / str(i)).exists() or not any((tmp_path / str(i)).iterdir())

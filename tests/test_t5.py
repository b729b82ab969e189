"""The Flax T5 encoder against transformers' PyTorch T5EncoderModel built with random weights (float32,
tiny configurations), the checkpoint formats `load_text_encoder` reads, and the tokenizers against
sentencepiece and transformers' own."""
import dataclasses
import io
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="parity against transformers needs torch (pip install -e '.[test]')")
transformers = pytest.importorskip("transformers",
                                   reason="parity against transformers needs transformers (pip install -e '.[test]')")

import simjax  # pylint: disable=wrong-import-position
from simjax import weight_files  # pylint: disable=wrong-import-position
from simjax.networks import t5  # pylint: disable=wrong-import-position
from simjax.text import t5_checkpoints as tc, tokenizers  # pylint: disable=wrong-import-position

TOL = 1e-4
VOCAB, LENGTH = 64, 40  # LENGTH > relative_attention_max_distance: the log buckets and the last one are used
TINY = dict(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=48, num_layers=3, num_heads=4, relative_attention_num_buckets=8,
            relative_attention_max_distance=12)
KEPT = (LENGTH, 25, 9, 1)  # tokens per row: unpadded, padded differently, down to a single token


def _randomize(model, seed=0):
  """Every parameter random: norm scales 1 + N(0, 0.1^2), embeddings and position biases N(0, 1), linear
  weights N(0, 1/fan_in), so attention logits and outputs are O(1) and no term is negligible."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      noise = torch.randn(p.shape, generator=gen)
      if "layer_norm" in name:
        p.copy_(1.0 + 0.1 * noise)
      elif "shared" in name or "embed_tokens" in name or "relative_attention_bias" in name:
        p.copy_(noise)
      else:
        p.copy_(noise / p.shape[1] ** 0.5)
  return model.eval()


def _torch_encoder(feed_forward_proj="gated-gelu", seed=0):
  config = transformers.T5Config(**TINY, feed_forward_proj=feed_forward_proj)
  return _randomize(transformers.T5EncoderModel(config), seed)


def _inputs(seed=1):
  ids = np.random.RandomState(seed).randint(0, VOCAB, (len(KEPT), LENGTH)).astype(np.int32)
  mask = np.zeros(ids.shape, np.float32)
  for i, kept in enumerate(KEPT):
    mask[i, :kept] = 1
  ids[mask == 0] = tokenizers.PAD_ID
  return ids, mask


def _reference(model, ids, mask):
  with torch.no_grad():
    out = model(input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask))
  return out.last_hidden_state.numpy()


def _state(model):
  return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}  # not torch's memory


def _flax(model, **kwargs):
  arch = tc.arch_from_config(model.config.to_dict())
  return t5.T5Encoder(**arch, **kwargs), tc.convert_state_dict(arch, _state(model))


def _max_err(a, b):
  return float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max())


@pytest.mark.parametrize("num_buckets,max_distance", [(32, 128), (8, 12), (6, 7)])
def test_relative_position_buckets_match_transformers(num_buckets, max_distance):
  from transformers.models.t5.modeling_t5 import T5Attention  # pylint: disable=import-outside-toplevel
  length = 300  # offsets -299..299: exact, log-spaced and saturated buckets in both directions
  positions = torch.arange(length)
  expected = T5Attention._relative_position_bucket(  # pylint: disable=protected-access
      positions[None, :] - positions[:, None], bidirectional=True, num_buckets=num_buckets,
      max_distance=max_distance).numpy()
  got = t5.relative_position_buckets(length, num_buckets, max_distance)
  assert got.shape == (length, length) and got.dtype == np.int32
  np.testing.assert_array_equal(got, expected)
  # Every bucket is reached but one: offset 0 falls in the backward half, so the forward half's first is unused.
  np.testing.assert_array_equal(np.unique(got), np.delete(np.arange(num_buckets), num_buckets // 2))


@pytest.mark.parametrize("feed_forward_proj", ["gated-gelu", "relu"])
def test_encoder_matches_transformers(feed_forward_proj):
  model = _torch_encoder(feed_forward_proj)
  ids, mask = _inputs()
  expected = _reference(model, ids, mask)
  module, variables = _flax(model)
  got = module.apply(variables, ids, mask)
  assert got.shape == (len(KEPT), LENGTH, TINY["d_model"]) and got.dtype == jnp.float32
  assert 0.3 < np.abs(expected).std() < 3  # O(1) outputs: the tolerance means something
  err = _max_err(got, expected)
  print(f"{feed_forward_proj}: max abs error {err:.2e}")
  assert err <= TOL
  if feed_forward_proj == "gated-gelu":  # an explicit precision reaches the attention matmuls too
    highest = t5.T5Encoder(**tc.arch_from_config(model.config.to_dict()), precision=jax.lax.Precision.HIGHEST)
    err = _max_err(highest.apply(variables, ids, mask), expected)
    print(f"{feed_forward_proj}, precision=HIGHEST: max abs error {err:.2e}")
    assert err <= TOL
    with pytest.raises(ValueError, match="per-operand pair"):
      t5.T5Encoder(**tc.arch_from_config(model.config.to_dict()), precision=("highest", "highest")).apply(
          variables, ids, mask)
  # Padding matters (it removes keys): the padded rows differ from their unpadded encoding.
  unpadded = module.apply(variables, ids, np.ones_like(mask))
  assert _max_err(unpadded[1, :KEPT[1]], got[1, :KEPT[1]]) > 0.05


def test_position_bias_matters():
  """Zeroing the bucket table changes the output by O(1), and parity holds with it zeroed too (the table
  is the only source of positions, read by every block)."""
  model = _torch_encoder()
  ids, mask = _inputs()
  module, variables = _flax(model)
  with_bias = module.apply(variables, ids, mask)
  params = jax.tree.map(lambda x: x, variables["params"])
  table = params["encoder"]["block_0"]["layer_0"]["SelfAttention"]["relative_attention_bias"]
  table["embedding"] = np.zeros_like(table["embedding"])
  without_bias = module.apply({"params": params}, ids, mask)
  assert _max_err(with_bias, without_bias) > 0.3
  with torch.no_grad():
    model.encoder.block[0].layer[0].SelfAttention.relative_attention_bias.weight.zero_()
  err = _max_err(without_bias, _reference(model, ids, mask))
  print(f"zero position bias: max abs error {err:.2e}")
  assert err <= TOL
  # Without positions the encoder is permutation-equivariant; with them it is not.
  perm = np.random.RandomState(0).permutation(LENGTH)
  full = np.ones((1, LENGTH), np.float32)
  no_pos = module.apply({"params": params}, ids[:1], full), module.apply({"params": params}, ids[:1, perm], full)
  assert _max_err(no_pos[0][:, perm], no_pos[1]) < 1e-5
  pos = module.apply(variables, ids[:1], full), module.apply(variables, ids[:1, perm], full)
  assert _max_err(pos[0][:, perm], pos[1]) > 0.1


def test_load_text_encoder_from_folder_and_pipeline(tmp_path):
  model = _torch_encoder(seed=3)
  ids, mask = _inputs()
  expected = _reference(model, ids, mask)
  folder = tmp_path / "t5"
  model.save_pretrained(folder)
  assert (folder / "model.safetensors").is_file()
  pipeline = tmp_path / "pipeline"
  shutil.copytree(folder, pipeline / "text_encoder")
  (pipeline / "model_index.json").write_text(json.dumps({"_class_name": "PixArtAlphaPipeline"}))
  outputs = {}
  for name, path in (("folder", folder), ("pipeline", pipeline)):
    encoder = simjax.load_text_encoder(path)  # the public entry point (simjax.text.t5_checkpoints)
    assert encoder.arch == tc.arch_from_config(model.config.to_dict())
    outputs[name] = np.asarray(encoder.encode(ids, mask))
    err = _max_err(outputs[name], expected)
    print(f"load_text_encoder({name}): max abs error {err:.2e}")
    assert err <= TOL
  np.testing.assert_array_equal(outputs["folder"], outputs["pipeline"])
  with pytest.raises(dataclasses.FrozenInstanceError):
    encoder.params = None
  with pytest.raises(ValueError, match=r"vocabulary is \[0, 64\)"):
    encoder.encode(np.full_like(ids, VOCAB), mask)


def test_load_sharded_bin_bfloat16_and_full_t5(tmp_path):
  """Sharded safetensors, a torch .bin, a bfloat16 file, and a full T5 (decoder and lm_head ignored)."""
  model = _torch_encoder(seed=4)
  ids, mask = _inputs()
  expected = _reference(model, ids, mask)

  sharded = tmp_path / "sharded"
  model.save_pretrained(sharded, max_shard_size="20KB")
  assert (sharded / "model.safetensors.index.json").is_file() and len(list(sharded.glob("*.safetensors"))) > 1
  binary = tmp_path / "bin"
  binary.mkdir()
  (binary / "config.json").write_text((sharded / "config.json").read_text())
  torch.save(model.state_dict(), binary / "pytorch_model.bin")  # both tied embedding names, one storage
  for name, path in (("sharded", sharded), ("bin", binary)):
    err = _max_err(tc.load_text_encoder(path).encode(ids, mask), expected)
    print(f"load_text_encoder({name}): max abs error {err:.2e}")
    assert err <= TOL

  bf16 = tmp_path / "bf16"
  model.to(torch.bfloat16).save_pretrained(bf16)
  model.float()
  arch, variables = tc.read_text_encoder_checkpoint(bf16)
  wq = variables["params"]["encoder"]["block_1"]["layer_0"]["SelfAttention"]["q"]["kernel"]
  rounded = model.encoder.block[1].layer[0].SelfAttention.q.weight.detach().to(torch.bfloat16).float().numpy().T
  assert wq.dtype == np.float32 and arch["d_model"] == TINY["d_model"]
  np.testing.assert_array_equal(wq, rounded)

  full_config = transformers.T5Config(**TINY, feed_forward_proj="gated-gelu")
  full = _randomize(transformers.T5ForConditionalGeneration(full_config), seed=5)
  full.save_pretrained(tmp_path / "full")
  with torch.no_grad():
    full_expected = full.encoder(input_ids=torch.tensor(ids, dtype=torch.long),
                                 attention_mask=torch.tensor(mask)).last_hidden_state.numpy()
  state = weight_files.read_weight_file(tmp_path / "full" / "model.safetensors")
  assert any(k.startswith("decoder.") for k in state)
  loaded = tc.load_text_encoder(tmp_path / "full")
  err = _max_err(loaded.encode(ids, mask), full_expected)
  print(f"load_text_encoder(full T5): max abs error {err:.2e}")
  assert err <= TOL
  # transformers 5 ties lm_head (so does not save it); files from untied v1.1 checkpoints hold one.
  with_head = tc.convert_state_dict(loaded.arch, {**state, "lm_head.weight": state["shared.weight"] * 2})
  jax.tree.map(np.testing.assert_array_equal, with_head["params"], jax.device_get(loaded.params["params"]))


def test_bad_checkpoints_name_the_tensor(tmp_path):
  model = _torch_encoder()
  arch = tc.arch_from_config(model.config.to_dict())
  good = _state(model)
  name = "encoder.block.1.layer.0.SelfAttention.k.weight"

  removed = {k: v for k, v in good.items() if k != name}
  with pytest.raises(tc.CheckpointMismatch, match=rf"missing \['{name}'\]"):
    tc.convert_state_dict(arch, removed)
  renamed = {("encoder.block.1.layer.0.SelfAttention.key.weight" if k == name else k): v for k, v in good.items()}
  with pytest.raises(tc.CheckpointMismatch, match=r"SelfAttention\.key\.weight") as info:
    tc.convert_state_dict(arch, renamed)
  assert name in str(info.value)
  misshapen = {**good, name: good[name][:, :-1]}
  with pytest.raises(tc.CheckpointMismatch, match=rf"{name} \(32, 31\) != \(32, 32\)"):
    tc.convert_state_dict(arch, misshapen)
  with pytest.raises(tc.CheckpointMismatch, match=r"relative_attention_bias"):  # UMT5-style per-layer tables
    tc.convert_state_dict(arch, {**good, "encoder.block.2.layer.0.SelfAttention.relative_attention_bias.weight":
                                 good["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"]})
  untied = {**good, "encoder.embed_tokens.weight": good["shared.weight"] + 1}
  with pytest.raises(tc.CheckpointMismatch, match="encoder.embed_tokens.weight and shared.weight differ"):
    tc.convert_state_dict(arch, untied)
  only_embed = {("encoder.embed_tokens.weight" if k == "shared.weight" else k): v for k, v in good.items()
                if k != "encoder.embed_tokens.weight"}
  np.testing.assert_array_equal(tc.convert_state_dict(arch, only_embed)["params"]["shared"]["embedding"],
                                good["shared.weight"])

  # Through the loader: the file's tensor is named.
  from safetensors.numpy import save_file  # pylint: disable=import-outside-toplevel
  folder = tmp_path / "broken"
  model.save_pretrained(folder)
  save_file({k: np.ascontiguousarray(v) for k, v in removed.items()}, str(folder / "model.safetensors"))
  with pytest.raises(tc.CheckpointMismatch, match=name):
    tc.load_text_encoder(folder)

  config = model.config.to_dict()
  with pytest.raises(ValueError, match="is_decoder=true"):
    tc.arch_from_config({**config, "is_decoder": True})
  with pytest.raises(ValueError, match="feed_forward_proj='gated-silu' is not supported"):
    tc.arch_from_config({**config, "feed_forward_proj": "gated-silu"})
  with pytest.raises(ValueError, match="model_type='umt5'"):
    tc.arch_from_config({**config, "model_type": "umt5"})
  with pytest.raises(FileNotFoundError, match="text_encoder/"):
    tc.load_text_encoder(tmp_path)


def test_bfloat16_compute_is_close():
  model = _torch_encoder()
  ids, mask = _inputs()
  expected = _reference(model, ids, mask)
  module, variables = _flax(model, dtype=jnp.bfloat16)
  got = np.asarray(module.apply(variables, ids, mask))
  err = _max_err(got, expected)
  print(f"bfloat16 compute: max abs error {err:.2e} (outputs' std {expected.std():.2f})")
  assert got.dtype == np.float32 and np.isfinite(got).all()
  assert 1e-4 < err < 0.15  # bfloat16 did run (not float32), and stays close
  with pytest.raises(ValueError, match="float16"):
    t5.T5Encoder(**tc.arch_from_config(model.config.to_dict()), dtype=jnp.float16).apply(variables, ids, mask)


# ----------------------------------------------------------------------------------------------
# Tokenizers.

CAPTIONS = ["a photo of a cat sitting on a red sofa", "an astronaut riding a horse on the moon",
            "a watercolor painting of a lighthouse at dawn", "two dogs playing in the snow",
            "the quick brown fox jumps over the lazy dog", "café crème brûlée, naïve résumé"]


def test_byte_tokenizer():
  tok = tokenizers.ByteTokenizer()
  assert tok.vocab_size == 259
  texts = ["héllo wörld ☃", "", "a" * 20]
  ids, mask = tok(texts, max_length=18)
  assert ids.shape == mask.shape == (3, 18) and ids.dtype == np.int32 and mask.dtype == np.float32
  # Round trip; the first text fits (17 bytes + EOS).
  assert len("héllo wörld ☃".encode()) == 17 and tok.decode(ids[0]) == "héllo wörld ☃"
  np.testing.assert_array_equal(ids[0], [b + 3 for b in "héllo wörld ☃".encode()] + [tokenizers.EOS_ID])
  # The empty text is EOS then padding.
  np.testing.assert_array_equal(ids[1], [tokenizers.EOS_ID] + [tokenizers.PAD_ID] * 17)
  np.testing.assert_array_equal(mask[1], [1] + [0] * 17)
  # Truncated: 17 bytes kept, EOS last, mask all ones.
  assert ids[2, -1] == tokenizers.EOS_ID and (ids[2, :-1] == ord("a") + 3).all() and mask[2].all()
  np.testing.assert_array_equal(mask.sum(1), [18, 1, 18])
  # A cut inside a multi-byte character decodes to the whole characters before it.
  assert tok.decode(tok(["ö☃"], max_length=4)[0][0]) == "ö"
  # transformers' ByT5 tokenizer agrees (padding='max_length', truncation=True).
  reference = transformers.ByT5Tokenizer()(texts, padding="max_length", max_length=18, truncation=True)
  np.testing.assert_array_equal(ids, reference["input_ids"])
  np.testing.assert_array_equal(mask, reference["attention_mask"])
  with pytest.raises(ValueError, match="list of texts"):
    tok("a caption", max_length=8)
  with pytest.raises(ValueError, match="max_length=0"):
    tok(["a"], max_length=0)


@pytest.fixture(name="spiece")
def _spiece(tmp_path):
  """A tiny T5-style sentencepiece model (pad 0, eos 1, unk 2, no bos) trained on CAPTIONS."""
  sentencepiece = pytest.importorskip("sentencepiece", reason="SentencePieceTokenizer needs sentencepiece")
  model = io.BytesIO()
  sentencepiece.SentencePieceTrainer.train(
      sentence_iterator=iter(CAPTIONS * 20), model_writer=model, vocab_size=80, model_type="unigram", pad_id=0,
      eos_id=1, unk_id=2, bos_id=-1, character_coverage=1.0, hard_vocab_limit=False, minloglevel=2)
  folder = tmp_path / "pipeline" / "tokenizer"
  folder.mkdir(parents=True)
  (folder / "spiece.model").write_bytes(model.getvalue())
  return folder / "spiece.model"


def test_sentencepiece_tokenizer(spiece):
  import sentencepiece  # pylint: disable=import-outside-toplevel
  processor = sentencepiece.SentencePieceProcessor(model_file=str(spiece))
  tok = tokenizers.SentencePieceTokenizer(spiece)
  assert tok.vocab_size == processor.get_piece_size()
  texts = ["a photo of a cat", "  two   dogs  in the snow ", "", "naïve café at dawn!", "xyz QQQ unknown ☃",
           CAPTIONS[0] + " " + CAPTIONS[1]]
  max_length = 12
  ids, mask = tok(texts, max_length=max_length)
  assert ids.shape == mask.shape == (len(texts), max_length) and ids.dtype == np.int32
  for row, text in enumerate(texts):
    pieces = processor.encode(text, out_type=int)
    expected = (pieces[: max_length - 1] + [tokenizers.EOS_ID])
    np.testing.assert_array_equal(ids[row, : len(expected)], expected)
    assert (ids[row, len(expected):] == tokenizers.PAD_ID).all() and mask[row].sum() == len(expected)
  assert len(processor.encode(texts[-1])) > max_length and ids[-1, -1] == tokenizers.EOS_ID  # truncated
  assert tok.decode(ids[0]) == "a photo of a cat"
  # transformers' T5 tokenizer, converted from the same file, agrees.
  reference = transformers.T5Tokenizer.from_pretrained(str(spiece.parent))(
      texts, padding="max_length", max_length=max_length, truncation=True)
  np.testing.assert_array_equal(ids, reference["input_ids"])
  np.testing.assert_array_equal(mask, reference["attention_mask"])


def test_load_tokenizer(spiece, tmp_path):
  assert isinstance(simjax.load_tokenizer("byte"), tokenizers.ByteTokenizer)
  for path in (spiece, spiece.parent, spiece.parent.parent, str(spiece)):
    tok = tokenizers.load_tokenizer(path)
    assert isinstance(tok, tokenizers.SentencePieceTokenizer) and tok.path == spiece
  (tmp_path / "tokenizer.json").write_text("{}")
  for bad in (tmp_path, tmp_path / "tokenizer.json", tmp_path / "missing.model"):
    with pytest.raises(ValueError, match="not a tokenizer: expected 'byte'"):
      tokenizers.load_tokenizer(bad)

"""The embedded text-to-image default: SIM distils a small PixArt-family teacher of scikit-learn's digits,
conditioned on captions through a small T5, into a one-step text-to-image generator. No download.

  python -m simjax.main --config=configs/digits_t2i.py --workdir=workdirs/digits_t2i

Stages (each resumes from the workdir): captions generated from the data (the digit as a word or numeral,
synonyms, stroke thickness and slant measured on each image; some phrasings held out for evaluation);
a byte-level tokenizer and a T5 encoder trained jointly with the transformer (epsilon loss, 10% captions
dropped to the null caption), then frozen; the training captions encoded once into embeddings/; SIM from
those prompts only, with the teacher guided; evaluation on held-out phrasings of held-out images:
Frechet distance in the digit classifier's features, caption and attribute accuracy, guidance sweep.
"""
from simjax import config_files

common = config_files.sibling(__file__, "common")


def get_config(arg=None):
  del arg
  c = common.text_to_image_config()
  c.data.name = "digits"
  c.data.shape = (8, 8, 1)

  # Half the training captions get made-up words: held-out phrasings then scored 0.796 (teacher and generator)
  # and the teacher's FD 6.4, against 0.774 and 16.2 without (README, "Measured on the digits").
  c.captions.distractors = 0.5

  c.text.tokenizer = "byte"
  c.text.encoder = "train"
  c.text.max_length = 48
  c.text.shard_size = 2048
  c.text.cache_dtype = "float32"

  c.teacher.kind = "train"
  c.teacher.arch.update(dict(patch_size=2, num_heads=4, head_dim=16, depth=4))
  # Measured with the digit head on (README): guidance 1.25 gave the generator FD 2.85 / caption accuracy 0.956
  # (teacher 2.29 / 0.951); 1.5 gave 6.81 / 0.967 (teacher 3.89 / 0.960); 2 gave 21.80 / 0.972 (teacher 9.44).
  c.teacher.guidance = 1.25
  c.teacher.null = "checkpoint"
  tt = c.teacher_train
  # The encoder also learns to name the caption's digit (a linear head on its pooled output): without it the
  # teacher read digits written as words 0.58 of the time on held-out phrasings (numerals 1.00).
  tt.caption_digit_weight = 0.1
  tt.num_steps = 6000
  tt.optim.lr = 2e-3
  tt.batch_size = 128
  tt.log_every = 200
  tt.checkpoint_every = 1000

  c.batch_size = 64
  c.num_steps = 2000
  c.optim.generator.lr = 5e-5
  c.optim.fake.lr = 2e-4
  c.ema_half_life_images = 10_000.0
  c.log_every = 100
  c.checkpoint_every = 500
  c.grid_every = 500
  c.grid_size = 5

  c.eval.features = "digit_classifier"
  c.eval.samples_per_prompt = 4
  c.eval.batch_size = 360
  c.eval.teacher_steps = 18
  c.eval.guidance_sweep = (1.0, 1.25, 1.5, 2.0)
  return c

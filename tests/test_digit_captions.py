"""The digits' generated captions: attributes measured on the image, per-digit bands, held-out phrasings."""
import numpy as np
import pytest

from simjax.data import digit_captions as dc
from simjax.data.digits import load_digits_splits


def _line(points, width=1):
  img = -np.ones((8, 8), np.float32)
  for r, c in points:
    for dw in range(width):
      img[r, min(7, c + dw)] = 1.0
  return img


def test_ink_is_larger_for_thicker_strokes_and_slant_has_the_documented_sign():
  vertical = [(r, 3) for r in range(1, 7)]
  thin, thick = _line(vertical, 1), _line(vertical, 3)
  ink = dc.measure(np.stack([thin, thick]))["ink"]
  assert ink[1] > 2.5 * ink[0]
  # Bottom-left to top-right: columns grow going up, the top leans right -> positive slant.
  right = _line([(7 - i, i) for i in range(8)])
  left = _line([(i, i) for i in range(8)])
  upright = _line(vertical)
  slant = dc.measure(np.stack([right, left, upright])[..., None])["slant"]
  assert slant[0] > 0.9 and slant[1] < -0.9 and abs(slant[2]) < 1e-9, slant


@pytest.fixture(scope="module")
def digits():
  train, held = load_digits_splits(0.2, 0)
  return train, held, dc.AttributeThresholds.fit(train.x, train.labels)


def test_attribute_bands_split_each_digit_and_the_slant_as_fitted(digits):
  train, _, th = digits
  thickness, slant = th.label(train.x, train.labels)
  for d in range(10):
    t = thickness[train.labels == d]
    frac = [np.mean(t == v) for v in ("thin", "", "thick")]
    assert abs(frac[0] - 0.3) < 0.05 and abs(frac[2] - 0.3) < 0.05, (d, frac)
  frac = [np.mean(slant == v) for v in ("left", "", "right")]
  assert abs(frac[0] - 0.25) < 0.03 and abs(frac[2] - 0.25) < 0.03, frac
  # Per-digit bands: a 1 has less ink than an 8, so one global threshold would call most 1s thin.
  assert th.thin_below[1] < th.thin_below[8]
  assert dc.AttributeThresholds.from_dict(th.to_dict()) == th


def test_captions_name_the_true_digit_and_only_measured_attributes(digits):
  train, _, th = digits
  thickness, slant = th.label(train.x, train.labels)
  caps = dc.make_captions(train.labels, thickness, slant, split="train", per_image=3, seed=0)
  assert len(caps) == len(train.labels) and all(len(c) == 3 for c in caps)
  used = set()
  for label, t, s, image_caps in zip(train.labels, thickness, slant, caps):
    for c in image_caps:
      assert dc.parse_digit(c.text) == label == c.digit, c
      assert c.thickness in ("", t) and c.slant in ("", s), (c, t, s)
      assert (c.thickness != "") == dc.TRAIN_TEMPLATES[c.phrasing][1]
      used.add(c.phrasing)
  assert used == set(dc.train_phrasings())
  # Both digit forms appear.
  texts = [c.text for image_caps in caps for c in image_caps]
  assert any(w in t for t in texts for w in dc.WORDS) and any(any(ch.isdigit() for ch in t) for t in texts)


def test_held_out_phrasings_and_synonyms_never_appear_in_training_captions(digits):
  train, held, th = digits
  assert not set(dc.train_phrasings()) & set(dc.eval_phrasings())
  t_tr, s_tr = th.label(train.x, train.labels)
  t_ev, s_ev = th.label(held.x, held.labels)
  train_caps = [c for cs in dc.make_captions(train.labels, t_tr, s_tr, split="train", per_image=8, seed=0) for c in cs]
  eval_caps = [c for cs in dc.make_captions(held.labels, t_ev, s_ev, split="eval", per_image=2, seed=0) for c in cs]
  assert {c.phrasing for c in eval_caps} == set(dc.eval_phrasings())
  train_texts = {c.text for c in train_caps}
  held_words = dc.eval_only_words()
  assert not any(w in t for t in train_texts for w in held_words)
  assert any(w in c.text for c in eval_caps for w in held_words)
  # Held-out phrasings give texts training never shows.
  assert len({c.text for c in eval_caps} - train_texts) > 0.9 * len({c.text for c in eval_caps})


def test_captions_are_deterministic_in_the_seed(digits):
  train, _, th = digits
  t, s = th.label(train.x, train.labels)
  a = dc.make_captions(train.labels[:200], t[:200], s[:200], split="train", per_image=2, seed=0)
  b = dc.make_captions(train.labels[:200], t[:200], s[:200], split="train", per_image=2, seed=0)
  c = dc.make_captions(train.labels[:200], t[:200], s[:200], split="train", per_image=2, seed=1)
  assert a == b and a != c


def test_articles_and_parsing():
  assert dc._fix_articles("a 8 and a eight and a one") == "an 8 and an eight and a one"  # pylint: disable=protected-access
  assert dc.parse_digit("a thick seven leaning left") == 7 and dc.parse_digit("the number 4") == 4
  assert dc.parse_digit("a picture") is None and dc.parse_digit("3 or four") is None


def test_word_fraction_sets_how_often_training_captions_spell_the_digit_out(digits):
  train, held, th = digits
  t, s = th.label(train.x, train.labels)
  default = dc.make_captions(train.labels, t, s, split="train", per_image=4, seed=0)
  assert default == dc.make_captions(train.labels, t, s, split="train", per_image=4, seed=0, word_fraction=0.5)
  for fraction in (0.0, 0.8, 1.0):
    caps = [c for per in dc.make_captions(train.labels, t, s, split="train", per_image=4, seed=0,
                                         word_fraction=fraction) for c in per]
    words = np.mean([dc.names_as_word(c) for c in caps])
    assert abs(words - fraction) < 0.03, (fraction, words)
    assert all(dc.parse_digit(c.text) == c.digit for c in caps)
  # Evaluation captions stay half and half whatever the training fraction.
  te, se = th.label(held.x, held.labels)
  assert dc.make_captions(held.labels, te, se, split="eval", per_image=1, seed=0, word_fraction=1.0) == \
      dc.make_captions(held.labels, te, se, split="eval", per_image=1, seed=0)


def test_distractors_add_made_up_words_that_name_no_digit_or_attribute(digits):
  train, held, th = digits
  t, s = th.label(train.x, train.labels)
  plain = dc.make_captions(train.labels, t, s, split="train", per_image=4, seed=0)
  noisy = dc.make_captions(train.labels, t, s, split="train", per_image=4, seed=0, distractors=0.5)
  assert plain == dc.make_captions(train.labels, t, s, split="train", per_image=4, seed=0, distractors=0.0)
  known = {w for text, _, _ in dc.TRAIN_TEMPLATES.values() for w in text.split(" ")} | set(dc.WORDS)
  known |= {w for table in (dc.THICKNESS_WORDS, dc.SLANT_WORDS) for pair in table.values() for g in pair
            for phrase in g for w in phrase.split(" ")}
  with_extra = 0
  for label, caps in zip(train.labels, noisy):
    for c in caps:
      assert dc.parse_digit(c.text) == label == c.digit, c
      extra = [w.strip(",:") for w in c.text.split(" ") if w.strip(",:") not in known and not w.strip(",").isdigit()
               and w not in ("an",)]
      assert len(extra) <= 2, c
      for w in extra:  # made up: no digit name, no attribute word (held-out synonyms included) inside it
        assert not any(r in w for r in dc.WORDS + tuple(dc.eval_only_words()) + ("thick", "thin", "bold")), (w, c)
      with_extra += bool(extra)
  frac = with_extra / (4 * len(train.labels))
  assert 0.4 < frac < 0.6, frac
  # Evaluation captions never get distractors.
  te, se = th.label(held.x, held.labels)
  assert dc.make_captions(held.labels, te, se, split="eval", per_image=1, seed=0, distractors=0.5) == \
      dc.make_captions(held.labels, te, se, split="eval", per_image=1, seed=0)

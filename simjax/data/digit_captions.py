"""Captions of scikit-learn's digits for the embedded text-to-image default, generated from the data.

Each caption names the image's digit (a word or a numeral, in one of several phrasings) and, for images
that have them, attributes measured on the image: stroke thickness (thin / thick for that digit: the
ink's mass against the digit's own training quantiles, since a 1 has less ink than an 8) and slant
(left / right: the shear of the ink against the training split's quantiles). The middle bands get no
attribute word. Some templates and some attribute synonyms are used only for evaluation, so the
distilled generator is scored on phrasings neither it nor its teacher saw.

Images are NHWC [N, 8, 8, 1] (or [N, 8, 8]) in [-1, 1], ink +1.
"""
import dataclasses
import re
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

NULL_CAPTION = ""
WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")

# Attribute synonyms: (train, eval-only).
THICKNESS_WORDS = {"thick": (("thick", "bold"), ("heavy",)), "thin": (("thin", "light"), ("fine",))}
SLANT_WORDS = {"left": (("slanted to the left", "leaning left"), ("tilted left",)),
               "right": (("slanted to the right", "leaning right"), ("tilted right",))}

# Template id -> (text, needs thickness, needs slant); {d} digit, {t} thickness word, {s} slant phrase.
TRAIN_TEMPLATES = {
    "digit": ("the digit {d}", False, False),
    "handwritten": ("a handwritten {d}", False, False),
    "number": ("number {d}", False, False),
    "image_of": ("an image of a {d}", False, False),
    "bare": ("{d}", False, False),
    "numeral": ("the numeral {d}", False, False),
    "by_hand": ("a {d} written by hand", False, False),
    "thick_adj": ("a {t} {d}", True, False),
    "thick_strokes": ("a {d} written with {t} strokes", True, False),
    "thick_digit": ("the digit {d}, {t}", True, False),
    "slant": ("a {d} {s}", False, True),
    "slant_digit": ("the digit {d}, {s}", False, True),
    "both": ("a {t} {d} {s}", True, True),
}
EVAL_TEMPLATES = {
    "picture": ("a picture of the number {d}", False, False),
    "drawn": ("a {d} drawn by hand", False, False),
    "strokes_eval": ("a {d} with {t} strokes", True, False),
    "both_eval": ("{s}: a {t} {d}", True, True),
}


def train_phrasings() -> Tuple[str, ...]:
  return tuple(TRAIN_TEMPLATES)


def eval_phrasings() -> Tuple[str, ...]:
  return tuple(EVAL_TEMPLATES)


# ----------------------------------------------------------------------------------------------
# Attributes measured on the image

def measure(x) -> Dict[str, np.ndarray]:
  """{'ink': stroke mass [N] (mean of (x + 1) / 2), 'slant': the ink's shear [N]}.

  slant = -cov_w(col, row) / var_w(row) with ink weights w and rows counted from the top: positive when
  the ink's columns move right going up (the top leans right), negative when it leans left."""
  x = np.asarray(x, np.float64)
  if x.ndim == 4:
    x = x[..., 0]
  w = np.clip((x + 1.0) / 2.0, 0.0, 1.0)
  rows, cols = np.meshgrid(np.arange(x.shape[1]), np.arange(x.shape[2]), indexing="ij")
  mass = np.maximum(w.sum((1, 2)), 1e-9)
  mean_r = (w * rows).sum((1, 2)) / mass
  mean_c = (w * cols).sum((1, 2)) / mass
  dr, dc = rows[None] - mean_r[:, None, None], cols[None] - mean_c[:, None, None]
  cov = (w * dr * dc).sum((1, 2)) / mass
  var = np.maximum((w * dr * dr).sum((1, 2)) / mass, 1e-9)
  return {"ink": w.mean((1, 2)), "slant": -cov / var}


@dataclasses.dataclass(frozen=True)
class AttributeThresholds:
  """Per-digit ink bands (thin below the 30% quantile of that digit's training images, thick above the 70%)
  and global slant bands (left below the 25% quantile, right above the 75%)."""
  thin_below: Tuple[float, ...]
  thick_above: Tuple[float, ...]
  left_below: float
  right_above: float

  @classmethod
  def fit(cls, x, labels) -> "AttributeThresholds":
    m = measure(x)
    labels = np.asarray(labels)
    thin = tuple(float(np.quantile(m["ink"][labels == d], 0.3)) for d in range(10))
    thick = tuple(float(np.quantile(m["ink"][labels == d], 0.7)) for d in range(10))
    return cls(thin, thick, float(np.quantile(m["slant"], 0.25)), float(np.quantile(m["slant"], 0.75)))

  def label(self, x, digits) -> Tuple[np.ndarray, np.ndarray]:
    """(thickness [N] of 'thin' / 'thick' / '', slant [N] of 'left' / 'right' / '') of images x, each read
    against the thickness bands of the digit in `digits` (the true or the captioned one)."""
    m = measure(x)
    digits = np.asarray(digits, np.int64)
    thin, thick = np.asarray(self.thin_below)[digits], np.asarray(self.thick_above)[digits]
    thickness = np.where(m["ink"] < thin, "thin", np.where(m["ink"] > thick, "thick", ""))
    slant = np.where(m["slant"] < self.left_below, "left", np.where(m["slant"] > self.right_above, "right", ""))
    return thickness.astype(object), slant.astype(object)

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d) -> "AttributeThresholds":
    return cls(tuple(float(v) for v in d["thin_below"]), tuple(float(v) for v in d["thick_above"]),
               float(d["left_below"]), float(d["right_above"]))


# ----------------------------------------------------------------------------------------------
# Captions

@dataclasses.dataclass(frozen=True)
class Caption:
  text: str
  digit: int
  thickness: str   # '' when the caption does not name it
  slant: str
  phrasing: str    # the template id


_ARTICLE = re.compile(r"\b([Aa]) (?=(?!one\b)[aeiouAEIOU8])")


def _fix_articles(text: str) -> str:
  """'a 8' -> 'an 8', 'a eight' -> 'an eight' ('a one' stays)."""
  return _ARTICLE.sub(r"\1n ", text)


def make_captions(labels, thickness, slant, *, split: str, per_image: int, seed: int,
                  distractors: float = 0.0, word_fraction: float = 0.5) -> List[List[Caption]]:
  """per_image captions for each image (deterministic in seed): train phrasings for split='train', the
  held-out ones for 'eval'; each names the image's digit (word or numeral at random) and only attributes
  the image has (templates needing an attribute are drawn only for images that have it).

  distractors (train only): the fraction of captions given one or two made-up words at random places, so
  the encoder learns to read the digit past words it has never seen, as the held-out phrasings' are.
  word_fraction (train only): the chance a caption spells its digit out rather than writing the numeral;
  evaluation captions always draw half and half."""
  if split not in ("train", "eval"):
    raise ValueError(f"split={split!r}; use 'train' or 'eval'.")
  templates = TRAIN_TEMPLATES if split == "train" else EVAL_TEMPLATES
  rng = np.random.default_rng([int(seed), 0 if split == "train" else 1])
  names = list(templates)
  out = []
  for digit, thick, sl in zip(np.asarray(labels), thickness, slant):
    usable = [n for n in names if (thick or not templates[n][1]) and (sl or not templates[n][2])]
    caps = []
    for _ in range(int(per_image)):
      name = usable[rng.integers(len(usable))]
      text, needs_t, needs_s = templates[name]
      d = WORDS[digit] if rng.random() < (word_fraction if split == "train" else 0.5) else str(int(digit))
      t = _pick(rng, THICKNESS_WORDS, thick, split) if needs_t else ""
      s = _pick(rng, SLANT_WORDS, sl, split) if needs_s else ""
      words = text.format(d=d, t=t, s=s).split(" ")
      if split == "train" and distractors > 0 and rng.random() < distractors:
        for _ in range(1 + int(rng.random() < 0.5)):
          words.insert(int(rng.integers(len(words) + 1)), _made_up_word(rng))
      caps.append(Caption(_fix_articles(" ".join(words)), int(digit), thick if needs_t else "",
                          sl if needs_s else "", name))
    out.append(caps)
  return out


_LETTERS = np.asarray(list("abcdefghijklmnopqrstuvwxyz"))


# Words a made-up word must not contain: the digits' names and every attribute word (held-out ones too).
_RESERVED = tuple(WORDS) + tuple(part for table in (THICKNESS_WORDS, SLANT_WORDS) for pair in table.values()
                                 for group in pair for phrase in group for part in phrase.split(" ") if len(part) > 3)


def _made_up_word(rng) -> str:
  while True:
    word = "".join(_LETTERS[rng.integers(26, size=int(rng.integers(2, 8)))])
    if not any(r in word for r in _RESERVED):
      return word


def _pick(rng, words, value, split):
  train, held = words[value]
  pool = train if split == "train" else train + held * len(train)  # eval: half the draws the held-out synonym
  return pool[rng.integers(len(pool))]


_TOKEN = re.compile(r"[a-z]+|\d+")


def parse_digit(text: str) -> Optional[int]:
  """The one digit a caption names (word or numeral), None if none or several differ."""
  found = set()
  for token in _TOKEN.findall(text.lower()):
    if token in WORDS:
      found.add(WORDS.index(token))
    elif token.isdigit() and len(token) == 1:
      found.add(int(token))
  return found.pop() if len(found) == 1 else None


def eval_only_words() -> Sequence[str]:
  """The attribute synonyms only evaluation captions use."""
  return [w for table in (THICKNESS_WORDS, SLANT_WORDS) for _, held in table.values() for w in held]


def names_as_word(caption: Caption) -> bool:
  """Whether the caption spells its digit out ('seven') rather than as a numeral ('7')."""
  return WORDS[caption.digit] in _TOKEN.findall(caption.text.lower())

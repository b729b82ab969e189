"""Captions -> T5 token ids and padding masks, without transformers.

- SentencePieceTokenizer: T5's own vocabulary, the sentencepiece model `spiece.model` that ships with
  every T5 checkpoint (a diffusers pipeline's `tokenizer/` folder holds PixArt's), read with the
  `sentencepiece` package. T5's 100 sentinel tokens (`<extra_id_i>`, ids after the sentencepiece
  vocabulary) are for span-corruption pretraining; they are not parsed out of the text here.
- ByteTokenizer: ByT5's scheme, no file: a UTF-8 byte b is id b + 3 (0 pad, 1 eos, 2 unk; 259 ids).

Both are called as tokenizer(texts, max_length) -> (ids int32 [N, max_length], mask float32
[N, max_length]), as transformers' T5 tokenizer with padding='max_length', truncation=True gives them
(PixArt-alpha's pipeline uses max_length=120): every text's ids end with EOS (1); a text longer than
max_length - 1 tokens is cut there so that the EOS still ends it; the rest is PAD (0) with mask 0.
`load_tokenizer` picks one from a path.
"""
from pathlib import Path
from typing import List, Sequence, Tuple

import numpy as np

PAD_ID, EOS_ID, UNK_ID = 0, 1, 2
SENTENCEPIECE_FILE = "spiece.model"


def _check_texts(texts) -> List[str]:
  if isinstance(texts, (str, bytes)):
    raise ValueError("the tokenizer takes a list of texts; wrap a single caption as [text].")
  texts = list(texts)
  bad = [type(t).__name__ for t in texts if not isinstance(t, str)]
  if bad:
    raise ValueError(f"the tokenizer takes texts as str; got {sorted(set(bad))}.")
  return texts


class _EOSTerminatedTokenizer:
  """Batching, truncation and padding shared by the tokenizers; subclasses define `_encode(text)`
  (ids without EOS), `_decode(ids)` and `vocab_size`."""
  vocab_size: int

  def _encode(self, text: str) -> List[int]:
    raise NotImplementedError

  def _decode(self, ids: List[int]) -> str:
    raise NotImplementedError

  def encode(self, text: str) -> List[int]:
    """One text's ids, EOS included, untruncated."""
    return list(self._encode(text)) + [EOS_ID]

  def __call__(self, texts: Sequence[str], max_length: int) -> Tuple[np.ndarray, np.ndarray]:
    """(ids int32 [N, max_length], mask float32 [N, max_length]); see the module doc."""
    texts = _check_texts(texts)
    if int(max_length) < 1:
      raise ValueError(f"max_length={max_length}: it must leave room for the EOS token (>= 1).")
    max_length = int(max_length)
    ids = np.full((len(texts), max_length), PAD_ID, np.int32)
    mask = np.zeros((len(texts), max_length), np.float32)
    for i, text in enumerate(texts):
      tokens = list(self._encode(text))[: max_length - 1] + [EOS_ID]
      ids[i, : len(tokens)] = tokens
      mask[i, : len(tokens)] = 1.0
    return ids, mask

  def decode(self, ids) -> str:
    """The text of one row of ids, up to its first EOS (padding and other special ids dropped)."""
    ids = [int(i) for i in np.asarray(ids).reshape(-1)]
    if EOS_ID in ids:
      ids = ids[: ids.index(EOS_ID)]
    return self._decode([i for i in ids if i not in (PAD_ID, EOS_ID)])


class ByteTokenizer(_EOSTerminatedTokenizer):
  """ByT5's tokenizer: UTF-8 bytes shifted by 3 (no vocabulary file)."""
  OFFSET = 3
  vocab_size = 256 + OFFSET

  def _encode(self, text: str) -> List[int]:
    return [b + self.OFFSET for b in text.encode("utf-8")]

  def _decode(self, ids: List[int]) -> str:
    # A truncation can cut a multi-byte character: its partial bytes are dropped.
    return bytes(i - self.OFFSET for i in ids if self.OFFSET <= i < self.vocab_size).decode("utf-8", errors="ignore")


class SentencePieceTokenizer(_EOSTerminatedTokenizer):
  """T5's tokenizer from its sentencepiece model file (`spiece.model`)."""

  def __init__(self, path):
    try:
      import sentencepiece  # pylint: disable=import-outside-toplevel
    except ImportError as e:
      raise ImportError("reading a sentencepiece .model needs the sentencepiece package: pip install sentencepiece "
                        "(or ByteTokenizer for a ByT5 encoder).") from e
    self.path = Path(path)
    if not self.path.is_file():
      raise FileNotFoundError(f"no sentencepiece model at {self.path}")
    self._processor = sentencepiece.SentencePieceProcessor(model_file=str(self.path))
    pad, eos = self._processor.pad_id(), self._processor.eos_id()
    if (pad, eos) != (PAD_ID, EOS_ID):
      raise ValueError(f"{self.path} is not a T5 vocabulary: its pad/eos ids are {pad}/{eos}, T5's are "
                       f"{PAD_ID}/{EOS_ID}; use the spiece.model that came with the T5 checkpoint.")
    self.vocab_size = int(self._processor.get_piece_size())

  def _encode(self, text: str) -> List[int]:
    return self._processor.encode(text, out_type=int)

  def _decode(self, ids: List[int]) -> str:
    return self._processor.decode(ids)


def load_tokenizer(path):
  """'byte' -> ByteTokenizer; a sentencepiece `.model` file, or a folder holding `spiece.model` itself
  (a pipeline's `tokenizer/`) or under `tokenizer/` (the pipeline root) -> SentencePieceTokenizer."""
  if str(path) == "byte":
    return ByteTokenizer()
  path = Path(path)
  if path.is_file() and path.suffix == ".model":
    return SentencePieceTokenizer(path)
  if path.is_dir():
    for candidate in (path / SENTENCEPIECE_FILE, path / "tokenizer" / SENTENCEPIECE_FILE):
      if candidate.is_file():
        return SentencePieceTokenizer(candidate)
  raise ValueError(f"{path} is not a tokenizer: expected 'byte', a sentencepiece .model file, or a folder holding "
                   f"{SENTENCEPIECE_FILE} (a pipeline's tokenizer/ or its root).")

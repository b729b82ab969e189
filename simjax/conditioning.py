"""The condition `cond` that every network, loss, sampler and step takes: a pytree with a leading batch axis.

    None                                     unconditional
    class labels  [N, label_dim] float32     one-hot, EDM's `class_labels`; the null condition is all zeros
    text          {"emb": [N, L, D] float32, "mask": [N, L]}   caption token embeddings and their padding mask

Code that moves conditions around (batching, sharding, guidance, dropout) uses the functions here and
never looks inside, so a new kind of condition needs a network that reads it and nothing else. A
`CondSpace` says which kind a model takes and draws conditions for the generator: uniform classes,
or rows of a pool of text conditions (prompts encoded once; the pool is a pytree of [M, ...] arrays).
"""
import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from simjax.errors import UserError

TEXT_KEYS = ("emb", "mask")


def is_text(cond) -> bool:
  return isinstance(cond, dict)


def num_rows(cond) -> Optional[int]:
  """The batch size of `cond` (None for no condition)."""
  leaves = jax.tree.leaves(cond)
  return int(leaves[0].shape[0]) if leaves else None


@dataclasses.dataclass(frozen=True)
class CondSpace:
  """What a model is conditioned on: nothing, one of `label_dim` classes, or text of [text_length, text_dim]."""
  label_dim: int = 0
  text_length: int = 0
  text_dim: int = 0

  def __post_init__(self):
    if self.label_dim and self.text_length:
      raise ValueError("a CondSpace is class labels or text, not both.")
    if bool(self.text_length) != bool(self.text_dim):
      raise ValueError(f"text conditions need both a length and a width, got {self.text_length} x {self.text_dim}.")

  @property
  def kind(self) -> str:
    return "labels" if self.label_dim else "text" if self.text_length else "none"

  def zeros(self, n: int):
    """The null condition for n rows (also the example input that initialises a network)."""
    if self.kind == "labels":
      return jnp.zeros((n, self.label_dim), jnp.float32)
    if self.kind == "text":
      return {"emb": jnp.zeros((n, self.text_length, self.text_dim), jnp.float32),
              "mask": jnp.zeros((n, self.text_length), jnp.float32)}
    return None

  def describe(self, n="N") -> str:
    return {"none": "no condition", "labels": f"one-hot class labels [{n}, {self.label_dim}]",
            "text": f"a text condition {{'emb': [{n}, {self.text_length}, {self.text_dim}], "
                    f"'mask': [{n}, {self.text_length}]}}"}[self.kind]

  def check(self, cond, n: Optional[int] = None, what: str = "cond"):
    """A UserError naming the mismatch if `cond` is not a condition of this space (for n rows)."""
    if cond is None and self.kind == "none":
      return
    wrong_kind = cond is None or is_text(cond) != (self.kind == "text") or (
        is_text(cond) and set(cond) != set(TEXT_KEYS))
    if not wrong_kind:
      want = jax.tree.map(lambda a: tuple(a.shape[1:]), self.zeros(1))
      rows = {np.shape(a)[0] for a in jax.tree.leaves(cond)}
      got = jax.tree.map(lambda a: tuple(np.shape(a)[1:]), cond)
      wrong_kind = got != want or len(rows) != 1 or (n is not None and rows != {n})
    if wrong_kind:
      raise UserError(f"{what}: this model takes {self.describe('N' if n is None else n)}; got {_describe(cond)}.")

  def draw(self, key, n: int, pool=None):
    """n conditions for the generator: uniform classes, or uniform rows of `pool` (text)."""
    if self.kind == "labels":
      return jax.nn.one_hot(jax.random.randint(key, (n,), 0, self.label_dim), self.label_dim, dtype=jnp.float32)
    if self.kind == "text":
      if pool is None:
        raise ValueError("drawing text conditions needs a pool of encoded prompts.")
      idx = jax.random.randint(key, (n,), 0, num_rows(pool))
      return take(pool, idx)
    return None


def _describe(cond) -> str:
  if cond is None:
    return "None"
  return str(jax.tree.map(lambda a: tuple(np.shape(a)), cond))


def null_like(cond, null=None):
  """The null condition beside `cond` (same rows): `null` (one row's pytree, no batch axis, e.g. a text
  model's learned empty-caption embedding) broadcast to every row, else zeros."""
  if null is None:
    return jax.tree.map(jnp.zeros_like, cond)
  return jax.tree.map(lambda c, z: jnp.broadcast_to(jnp.asarray(z, c.dtype), c.shape), cond, null)


def drop(key, cond, p: float, null=None):
  """Condition dropout for training: each row replaced by the null condition with probability p."""
  if cond is None or not p:
    return cond
  keep = jax.random.uniform(key, (num_rows(cond),)) >= p
  return where_rows(keep, cond, null_like(cond, null))


def where_rows(keep, a, b):
  """Row-wise select: a's row where keep, else b's."""
  return jax.tree.map(lambda x, y: jnp.where(keep.reshape((-1,) + (1,) * (x.ndim - 1)), x, y), a, b)


def concat(a, b):
  """The rows of a, then those of b."""
  return jax.tree.map(lambda x, y: jnp.concatenate([x, y]), a, b)


def take(cond, idx):
  """Rows `idx` of `cond` (an index array or a slice)."""
  return jax.tree.map(lambda x: x[idx], cond)


def as_arrays(cond, dtype=np.float32):
  """`cond` with every leaf a numpy array of `dtype` (for host-side inputs)."""
  return jax.tree.map(lambda x: np.asarray(x, dtype), cond)


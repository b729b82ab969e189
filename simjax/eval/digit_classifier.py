"""A small digit classifier whose features define the digits analogue of FID.

Trained deterministically (fixed seed, fixed batch schedule) on the training split only, so every
run and every evaluation measures in the same feature space; the held-out split checks its accuracy.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax


class DigitClassifier(nn.Module):
  """Conv(32) -> Conv(64) -> pool -> Dense(features) -> Dense(10) on [N, 8, 8, 1] digits in [-1, 1]."""
  features: int = 64

  @nn.compact
  def __call__(self, x, return_features: bool = False):
    h = nn.gelu(nn.Conv(32, (3, 3), name="conv0")(x))
    h = nn.gelu(nn.Conv(64, (3, 3), name="conv1")(h))
    h = nn.avg_pool(h, (2, 2), (2, 2))
    feats = nn.gelu(nn.Dense(self.features, name="fc")(h.reshape(h.shape[0], -1)))
    logits = nn.Dense(10, name="head")(feats)
    return (logits, feats) if return_features else logits


def train_classifier(x, labels, *, steps: int = 600, batch_size: int = 128, lr: float = 2e-3, seed: int = 0,
                     features: int = 64):
  """Returns classifier params trained with Adam and light augmentation (1-pixel shifts)."""
  model = DigitClassifier(features)
  key = jax.random.key(seed)
  # Jitted: run eagerly, flax's init compiles each of its ops on its own (3-4 s of XLA:CPU compiles).
  params = jax.jit(model.init)(key, jnp.zeros((1,) + x.shape[1:]))["params"]
  opt = optax.adamw(lr, weight_decay=1e-4)
  x, labels = jnp.asarray(x), jnp.asarray(labels)

  def loss_fn(p, xb, yb):
    logits = model.apply({"params": p}, xb)
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, yb))

  @jax.jit
  def step(p, o, i):
    k = jax.random.fold_in(key, i)
    k_idx, k_shift = jax.random.split(k)
    idx = jax.random.randint(k_idx, (batch_size,), 0, x.shape[0])
    shift = jax.random.randint(k_shift, (2,), -1, 2)
    xb = jnp.roll(x[idx], shift, axis=(1, 2))
    g = jax.grad(loss_fn)(p, xb, labels[idx])
    u, o = opt.update(g, o, p)
    return optax.apply_updates(p, u), o

  # A host loop, not lax.scan: XLA:CPU runs convolutions inside while-loops far slower.
  o = opt.init(params)
  for i in range(steps):
    params, o = step(params, o, jnp.int32(i))
  return params


def make_feature_fn(params, features: int = 64, batch_size: int = 1000):
  """images [N, 8, 8, 1] in [-1, 1] -> (features [N, F], predicted class [N]), batched, as numpy."""
  model = DigitClassifier(features)
  apply = jax.jit(lambda xb: model.apply({"params": params}, xb, return_features=True))

  def fn(images):
    feats, preds = [], []
    for i in range(0, len(images), batch_size):
      logits, f = apply(jnp.asarray(images[i:i + batch_size], jnp.float32))
      feats.append(np.asarray(f, np.float64))
      preds.append(np.asarray(jnp.argmax(logits, -1)))
    return np.concatenate(feats), np.concatenate(preds)
  return fn

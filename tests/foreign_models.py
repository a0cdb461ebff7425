"""Models the train-step tests (test_checks, test_train_correctness) run on: Linen and NNX,
attention and Conv + BatchNorm + Dropout, none written for vcon_jax."""

import flax.linen as nn
import numpy as np
from flax import nnx

CLASSES = 5


class LinenConvBNDrop(nn.Module):
  @nn.compact
  def __call__(self, x, train: bool):
    x = nn.Conv(8, (3, 3))(x)
    x = nn.BatchNorm(use_running_average=not train)(x)
    x = nn.Dropout(0.3, deterministic=not train)(nn.relu(x))
    return nn.Dense(CLASSES)(x.mean((1, 2)))


class LinenAttention(nn.Module):
  @nn.compact
  def __call__(self, x, deterministic: bool = True):
    x = nn.Dense(16)(x)
    x = x + nn.MultiHeadDotProductAttention(num_heads=2, dropout_rate=0.3)(
        x, deterministic=deterministic)
    return nn.Dense(CLASSES)(x.mean(1))


class NNXConvBNDrop(nnx.Module):
  def __init__(self, rngs):
    self.conv = nnx.Conv(3, 8, (3, 3), rngs=rngs)
    self.bn = nnx.BatchNorm(8, rngs=rngs)
    self.drop = nnx.Dropout(0.3, rngs=rngs)
    self.head = nnx.Linear(8, CLASSES, rngs=rngs)

  def __call__(self, x):
    x = self.drop(nnx.relu(self.bn(self.conv(x))))
    return self.head(x.mean((1, 2)))


class NNXAttention(nnx.Module):
  def __init__(self, rngs):
    self.embed = nnx.Linear(6, 16, rngs=rngs)
    self.attn = nnx.MultiHeadAttention(num_heads=2, in_features=16, decode=False,
                                       rngs=rngs)
    self.drop = nnx.Dropout(0.3, rngs=rngs)
    self.head = nnx.Linear(16, CLASSES, rngs=rngs)

  def __call__(self, x):
    x = self.embed(x)
    x = self.drop(x + self.attn(x))
    return self.head(x.mean(1))


def image_batch(n=8, seed=0):
  rng = np.random.RandomState(seed)
  return {"inputs": rng.randn(n, 6, 6, 3).astype(np.float32),
          "labels": np.arange(n) % CLASSES}


def seq_batch(n=8, seed=0):
  rng = np.random.RandomState(seed)
  return {"inputs": rng.randn(n, 4, 6).astype(np.float32),
          "labels": np.arange(n) % CLASSES}

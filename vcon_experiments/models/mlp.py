"""Multi-layer perceptron classifier."""

from __future__ import annotations

from collections.abc import Sequence

import jax
from flax import nnx


class MLP(nnx.Module):
  """Fully connected ReLU network on flattened inputs.

  Every hidden layer is ``Linear -> relu -> Dropout``; the last layer (``head``) returns
  logits. Weight matrices are the ``kernel`` of each ``nnx.Linear`` (``layers/<i>/kernel``
  and ``head/kernel``), shape ``(in, out)``.

  Args:
    in_features: Number of input features after flattening (784 for 28x28x1 images).
    hidden: Widths of the hidden layers.
    num_classes: Number of output logits.
    dropout: Dropout rate after every hidden activation (active only in train mode).
    rngs: Random streams for initialisation (``params``) and dropout (``dropout``, falling
      back to ``default``).
  """

  def __init__(
      self,
      in_features: int = 784,
      hidden: Sequence[int] = (256, 256),
      num_classes: int = 10,
      dropout: float = 0.0,
      *,
      rngs: nnx.Rngs,
  ):
    dims = (int(in_features), *(int(h) for h in hidden))
    self.layers = nnx.List(
        [nnx.Linear(d_in, d_out, rngs=rngs) for d_in, d_out in zip(dims[:-1], dims[1:])]
    )
    self.dropout = nnx.Dropout(dropout, rngs=rngs)
    self.head = nnx.Linear(dims[-1], num_classes, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    """Returns logits of shape ``(batch, num_classes)`` for ``x`` of shape ``(batch, ...)``."""
    x = x.reshape(x.shape[0], -1)
    for layer in self.layers:
      x = self.dropout(nnx.relu(layer(x)))
    return self.head(x)

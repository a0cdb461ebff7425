"""Small convolutional classifier."""

from __future__ import annotations

from collections.abc import Sequence

import jax
from flax import nnx


class CNN(nnx.Module):
  """``(Conv3x3 -> BatchNorm -> relu -> pool2x2) * len(features) -> Dense -> relu -> Dense``.

  Convolutions have no bias (BatchNorm follows them). Weight tensors are the ``kernel`` of
  each conv (``convs/<i>/kernel``, shape ``(3, 3, in, out)``) and of the two dense layers
  (``fc/kernel``, ``head/kernel``).

  Args:
    in_channels: Channels of the NHWC input.
    num_classes: Number of output logits.
    features: Output channels of each conv stage; each stage halves the spatial size.
    hidden: Width of the dense hidden layer.
    image_size: Input height and width (an int for square images); fixes the size of the
      flattened features.
    pool: ``"max"`` or ``"avg"`` pooling after each conv stage.
    dropout: Dropout rate before the classifier (active only in train mode).
    rngs: Random streams for initialisation and dropout.
  """

  def __init__(
      self,
      in_channels: int = 1,
      num_classes: int = 10,
      features: Sequence[int] = (32, 64),
      hidden: int = 128,
      *,
      image_size: int | tuple[int, int] = 28,
      pool: str = "max",
      dropout: float = 0.0,
      rngs: nnx.Rngs,
  ):
    if pool not in ("max", "avg"):
      raise ValueError(f"pool must be 'max' or 'avg', got {pool!r}.")
    height, width = (image_size, image_size) if isinstance(image_size, int) else image_size
    chans = (int(in_channels), *(int(f) for f in features))
    self.pool = pool
    self.convs = nnx.List([
        nnx.Conv(c_in, c_out, kernel_size=(3, 3), use_bias=False, rngs=rngs)
        for c_in, c_out in zip(chans[:-1], chans[1:])
    ])
    self.norms = nnx.List([nnx.BatchNorm(c, rngs=rngs) for c in chans[1:]])
    for _ in chans[1:]:
      height, width = height // 2, width // 2
    if height < 1 or width < 1:
      raise ValueError(f"image_size={image_size!r} is too small for {len(chans) - 1} poolings.")
    self.fc = nnx.Linear(height * width * chans[-1], hidden, rngs=rngs)
    self.dropout = nnx.Dropout(dropout, rngs=rngs)
    self.head = nnx.Linear(hidden, num_classes, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    """Returns logits ``(batch, num_classes)`` for NHWC images ``x``."""
    pool = nnx.max_pool if self.pool == "max" else nnx.avg_pool
    for conv, norm in zip(self.convs, self.norms):
      x = nnx.relu(norm(conv(x)))
      x = pool(x, window_shape=(2, 2), strides=(2, 2))
    x = x.reshape(x.shape[0], -1)
    x = self.dropout(nnx.relu(self.fc(x)))
    return self.head(x)

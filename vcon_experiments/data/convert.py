"""Turns decoded TFDS examples into model inputs (numpy arrays)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from vcon_experiments.data.tokenizer import Tokenizer


def center_crop_resize(image: np.ndarray, size: int) -> np.ndarray:
  """Resizes the short side to ``size / 0.875`` and center-crops ``size²``.

  The usual ImageNet evaluation preprocessing (no augmentation).

  Args:
    image: ``H×W×C`` uint8 image.
    size: Side of the square output.

  Returns:
    ``size×size×C`` uint8 image.
  """
  from PIL import Image  # Lazy: only variable-size datasets need Pillow.

  h, w = image.shape[:2]
  scale = size / 0.875 / min(h, w)
  new_h, new_w = max(size, round(h * scale)), max(size, round(w * scale))
  squeeze = image.shape[-1] == 1
  pil = Image.fromarray(image[..., 0] if squeeze else image)
  pil = pil.resize((new_w, new_h), Image.BILINEAR)
  top, left = (new_h - size) // 2, (new_w - size) // 2
  out = np.asarray(pil)[top:top + size, left:left + size]
  return out[..., None] if squeeze else out


def images_to_float(images: Sequence[np.ndarray],
                    shape: tuple[int, int, int]) -> np.ndarray:
  """Stacks uint8 images into float32 NHWC in [0, 1].

  Images whose size differs from ``shape`` are center-cropped and resized.

  Raises:
    ValueError: If an image's channel count differs from ``shape[-1]``.
  """
  out = np.empty((len(images), *shape), dtype=np.float32)
  for i, image in enumerate(images):
    image = np.asarray(image)
    if image.ndim == 2:
      image = image[..., None]
    if image.shape[-1] != shape[-1]:
      raise ValueError(
          f"Image {i} has {image.shape[-1]} channels; expected {shape[-1]} "
          f"(input shape {shape}).")
    if image.shape != shape:
      image = center_crop_resize(image, shape[0])
    out[i] = image
  out *= 1.0 / 255.0
  return out


def texts_to_ids(texts: Sequence[str | bytes],
                 tokenizer: Tokenizer) -> np.ndarray:
  """Tokenizes texts (UTF-8 ``bytes`` or ``str``) to int32 ids."""
  return tokenizer.encode_batch(list(texts))


def labels_to_int32(labels: Sequence[int]) -> np.ndarray:
  """Converts labels to an int32 vector."""
  return np.asarray(labels, dtype=np.int64).astype(np.int32).reshape(-1)

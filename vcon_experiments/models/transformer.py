"""Pre-norm transformer encoder block, Vision Transformer and text classifier.

Every projection is an ``nnx.Linear`` with a plain 2-D ``kernel`` of shape ``(in, out)``:
``attn/query``, ``attn/key``, ``attn/value``, ``attn/out``, ``mlp/fc1`` and ``mlp/fc2`` in
each block, plus ``head``. Lookup tables are named so their paths contain ``embed``,
``pos_embedding`` or ``cls_token`` and are left dense by a default selection. The ViT patch
projection is a conv named ``patch_proj`` (not ``*embed*``) so that it counts as a weight
map.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

_POS_INIT = jax.nn.initializers.normal(stddev=0.02)


def _check_heads(dim: int, heads: int) -> None:
  if heads < 1 or dim % heads:
    raise ValueError(f"dim={dim} must be divisible by heads={heads}.")


class MultiHeadSelfAttention(nnx.Module):
  """Scaled dot-product self-attention with explicit ``query/key/value/out`` projections.

  Args:
    dim: Model width; must be divisible by ``heads``.
    heads: Number of attention heads.
    dropout: Dropout rate on the attention weights (train mode only).
    rngs: Random streams for initialisation and dropout.
  """

  def __init__(self, dim: int, heads: int, dropout: float = 0.0, *, rngs: nnx.Rngs):
    _check_heads(dim, heads)
    self.head_dim = dim // heads
    self.query = nnx.Linear(dim, dim, rngs=rngs)
    self.key = nnx.Linear(dim, dim, rngs=rngs)
    self.value = nnx.Linear(dim, dim, rngs=rngs)
    self.out = nnx.Linear(dim, dim, rngs=rngs)
    self.dropout = nnx.Dropout(dropout, rngs=rngs)

  @property
  def heads(self) -> int:
    """The head count, from the kernel's shape (a model shrunk by vj.shrink has fewer)."""
    return self.query.kernel.shape[1] // self.head_dim

  def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """Attends over the tokens of ``x`` ``(batch, tokens, dim)``.

    Args:
      x: Token features.
      mask: Optional key mask ``(batch, tokens)``, ``True`` where a token may be attended
        to. A row with no valid key attends uniformly instead of producing NaN.

    Returns:
      Features of the same shape as ``x``.
    """
    b, t, _ = x.shape
    hd, heads = self.head_dim, self.heads
    split = lambda y: y.reshape(b, t, heads, hd)  # noqa: E731
    q, k, v = split(self.query(x)), split(self.key(x)), split(self.value(x))
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(hd)
    if mask is not None:
      logits = jnp.where(mask[:, None, None, :], logits, jnp.finfo(logits.dtype).min)
    weights = self.dropout(jax.nn.softmax(logits, axis=-1))
    y = jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(b, t, heads * hd)
    return self.out(y)


class FeedForward(nnx.Module):
  """``fc1 -> GELU -> Dropout -> fc2``.

  Args:
    dim: Input and output width.
    mlp_dim: Hidden width.
    dropout: Dropout rate after the activation (train mode only).
    rngs: Random streams for initialisation and dropout.
  """

  def __init__(self, dim: int, mlp_dim: int, dropout: float = 0.0, *, rngs: nnx.Rngs):
    self.fc1 = nnx.Linear(dim, mlp_dim, rngs=rngs)
    self.fc2 = nnx.Linear(mlp_dim, dim, rngs=rngs)
    self.dropout = nnx.Dropout(dropout, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    """Applies the two-layer MLP to the last axis of ``x``."""
    return self.fc2(self.dropout(nnx.gelu(self.fc1(x))))


class TransformerBlock(nnx.Module):
  """Pre-norm encoder block: ``x + attn(norm1(x))`` then ``x + mlp(norm2(x))``.

  Args:
    dim: Model width.
    heads: Number of attention heads.
    mlp_dim: Hidden width of the feed-forward block.
    dropout: Dropout rate for attention weights, MLP activations and both residual
      branches (train mode only).
    rngs: Random streams for initialisation and dropout.
  """

  def __init__(
      self, dim: int, heads: int, mlp_dim: int, dropout: float = 0.0, *, rngs: nnx.Rngs
  ):
    self.norm1 = nnx.LayerNorm(dim, rngs=rngs)
    self.attn = MultiHeadSelfAttention(dim, heads, dropout, rngs=rngs)
    self.norm2 = nnx.LayerNorm(dim, rngs=rngs)
    self.mlp = FeedForward(dim, mlp_dim, dropout, rngs=rngs)
    self.dropout = nnx.Dropout(dropout, rngs=rngs)

  def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """Applies the block to ``x`` ``(batch, tokens, dim)`` with an optional key mask."""
    x = x + self.dropout(self.attn(self.norm1(x), mask))
    return x + self.dropout(self.mlp(self.norm2(x)))


class ViT(nnx.Module):
  """Vision Transformer classifying from a learned class token.

  Patches are embedded by a conv with ``kernel = stride = patch_size``; a class token
  (``cls_token``, shape ``(1, dim)``) is prepended and a learned position table
  (``pos_embedding``, shape ``(1 + num_patches, dim)``) added. After ``depth`` pre-norm
  blocks, the class token goes through ``norm`` and ``head``.

  Args:
    image_size: Input height and width; must be divisible by ``patch_size``.
    patch_size: Side of the square patches.
    in_channels: Channels of the NHWC input.
    num_classes: Number of output logits.
    dim: Model width.
    depth: Number of transformer blocks.
    heads: Number of attention heads.
    mlp_dim: Hidden width of the feed-forward blocks.
    dropout: Dropout rate (embeddings and inside the blocks; train mode only).
    resize_inputs: Resize (bilinear) inputs of another size to ``image_size`` first, e.g.
      CIFAR-10's 32 px to the 224 px of an ImageNet-pretrained ViT. Off by default: an
      input of the wrong size is then an error.
    rngs: Random streams for initialisation and dropout.
  """

  def __init__(
      self,
      image_size: int = 28,
      patch_size: int = 4,
      in_channels: int = 1,
      num_classes: int = 10,
      dim: int = 64,
      depth: int = 4,
      heads: int = 4,
      mlp_dim: int = 128,
      dropout: float = 0.0,
      resize_inputs: bool = False,
      *,
      rngs: nnx.Rngs,
  ):
    _check_heads(dim, heads)
    self.image_size = image_size
    self.resize_inputs = resize_inputs
    if image_size % patch_size:
      raise ValueError(f"image_size={image_size} must be divisible by patch_size={patch_size}.")
    num_patches = (image_size // patch_size) ** 2
    self.patch_proj = nnx.Conv(
        in_channels, dim, kernel_size=(patch_size, patch_size),
        strides=(patch_size, patch_size), padding="VALID", rngs=rngs,
    )
    self.cls_token = nnx.Param(jnp.zeros((1, dim)))
    self.pos_embedding = nnx.Param(_POS_INIT(rngs.params(), (num_patches + 1, dim)))
    self.dropout = nnx.Dropout(dropout, rngs=rngs)
    self.blocks = nnx.List(
        [TransformerBlock(dim, heads, mlp_dim, dropout, rngs=rngs) for _ in range(depth)]
    )
    self.norm = nnx.LayerNorm(dim, rngs=rngs)
    self.head = nnx.Linear(dim, num_classes, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    """Returns logits ``(batch, num_classes)`` for NHWC images ``x``."""
    if x.shape[1:3] != (self.image_size, self.image_size):
      if not self.resize_inputs:
        raise ValueError(f"ViT expects {self.image_size}x{self.image_size} images, got "
                         f"{x.shape[1]}x{x.shape[2]}; pass resize_inputs=True to resize.")
      x = jax.image.resize(x, (x.shape[0], self.image_size, self.image_size, x.shape[3]),
                           "bilinear")
    x = self.patch_proj(x)
    b = x.shape[0]
    x = x.reshape(b, -1, x.shape[-1])
    cls = jnp.broadcast_to(self.cls_token[...][None], (b, 1, x.shape[-1]))
    x = jnp.concatenate([cls.astype(x.dtype), x], axis=1) + self.pos_embedding[...]
    x = self.dropout(x)
    for block in self.blocks:
      x = block(x)
    return self.head(self.norm(x[:, 0]))


class TextTransformer(nnx.Module):
  """Transformer encoder classifying token sequences by masked mean pooling.

  Tokens equal to ``pad_id`` are masked out as attention keys and excluded from the
  mean pool, so the logits of a sequence do not depend on how much padding follows it.
  A row made only of padding pools to zeros (no NaN).

  Args:
    vocab_size: Size of the token vocabulary (259 = 256 bytes + 3 specials by default).
    max_len: Longest accepted sequence; size of the ``pos_embedding`` table.
    num_classes: Number of output logits.
    dim: Model width.
    depth: Number of transformer blocks.
    heads: Number of attention heads.
    mlp_dim: Hidden width of the feed-forward blocks.
    dropout: Dropout rate (embeddings and inside the blocks; train mode only).
    pad_id: Token id used for padding.
    rngs: Random streams for initialisation and dropout.
  """

  def __init__(
      self,
      vocab_size: int = 259,
      max_len: int = 128,
      num_classes: int = 45,
      dim: int = 64,
      depth: int = 2,
      heads: int = 4,
      mlp_dim: int = 128,
      dropout: float = 0.0,
      pad_id: int = 0,
      *,
      rngs: nnx.Rngs,
  ):
    _check_heads(dim, heads)
    self.pad_id = pad_id
    self.max_len = max_len
    self.embed = nnx.Embed(vocab_size, dim, rngs=rngs)
    self.pos_embedding = nnx.Param(_POS_INIT(rngs.params(), (max_len, dim)))
    self.dropout = nnx.Dropout(dropout, rngs=rngs)
    self.blocks = nnx.List(
        [TransformerBlock(dim, heads, mlp_dim, dropout, rngs=rngs) for _ in range(depth)]
    )
    self.norm = nnx.LayerNorm(dim, rngs=rngs)
    self.head = nnx.Linear(dim, num_classes, rngs=rngs)

  def _encode(self, tokens: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Token features ``(batch, length, dim)`` after the blocks (before ``norm``) and the
    padding mask ``(batch, length)``, ``True`` on real tokens; shared with
    :class:`MaskedByteLM`, so both run the same encoder.

    Raises:
      ValueError: If ``length`` exceeds ``max_len``.
    """
    length = tokens.shape[1]
    if length > self.max_len:
      raise ValueError(f"Sequence length {length} exceeds max_len={self.max_len}.")
    mask = tokens != self.pad_id
    x = self.dropout(self.embed(tokens) + self.pos_embedding[...][:length])
    for block in self.blocks:
      x = block(x, mask)
    return x, mask

  def __call__(self, tokens: jax.Array) -> jax.Array:
    """Returns logits ``(batch, num_classes)`` for integer ``tokens`` ``(batch, length)``.

    Raises:
      ValueError: If ``length`` exceeds ``max_len``.
    """
    x, mask = self._encode(tokens)
    weights = mask[..., None].astype(x.dtype)
    pooled = (x * weights).sum(axis=1) / jnp.maximum(weights.sum(axis=1), 1.0)
    return self.head(self.norm(pooled))


class MaskedByteLM(TextTransformer):
  """A :class:`TextTransformer` with a per-token ``lm_head``: masked-byte language model.

  Pretraining for the text transfer regime: every attribute of the classifier
  (``embed``, ``pos_embedding``, ``blocks``, ``norm``) is shared by name, so the
  pretrained encoder is copied into a classifier by dropping ``head`` and ``lm_head``.
  ``__call__`` returns logits ``(batch, length, vocab_size)``.
  """

  def __init__(self, vocab_size: int = 259, max_len: int = 128, dim: int = 64, depth: int = 2,
               heads: int = 4, mlp_dim: int = 128, dropout: float = 0.0, pad_id: int = 0,
               *, rngs: nnx.Rngs, num_classes: int = 1):
    super().__init__(vocab_size, max_len, num_classes, dim, depth, heads, mlp_dim, dropout,
                     pad_id, rngs=rngs)
    self.lm_head = nnx.Linear(dim, vocab_size, rngs=rngs)

  def __call__(self, tokens: jax.Array) -> jax.Array:
    """Returns logits ``(batch, length, vocab_size)`` for ``tokens`` ``(batch, length)``."""
    x, _ = self._encode(tokens)
    return self.lm_head(self.norm(x))

"""A Gemma-style decoder-only causal language model in Flax NNX.

RMSNorm (pre-norm, Gemma's ``1 + scale`` form), rotary positions, grouped-query
attention, a gated GELU MLP and an input embedding tied to the output projection. Every
projection is an ``nnx.Linear`` without bias and with a plain 2-D ``(in, out)`` kernel:
``blocks/i/attn/{query,key,value,out}`` and ``blocks/i/mlp/{gate,up,down}``; the table is
``embed/embedding`` (left dense by a default selection, and with it the tied output
projection), the norms are ``scale`` leaves. So a default ``vj.prune`` / ``vj.quantize``
compresses exactly the attention and MLP projections, as LLM quantisers do.

Why our own code rather than ``gemma.gm.nn``: the ``gemma`` wheel is on the registry, but
it pulls in kauldron, sentencepiece and a TensorFlow-adjacent stack that the core and
experiment installs do not need; and its projections are einsum weights named ``w`` that
our selection only finds once the model-zoo issue lands. This module keeps Gemma's
architecture at a size two CPU cores can train.

``param_dtype`` (``"float32"`` or ``"bfloat16"``) is the dtype the params are stored and
trained in; ``dtype`` the compute dtype (``"bfloat16"`` with float32 params is the usual
LLM recipe: float32 master weights, bf16 matmuls). Logits are float32.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def _dtype(value):
  if value is None or not isinstance(value, str):
    return value
  if value not in DTYPES:
    raise ValueError(f"dtype {value!r} is not one of {', '.join(DTYPES)}.")
  return DTYPES[value]


def rotary(x: jax.Array, positions: jax.Array, base: float = 10_000.0) -> jax.Array:
  """Rotary position embedding of ``x`` ``(batch, tokens, heads, head_dim)`` (halves
  rotated, as Gemma does), computed in float32."""
  half = x.shape[-1] // 2
  freq = base ** (-jnp.arange(half, dtype=jnp.float32) / half)
  angle = positions.astype(jnp.float32)[..., None] * freq  # (batch, tokens, half)
  sin, cos = jnp.sin(angle)[:, :, None, :], jnp.cos(angle)[:, :, None, :]
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1).astype(x.dtype)


class RMSNorm(nnx.Module):
  """``x / rms(x) * (1 + scale)`` with ``scale`` initialised to 0 (Gemma's form)."""

  def __init__(self, dim: int, *, param_dtype=jnp.float32, eps: float = 1e-6):
    self.scale = nnx.Param(jnp.zeros((dim,), param_dtype))
    self.eps = eps

  def __call__(self, x: jax.Array) -> jax.Array:
    xf = x.astype(jnp.float32)
    y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, -1, keepdims=True) + self.eps)
    return (y * (1.0 + self.scale[...].astype(jnp.float32))).astype(x.dtype)


class Attention(nnx.Module):
  """Causal grouped-query self-attention: ``heads`` query heads share ``kv_heads`` key /
  value heads (``heads % kv_heads == 0``)."""

  def __init__(self, dim: int, heads: int, kv_heads: int, head_dim: int, *, rngs,
               param_dtype, dtype):
    if heads % kv_heads:
      raise ValueError(f"heads={heads} must be a multiple of kv_heads={kv_heads}.")
    lin = lambda i, o: nnx.Linear(i, o, use_bias=False, param_dtype=param_dtype,  # noqa: E731
                                  dtype=dtype, rngs=rngs)
    self.head_dim = head_dim
    self.query = lin(dim, heads * head_dim)
    self.key = lin(dim, kv_heads * head_dim)
    self.value = lin(dim, kv_heads * head_dim)
    self.out = lin(heads * head_dim, dim)

  # head counts from the kernels' shapes, so a model shrunk by vj.shrink (fewer heads)
  # runs as it is and says what it has
  @property
  def heads(self) -> int:
    return self.query.kernel.shape[1] // self.head_dim

  @property
  def kv_heads(self) -> int:
    return self.key.kernel.shape[1] // self.head_dim

  def __call__(self, x: jax.Array, positions: jax.Array) -> jax.Array:
    b, t, _ = x.shape
    heads, kv_heads = self.heads, self.kv_heads
    q = rotary(self.query(x).reshape(b, t, heads, self.head_dim), positions)
    k = rotary(self.key(x).reshape(b, t, kv_heads, self.head_dim), positions)
    v = self.value(x).reshape(b, t, kv_heads, self.head_dim)
    group = heads // kv_heads
    q = q.reshape(b, t, kv_heads, group, self.head_dim)
    logits = jnp.einsum("bqkgd,bskd->bkgqs", q, k).astype(jnp.float32)
    logits = logits / math.sqrt(self.head_dim)
    causal = jnp.tril(jnp.ones((t, t), bool))
    logits = jnp.where(causal, logits, jnp.finfo(jnp.float32).min)
    weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    y = jnp.einsum("bkgqs,bskd->bqkgd", weights, v).reshape(b, t, heads * self.head_dim)
    return self.out(y)

  def step(self, x: jax.Array, pos: jax.Array, cache: dict) -> tuple[jax.Array, dict]:
    """One new token per sequence (``x``: ``(batch, 1, dim)`` at position ``pos``) against
    the key / value cache ``{"k", "v"}`` (``(batch, max_len, kv_heads, head_dim)``):
    the same attention as :meth:`__call__` at that position, the cache updated."""
    b = x.shape[0]
    heads, kv_heads = self.heads, self.kv_heads
    positions = jnp.full((b, 1), pos)
    q = rotary(self.query(x).reshape(b, 1, heads, self.head_dim), positions)
    k = rotary(self.key(x).reshape(b, 1, kv_heads, self.head_dim), positions)
    v = self.value(x).reshape(b, 1, kv_heads, self.head_dim)
    at = (0, pos, 0, 0)
    cache = {"k": jax.lax.dynamic_update_slice(cache["k"], k.astype(cache["k"].dtype), at),
             "v": jax.lax.dynamic_update_slice(cache["v"], v.astype(cache["v"].dtype), at)}
    group = heads // kv_heads
    q = q.reshape(b, 1, kv_heads, group, self.head_dim)
    logits = jnp.einsum("bqkgd,bskd->bkgqs", q, cache["k"]).astype(jnp.float32)
    logits = logits / math.sqrt(self.head_dim)
    seen = jnp.arange(cache["k"].shape[1]) <= pos
    logits = jnp.where(seen, logits, jnp.finfo(jnp.float32).min)
    weights = jax.nn.softmax(logits, axis=-1).astype(cache["v"].dtype)
    y = jnp.einsum("bkgqs,bskd->bqkgd", weights, cache["v"]).reshape(
        b, 1, heads * self.head_dim)
    return self.out(y), cache


class GatedMLP(nnx.Module):
  """``down(gelu(gate(x)) * up(x))`` (GeGLU, Gemma's MLP)."""

  def __init__(self, dim: int, hidden: int, *, rngs, param_dtype, dtype):
    lin = lambda i, o: nnx.Linear(i, o, use_bias=False, param_dtype=param_dtype,  # noqa: E731
                                  dtype=dtype, rngs=rngs)
    self.gate, self.up, self.down = lin(dim, hidden), lin(dim, hidden), lin(hidden, dim)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.down(jax.nn.gelu(self.gate(x), approximate=True) * self.up(x))


class DecoderBlock(nnx.Module):
  """``x + attn(norm(x))`` then ``x + mlp(norm(x))``."""

  def __init__(self, dim, heads, kv_heads, head_dim, mlp_dim, *, rngs, param_dtype, dtype):
    self.attn_norm = RMSNorm(dim, param_dtype=param_dtype)
    self.attn = Attention(dim, heads, kv_heads, head_dim, rngs=rngs,
                          param_dtype=param_dtype, dtype=dtype)
    self.mlp_norm = RMSNorm(dim, param_dtype=param_dtype)
    self.mlp = GatedMLP(dim, mlp_dim, rngs=rngs, param_dtype=param_dtype, dtype=dtype)

  def __call__(self, x, positions):
    x = x + self.attn(self.attn_norm(x), positions)
    return x + self.mlp(self.mlp_norm(x))

  def step(self, x, pos, cache):
    h, cache = self.attn.step(self.attn_norm(x), pos, cache)
    x = x + h
    return x + self.mlp(self.mlp_norm(x)), cache


class CausalLM(nnx.Module):
  """Decoder-only LM: ``tokens (batch, T) int -> next-token logits (batch, T, vocab)``.

  Args:
    vocab_size: token ids ``0 .. vocab_size - 1``.
    max_len: longest sequence (kept for the record; rotary positions need no table).
    dim: residual width.
    depth: number of decoder blocks.
    heads, kv_heads: query heads and shared key/value heads (grouped-query attention).
    head_dim: width of a head (default ``dim // heads``).
    mlp_dim: hidden width of the gated MLP (default ``3 * dim``).
    param_dtype, dtype: storage and compute dtypes (``"float32"``, ``"bfloat16"``).
    rngs: initialisation streams.
  """

  def __init__(self, vocab_size: int, max_len: int, dim: int = 128, depth: int = 4,
               heads: int = 4, kv_heads: int = 1, head_dim: int | None = None,
               mlp_dim: int | None = None, param_dtype="float32", dtype=None, *,
               rngs: nnx.Rngs):
    param_dtype, dtype = _dtype(param_dtype), _dtype(dtype)
    head_dim = head_dim or dim // heads
    if head_dim % 2:
      raise ValueError(f"head_dim={head_dim} must be even (rotary positions).")
    self.max_len, self.dim = max_len, dim
    self.embed = nnx.Embed(vocab_size, dim, param_dtype=param_dtype, dtype=dtype,
                           embedding_init=nnx.initializers.normal(dim ** -0.5), rngs=rngs)
    self.blocks = nnx.List([
        DecoderBlock(dim, heads, kv_heads, head_dim, mlp_dim or 3 * dim, rngs=rngs,
                     param_dtype=param_dtype, dtype=dtype) for _ in range(depth)])
    self.final_norm = RMSNorm(dim, param_dtype=param_dtype)

  def __call__(self, tokens: jax.Array) -> jax.Array:
    b, t = tokens.shape
    x = self.embed(tokens) * jnp.asarray(math.sqrt(self.dim), self.embed.embedding.dtype)
    positions = jnp.broadcast_to(jnp.arange(t), (b, t))
    for block in self.blocks:
      x = block(x, positions)
    return self.embed.attend(self.final_norm(x)).astype(jnp.float32)

  def init_cache(self, batch: int, length: int | None = None) -> list[dict]:
    """An empty key / value cache for :meth:`decode`, ``length`` positions (default
    ``max_len``), in the compute dtype."""
    length = length or self.max_len
    dtype = self.blocks[0].attn.key.dtype or self.embed.embedding.dtype
    return [{name: jnp.zeros((batch, length, blk.attn.kv_heads, blk.attn.head_dim), dtype)
             for name in ("k", "v")} for blk in self.blocks]

  def decode(self, tokens: jax.Array, pos: jax.Array, cache: list[dict]
             ) -> tuple[jax.Array, list[dict]]:
    """Next-token logits ``(batch, vocab)`` for ``tokens`` ``(batch,)`` at position
    ``pos`` given the cache of the positions before it, and the cache with this one
    added: the same function as :meth:`__call__` at that position, one token's work."""
    x = self.embed(tokens[:, None]) * jnp.asarray(math.sqrt(self.dim),
                                                   self.embed.embedding.dtype)
    new = []
    for block, c in zip(self.blocks, cache):
      x, c = block.step(x, pos, c)
      new.append(c)
    return self.embed.attend(self.final_norm(x))[:, 0].astype(jnp.float32), new

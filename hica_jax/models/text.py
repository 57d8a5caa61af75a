"""Text towers: CLIP-style causal (layout 'pre') and BERT-style bidirectional (layout 'post').

layout 'pre'  (CLIP): tok + pos -> pre-LN blocks -> ln_final.
layout 'post' (BERT/RoBERTa): ln_embed(tok + pos + type) -> post-LN blocks.

Pooling over the final hidden states:
- 'eos': the last valid token (index sum(mask) - 1). For our tokenizer that is
  [SEP]; for CLIP tokenizers it is <|endoftext|>, the token HF CLIPTextModel
  pools (HF finds it by argmax of ids / first eos id; for well-formed input,
  i.e. EOS right after the text and a mask that covers it, this is the same).
- 'cls': the first token (raw hidden state; HF BERT's tanh pooler is not used).
- 'mean': mean over valid tokens (sentence-transformers).
- 'argmax': the token with the largest id (open_clip's CLIP convention: EOT has the
  largest id); 'last': position L-1 (SigLIP, texts padded to max_len); 'first' = 'cls'.
Keys outside the mask are masked in attention (mask_padding=False attends to the
padding, as SigLIP and open_clip's own text tower do); `causal` adds the causal mask.
pool_dense: BERT's pooler, tanh(Dense(pooled)) (open_clip's 'cls_pooler').

The MLM head (stage-1 text) is BERT's: dense -> act -> LayerNorm -> logits tied
to the token embedding + bias. It is a head: HF import fills it from
`cls.predictions.*` / `lm_head.*` when the checkpoint has one.
"""
from typing import Any

import chex
import flax.linen as nn
import jax.numpy as jnp

from hica_jax.models.vit import NEG_INF, Encoder, activation

# name -> architecture fields (width, depth, heads, mlp_dim, layout, ...).
TEXT_VARIANTS = {
    "clip": dict(width=512, depth=12, heads=8, mlp_dim=2048, max_len=77,
                 causal=True, pool="eos", act="quick_gelu", layout="pre",
                 type_vocab_size=0, ln_eps=1e-5),
    "bert-base": dict(width=768, depth=12, heads=12, mlp_dim=3072, max_len=512,
                      causal=False, pool="cls", act="gelu", layout="post",
                      type_vocab_size=2, ln_eps=1e-12),
    "minilm-l6": dict(width=384, depth=6, heads=12, mlp_dim=1536, max_len=512,
                      causal=False, pool="mean", act="gelu", layout="post",
                      type_vocab_size=2, ln_eps=1e-12),
}


def attention_bias(mask, causal: bool):
  """mask i32[B, L] (1 = valid) -> additive f32[B, 1, L, L] (keys masked, optional causal)."""
  keep = mask[:, None, None, :].astype(bool)
  if causal:
    l = mask.shape[1]
    keep = keep & jnp.tril(jnp.ones((l, l), bool))[None, None]
  return jnp.where(keep, 0.0, NEG_INF).astype(jnp.float32)


def pool_tokens(tokens, mask, pool: str, ids=None):
  """tokens [B, L, W], mask [B, L] (ids [B, L] for 'argmax') -> [B, W] (see module
  docstring)."""
  if pool in ("cls", "first"):
    return tokens[:, 0]
  if pool == "last":
    return tokens[:, -1]
  if pool == "argmax":
    return jnp.take_along_axis(tokens, jnp.argmax(ids, axis=1)[:, None, None], axis=1)[:, 0]
  m = mask.astype(tokens.dtype)
  if pool == "mean":
    s = jnp.einsum("blw,bl->bw", tokens.astype(jnp.float32), m.astype(jnp.float32))
    return (s / jnp.maximum(m.sum(1, keepdims=True), 1.0).astype(jnp.float32)).astype(tokens.dtype)
  if pool == "eos":
    last = jnp.maximum(mask.sum(axis=1) - 1, 0)
    return jnp.take_along_axis(tokens, last[:, None, None], axis=1)[:, 0]
  raise ValueError(f"text.pool={pool!r}: expected 'cls', 'mean', 'eos', 'argmax', "
                   "'last' or 'first'.")


class TextTransformer(nn.Module):
  vocab_size: int
  width: int = 512
  depth: int = 12
  heads: int = 8
  mlp_dim: int = 2048
  max_len: int = 77
  causal: bool = True
  pool: str = "eos"
  act: str = "quick_gelu"
  layout: str = "pre"
  type_vocab_size: int = 0
  ln_eps: float = 1e-5
  position_offset: int = 0  # RoBERTa: padding_idx + 1 = 2
  dropout: float = 0.0
  dtype: Any = jnp.float32
  remat: bool = False
  scan: bool = False
  mask_padding: bool = True
  pool_dense: bool = False

  def _positions(self, mask):
    l = mask.shape[1]
    if not self.position_offset:
      return jnp.arange(l)[None]
    # RoBERTa: valid tokens count from offset, padding sits at offset - 1.
    return jnp.where(mask > 0, jnp.cumsum(mask, 1) - 1 + self.position_offset,
                     self.position_offset - 1)

  @nn.compact
  def __call__(self, ids, mask, token_type_ids=None, train: bool = False,
               mlm: bool = False):
    """ids, mask i32[B, L] -> dict(pooled [B, W], tokens [B, L, W] [, mlm_logits f32[B, L, V]])."""
    chex.assert_rank([ids, mask], 2)
    chex.assert_equal_shape([ids, mask])
    if ids.shape[1] > self.max_len:
      raise ValueError(f"text length {ids.shape[1]} exceeds text.max_len {self.max_len}")
    if self.layout not in ("pre", "post"):
      raise ValueError(f"text.layout={self.layout!r}: expected 'pre' or 'post'.")
    init = nn.initializers.normal(0.02)
    embed = lambda n, name: nn.Embed(n, self.width, embedding_init=init,
                                     dtype=self.dtype, name=name)
    ln = lambda name: nn.LayerNorm(epsilon=self.ln_eps, dtype=self.dtype, name=name)
    token_embedding = embed(self.vocab_size, "token_embedding")
    x = token_embedding(ids) + embed(self.max_len + self.position_offset,
                                     "position_embedding")(self._positions(mask))
    if self.type_vocab_size:
      tt = jnp.zeros_like(ids) if token_type_ids is None else token_type_ids
      x = x + embed(self.type_vocab_size, "type_embedding")(tt)
    if self.layout == "post":
      x = ln("ln_embed")(x)
    x = nn.Dropout(self.dropout)(x, deterministic=not train)
    bias = attention_bias(mask if self.mask_padding else jnp.ones_like(mask), self.causal)
    x = Encoder(depth=self.depth, heads=self.heads, mlp_dim=self.mlp_dim, act=self.act,
                layout=self.layout, ln_eps=self.ln_eps, dropout=self.dropout,
                deterministic=not train, dtype=self.dtype, remat=self.remat,
                scan=self.scan, name="encoder")(x, bias)
    if self.layout == "pre":
      x = ln("ln_final")(x)
    pooled = pool_tokens(x, mask, self.pool, ids)
    if self.pool_dense:
      pooled = jnp.tanh(nn.Dense(self.width, dtype=self.dtype, name="pooler")(pooled))
    out = dict(pooled=pooled, tokens=x)
    if mlm:
      h = nn.Dense(self.width, dtype=self.dtype, name="mlm_dense")(x)
      h = ln("mlm_ln")(activation(self.act)(h))
      mlm_bias = self.param("mlm_bias", nn.initializers.zeros, (self.vocab_size,))
      out["mlm_logits"] = (token_embedding.attend(h).astype(jnp.float32)
                           + mlm_bias.astype(jnp.float32))
    return out

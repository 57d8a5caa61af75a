"""Hugging Face checkpoint names -> paths in the HiCA param tree, for hf_import.

Checkpoint names are first normalised (`normalise_names`: model prefixes
stripped, legacy LayerNorm gamma/beta renamed); then a name map per family and
tower lists (our path, checkpoint name, kind) entries, kinds as in
`param_load.convert`: CLIP image/text towers with their projections, ViT, BERT
/ RoBERTa text encoders and their optional MLM heads. `IGNORED` matches the
checkpoint names we never map (buffers, poolers, task heads, tied decoders).
"""
import re

from hica_jax.models.param_load import block, dense, layer_norm

# Checkpoint names we never map (after prefix stripping).
IGNORED = re.compile(
    r"(^|\.)(position_ids|token_type_ids)$|(^|\.)pooler\.|^cls\.seq_relationship\.|"
    r"^cls\.predictions\.decoder\.|^lm_head\.decoder\.|^classifier\.|^embeddings\.mask_token$")


def normalise_names(tensors: dict, family: str) -> dict:
  """Strips model prefixes (bert., roberta., vit.) and renames legacy gamma/beta."""
  out = {}
  for name, x in tensors.items():
    if family == "bert":
      name = re.sub(r"^(bert|roberta)\.", "", name)
    elif family == "vit":
      name = re.sub(r"^vit\.", "", name)
    name = re.sub(r"(LayerNorm|layer_norm|layernorm[a-z_]*)\.gamma$", r"\1.weight", name)
    name = re.sub(r"(LayerNorm|layer_norm|layernorm[a-z_]*)\.beta$", r"\1.bias", name)
    out[name] = x
  return out


def _clip_block(p):
  return dict(q=f"{p}.self_attn.q_proj", k=f"{p}.self_attn.k_proj", v=f"{p}.self_attn.v_proj",
              o=f"{p}.self_attn.out_proj", ln1=f"{p}.layer_norm1", ln2=f"{p}.layer_norm2",
              fc1=f"{p}.mlp.fc1", fc2=f"{p}.mlp.fc2")


def clip_image_map(depth):
  p = "vision_model."
  m = [(("embedding", "kernel"), p + "embeddings.patch_embedding.weight", "conv"),
       (("cls",), p + "embeddings.class_embedding", "reshape"),
       (("pos_embedding",), p + "embeddings.position_embedding.weight", "posemb1"),
       *layer_norm(("ln_pre",), p + "pre_layrnorm"),
       *layer_norm(("ln_post",), p + "post_layernorm")]
  for i in range(depth):
    m += block((), i, _clip_block(f"{p}encoder.layers.{i}"))
  return m, [(("kernel",), "visual_projection.weight", "linear")]


def clip_text_map(depth):
  p = "text_model."
  m = [(("token_embedding", "embedding"), p + "embeddings.token_embedding.weight", "id"),
       (("position_embedding", "embedding"), p + "embeddings.position_embedding.weight", "rows"),
       *layer_norm(("ln_final",), p + "final_layer_norm")]
  for i in range(depth):
    m += block((), i, _clip_block(f"{p}encoder.layers.{i}"))
  return m, [(("kernel",), "text_projection.weight", "linear")]


def vit_image_map(depth):
  m = [(("embedding", "kernel"), "embeddings.patch_embeddings.projection.weight", "conv"),
       (("embedding", "bias"), "embeddings.patch_embeddings.projection.bias", "id"),
       (("cls",), "embeddings.cls_token", "reshape"),
       (("pos_embedding",), "embeddings.position_embeddings", "posemb1"),
       *layer_norm(("ln_post",), "layernorm")]
  for i in range(depth):
    p = f"encoder.layer.{i}"
    m += block((), i, dict(
        q=f"{p}.attention.attention.query", k=f"{p}.attention.attention.key",
        v=f"{p}.attention.attention.value", o=f"{p}.attention.output.dense",
        ln1=f"{p}.layernorm_before", ln2=f"{p}.layernorm_after",
        fc1=f"{p}.intermediate.dense", fc2=f"{p}.output.dense"))
  return m, []


def bert_text_map(depth, has_types):
  m = [(("token_embedding", "embedding"), "embeddings.word_embeddings.weight", "id"),
       (("position_embedding", "embedding"), "embeddings.position_embeddings.weight", "rows"),
       *layer_norm(("ln_embed",), "embeddings.LayerNorm")]
  if has_types:
    m.append((("type_embedding", "embedding"), "embeddings.token_type_embeddings.weight", "id"))
  for i in range(depth):
    p = f"encoder.layer.{i}"
    m += block((), i, dict(
        q=f"{p}.attention.self.query", k=f"{p}.attention.self.key",
        v=f"{p}.attention.self.value", o=f"{p}.attention.output.dense",
        ln1=f"{p}.attention.output.LayerNorm", ln2=f"{p}.output.LayerNorm",
        fc1=f"{p}.intermediate.dense", fc2=f"{p}.output.dense"))
  return m


def mlm_head_maps():
  """Alternative MLM head names (BERT, RoBERTa); loaded only when present."""
  return [
      dense(("mlm_dense",), "cls.predictions.transform.dense")
      + layer_norm(("mlm_ln",), "cls.predictions.transform.LayerNorm")
      + [(("mlm_bias",), "cls.predictions.bias", "id")],
      dense(("mlm_dense",), "lm_head.dense") + layer_norm(("mlm_ln",), "lm_head.layer_norm")
      + [(("mlm_bias",), "lm_head.bias", "id")],
  ]

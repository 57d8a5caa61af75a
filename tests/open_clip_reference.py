"""A compact PyTorch reference of the open_clip models the importer reads, with open_clip's
state-dict key names: a timm ViT image tower (`visual.trunk.*`, head `visual.head.proj`
or `visual.head.mlp`), open_clip's own text transformer (`token_embedding`,
`positional_embedding`, `transformer.resblocks.*`, `ln_final`, `text_projection`), and
a Hugging Face BERT text tower (`text.transformer.*`, `text.proj.0/2` for proj 'mlp').

open_clip and timm import torchvision, which does not import beside the CPU torch of
the test extra, so tests build checkpoints with this reference; test_open_clip_import
checks it against the real libraries where they import (`real_open_clip`).
`save_open_clip_folder` writes exactly open_clip's layout: open_clip_config.json +
open_clip_pytorch_model.bin.
"""
import json
import os
from collections import OrderedDict

import torch
from torch import nn


class TimmBlock(nn.Module):
  def __init__(self, width, heads, mlp_dim, eps):
    super().__init__()
    self.heads = heads
    self.norm1 = nn.LayerNorm(width, eps=eps)
    self.attn = nn.Module()
    self.attn.qkv = nn.Linear(width, 3 * width)
    self.attn.proj = nn.Linear(width, width)
    self.norm2 = nn.LayerNorm(width, eps=eps)
    self.mlp = nn.Module()
    self.mlp.fc1 = nn.Linear(width, mlp_dim)
    self.mlp.fc2 = nn.Linear(mlp_dim, width)

  def forward(self, x):
    b, n, w = x.shape
    qkv = self.attn.qkv(self.norm1(x)).reshape(b, n, 3, self.heads, w // self.heads)
    q, k, v = qkv.permute(2, 0, 3, 1, 4)
    a = nn.functional.scaled_dot_product_attention(q, k, v)
    x = x + self.attn.proj(a.transpose(1, 2).reshape(b, n, w))
    return x + self.mlp.fc2(nn.functional.gelu(self.mlp.fc1(self.norm2(x))))


class TimmViT(nn.Module):
  """timm VisionTransformer (class token, learnt positions, final norm or fc_norm)."""

  def __init__(self, image_size, patch, width, depth, heads, mlp_dim, pool, fc_norm, eps=1e-6):
    super().__init__()
    self.pool = pool
    self.patch_embed = nn.Module()
    self.patch_embed.proj = nn.Conv2d(3, width, patch, patch)
    self.cls_token = nn.Parameter(0.02 * torch.randn(1, 1, width))
    self.pos_embed = nn.Parameter(0.02 * torch.randn(1, 1 + (image_size // patch) ** 2, width))
    self.blocks = nn.Sequential(*[TimmBlock(width, heads, mlp_dim, eps) for _ in range(depth)])
    if fc_norm:
      self.fc_norm = nn.LayerNorm(width, eps=eps)
    else:
      self.norm = nn.LayerNorm(width, eps=eps)

  def forward(self, images):
    x = self.patch_embed.proj(images).flatten(2).transpose(1, 2)
    x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], 1) + self.pos_embed
    x = self.blocks(x)
    if hasattr(self, "norm"):
      x = self.norm(x)
    x = x[:, 0] if self.pool == "token" else x[:, 1:].mean(1)
    return self.fc_norm(x) if hasattr(self, "fc_norm") else x


class TimmTower(nn.Module):
  """open_clip TimmModel: trunk + head ('linear': head.proj, 'mlp': head.mlp.fc1/fc2)."""

  def __init__(self, embed_dim, proj, **trunk):
    super().__init__()
    self.trunk = TimmViT(**trunk)
    width = trunk["width"]
    if proj == "linear":
      self.head = nn.Sequential(OrderedDict(drop=nn.Dropout(0.0),
                                            proj=nn.Linear(width, embed_dim, bias=False)))
    else:
      mlp = nn.Module()
      mlp.fc1 = nn.Linear(width, 2 * embed_dim)
      mlp.act = nn.GELU()
      mlp.fc2 = nn.Linear(2 * embed_dim, embed_dim, bias=False)
      self.head = nn.Sequential(OrderedDict(mlp=mlp))

  def forward(self, images):
    x = self.trunk(images)
    if hasattr(self.head, "proj"):
      return self.head.proj(x)
    m = self.head.mlp
    return m.fc2(m.act(m.fc1(x)))


class ResBlock(nn.Module):
  def __init__(self, width, heads, mlp_dim):
    super().__init__()
    self.ln_1 = nn.LayerNorm(width)
    self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
    self.ln_2 = nn.LayerNorm(width)
    self.mlp = nn.Sequential(OrderedDict(c_fc=nn.Linear(width, mlp_dim), gelu=nn.GELU(),
                                         c_proj=nn.Linear(mlp_dim, width)))

  def forward(self, x, mask):
    h = self.ln_1(x)
    x = x + self.attn(h, h, h, need_weights=False, attn_mask=mask)[0]
    return x + self.mlp(self.ln_2(x))


class NativeText(nn.Module):
  """open_clip TextTransformer, causal, pool 'argmax' (its attributes sit at the CLIP
  model's top level, as in open_clip.CLIP)."""

  def __init__(self, vocab, context, width, depth, heads, mlp_dim, embed_dim):
    super().__init__()
    self.token_embedding = nn.Embedding(vocab, width)
    self.positional_embedding = nn.Parameter(0.02 * torch.randn(context, width))
    self.transformer = nn.Module()
    self.transformer.resblocks = nn.ModuleList(
        [ResBlock(width, heads, mlp_dim) for _ in range(depth)])
    self.ln_final = nn.LayerNorm(width)
    self.text_projection = nn.Parameter(width ** -0.5 * torch.randn(width, embed_dim))
    mask = torch.full((context, context), float("-inf")).triu(1)
    self.register_buffer("attn_mask", mask, persistent=False)

  def forward(self, ids):
    x = self.token_embedding(ids) + self.positional_embedding[:ids.shape[1]]
    for blk in self.transformer.resblocks:
      x = blk(x, self.attn_mask[:ids.shape[1], :ids.shape[1]])
    x = self.ln_final(x)
    return x[torch.arange(x.shape[0]), ids.argmax(-1)] @ self.text_projection


class HFText(nn.Module):
  """open_clip HFTextEncoder over a transformers BERT: pooler cls_last_hidden_state,
  proj 'mlp' (Linear, GELU, Linear, no biases)."""

  def __init__(self, bert_config, embed_dim):
    super().__init__()
    import transformers
    self.pad_id = bert_config.pad_token_id
    self.transformer = transformers.BertModel(bert_config, add_pooling_layer=False)
    w = bert_config.hidden_size
    self.proj = nn.Sequential(nn.Linear(w, (w + embed_dim) // 2, bias=False), nn.GELU(),
                              nn.Linear((w + embed_dim) // 2, embed_dim, bias=False))

  def forward(self, ids):
    mask = (ids != self.pad_id).long()
    h = self.transformer(input_ids=ids, attention_mask=mask).last_hidden_state
    return self.proj(h[:, 0])


class CompactCLIP(nn.Module):
  def __init__(self, visual, text=None, native_text=None):
    super().__init__()
    self.visual = visual
    if text is not None:
      self.text = text
    else:
      for name, mod in native_text.named_children():
        setattr(self, name, mod)
      self.positional_embedding = native_text.positional_embedding
      self.text_projection = native_text.text_projection
      self.register_buffer("attn_mask", native_text.attn_mask, persistent=False)
      self._native = [native_text]
    self.logit_scale = nn.Parameter(torch.tensor(2.3))

  def encode_image(self, images):
    return self.visual(images)

  def encode_text(self, ids):
    return self.text(ids) if hasattr(self, "text") else self._native[0](ids)


def perturb_norms(model, seed=0):
  """Random LayerNorm affine params, so that a mis-mapped norm cannot pass."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for n, p in model.named_parameters():
      if "norm" in n or "ln_" in n or "LayerNorm" in n:
        p.add_(0.1 * torch.randn(p.shape, generator=g))


def save_open_clip_folder(model, path, model_cfg, preprocess_cfg=None):
  """open_clip's on-disk layout: open_clip_config.json + open_clip_pytorch_model.bin."""
  os.makedirs(path, exist_ok=True)
  with open(os.path.join(path, "open_clip_config.json"), "w") as f:
    json.dump({"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg or {}}, f, indent=2)
  torch.save(model.state_dict(), os.path.join(path, "open_clip_pytorch_model.bin"))
  return str(path)

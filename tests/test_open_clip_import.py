"""open_clip (BiomedCLIP layout) and SigLIP import: tiny random PyTorch models saved in the
libraries' on-disk layouts, imported, compared with PyTorch (embeddings to 1e-4, zero-shot
logits), and a `:tiny` main run started from each."""
import json
import os

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from hica_jax.models import build_model, hf_import  # noqa: E402
from hica_jax.models import check_parity  # noqa: E402
import open_clip_reference as ref_lib  # noqa: E402

ATOL = 1e-4
EMBED = 24
VISION = dict(image_size=32, patch=8, width=48, depth=2, heads=12, mlp_dim=64)
# "_base_" in the timm name: the importer reads 12 heads from it, as timm's ViT-B.
TIMM_NAME = "vit_base_patch8_32"


def _model_cfg(vision_extra, text_cfg):
  return {"embed_dim": EMBED, "vision_cfg": {"timm_model_name": TIMM_NAME,
                                             "timm_model_pretrained": False,
                                             "image_size": 32, **vision_extra},
          "text_cfg": text_cfg}


@pytest.fixture(scope="module")
def native_text_dir(tmp_path_factory):
  """timm ViT (token pool, linear head) + open_clip's own causal text tower."""
  torch.manual_seed(0)
  visual = ref_lib.TimmTower(EMBED, "linear", pool="token", fc_norm=False, **VISION)
  text = ref_lib.NativeText(vocab=99, context=16, width=32, depth=2, heads=4, mlp_dim=64,
                            embed_dim=EMBED)
  model = ref_lib.CompactCLIP(visual, native_text=text).eval()
  ref_lib.perturb_norms(model)
  cfg = _model_cfg({"timm_pool": "", "timm_proj": "linear"},
                   {"context_length": 16, "vocab_size": 99, "width": 32, "heads": 4,
                    "layers": 2, "mlp_ratio": 2.0})
  path = ref_lib.save_open_clip_folder(model, tmp_path_factory.mktemp("oc_native"), cfg,
                                       {"mean": [0.1, 0.2, 0.3], "std": [0.4, 0.5, 0.6]})
  return path, model


@pytest.fixture(scope="module")
def hf_text_dir(tmp_path_factory):
  """BiomedCLIP's shape: timm ViT (here avg-pooled, mlp head) + HF BERT, proj mlp."""
  torch.manual_seed(1)
  visual = ref_lib.TimmTower(EMBED, "mlp", pool="avg", fc_norm=False, **VISION)
  bert_cfg = transformers.BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2,
                                     num_attention_heads=4, intermediate_size=64,
                                     max_position_embeddings=40, pad_token_id=0)
  model = ref_lib.CompactCLIP(visual, text=ref_lib.HFText(bert_cfg, EMBED)).eval()
  ref_lib.perturb_norms(model)
  root = tmp_path_factory.mktemp("oc_hf")
  bert_dir = root / "tiny-bert"
  bert_cfg.save_pretrained(str(bert_dir))  # what hf_model_name names, as a local folder
  cfg = _model_cfg({"timm_pool": "avg", "timm_proj": "mlp"},
                   {"hf_model_name": "tiny-bert", "hf_tokenizer_name": "tiny-bert",
                    "hf_proj_type": "mlp", "hf_pooler_type": "cls_last_hidden_state_pooler",
                    "context_length": 16})
  path = ref_lib.save_open_clip_folder(model, root / "ckpt", cfg)
  os.rename(str(bert_dir), os.path.join(path, "tiny-bert"))
  return path, model


@pytest.fixture(scope="module")
def siglip_dir(tmp_path_factory):
  torch.manual_seed(2)
  config = transformers.SiglipConfig(
      text_config=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                       intermediate_size=64, vocab_size=99, max_position_embeddings=16,
                       projection_size=48),
      vision_config=dict(hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=64, image_size=32, patch_size=8))
  model = transformers.SiglipModel(config).eval()
  ref_lib.perturb_norms(model)
  with torch.no_grad():
    model.logit_scale.fill_(np.log(10.0))
    model.logit_bias.fill_(-3.0)
  path = str(tmp_path_factory.mktemp("siglip"))
  model.save_pretrained(path)
  return path, model


def _ids(lengths, max_len=16, seed=0):
  """Token ids with the EOT (98, the largest id) last, zero padding, and their mask."""
  rng = np.random.RandomState(seed)
  ids = rng.randint(3, 90, (len(lengths), max_len)).astype(np.int32)
  mask = np.zeros_like(ids)
  for i, n in enumerate(lengths):
    ids[i, n - 1], ids[i, n:], mask[i, :n] = 98, 0, 1
  return ids, mask


def _import(spec, text_max_len=16):
  cfg = hf_import.resolve_model_config({"init": spec, "image": {}, "text": {
      "max_len": text_max_len}})
  model = build_model(cfg, None)
  params = check_parity.init_params(model)
  return cfg, model, hf_import.init_from_hf(cfg, params)


def _torch(x):
  return torch.tensor(np.asarray(x))


@pytest.mark.parametrize("folder", ["native_text_dir", "hf_text_dir"])
def test_open_clip_embeddings_and_zero_shot_match(folder, request):
  path, ref = request.getfixturevalue(folder)
  cfg, model, params = _import(f"open_clip:{path}")
  images = np.random.RandomState(3).randn(3, 32, 32, 3).astype(np.float32)
  ids, mask = _ids([16, 9, 4])
  g, u = check_parity.embed(model, params, images, ids, mask)
  with torch.no_grad():
    ref_g = ref.encode_image(_torch(images.transpose(0, 3, 1, 2))).numpy()
    ref_u = ref.encode_text(_torch(ids).long()).numpy()
  np.testing.assert_allclose(g, ref_g, atol=ATOL)
  np.testing.assert_allclose(u, ref_u, atol=ATOL)
  # Zero-shot logits s * cos(image, text), s from the checkpoint.
  norm = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)
  ours = float(model.apply(params, method="get_logit_scale")) * norm(g) @ norm(u).T
  theirs = np.exp(2.3) * norm(ref_g) @ norm(ref_u).T
  np.testing.assert_allclose(ours, theirs, atol=1e-3)
  assert not np.allclose(ours, ours[:, :1])  # the logits discriminate


def test_open_clip_preprocess_and_tokenizer(native_text_dir, hf_text_dir):
  from hica_jax.data import preprocess
  from hica_jax.models import open_clip_import
  path, _ = native_text_dir
  mean, std = preprocess.normalization("auto", {"init": f"open_clip:{path}"})
  assert mean == (0.1, 0.2, 0.3) and std == (0.4, 0.5, 0.6)
  # open_clip's own text tower keeps its BPE in the package, not the folder:
  # no tokenizer path (the run trains one on the corpus, with a warning).
  assert open_clip_import.tokenizer_path(f"open_clip:{path}") is None
  path, _ = hf_text_dir
  assert preprocess.normalization("auto", {"init": f"open_clip:{path}"})[0] == \
      open_clip_import.OPENAI_MEAN
  cfg = hf_import.resolve_model_config({"init": f"open_clip:{path}"})
  assert cfg["image"]["pool"] == "gap" and not cfg["image"]["ln_after_pool"]
  assert cfg["text_proj"] == dict(kind="mlp", hidden=(32 + EMBED) // 2, bias=False,
                                  hidden_bias=False, act="gelu")


def test_open_clip_errors_name_the_tensor(native_text_dir, tmp_path):
  path, _ = native_text_dir
  sd = torch.load(os.path.join(path, "open_clip_pytorch_model.bin"))
  sd["visual.trunk.blocks.1.attn.extra.weight"] = torch.ones(3, 4)
  broken = ref_lib.save_open_clip_folder(torch.nn.Module(), tmp_path / "broken", {})
  torch.save(sd, os.path.join(broken, "open_clip_pytorch_model.bin"))
  with open(os.path.join(path, "open_clip_config.json")) as f, \
      open(os.path.join(broken, "open_clip_config.json"), "w") as g:
    g.write(f.read())
  with pytest.raises(ValueError, match=r"visual\.trunk\.blocks\.1\.attn\.extra\.weight \(3, 4\)"):
    _import(f"open_clip:{broken}")


def test_siglip_embeddings_logits_and_bias(siglip_dir):
  path, ref = siglip_dir
  cfg, model, params = _import(f"hf:{path}")
  assert cfg["image"]["pool"] == "map" and cfg["embed_dim"] == 48
  images = np.random.RandomState(4).randn(2, 32, 32, 3).astype(np.float32)
  ids, mask = _ids([16, 7, 3], seed=5)
  g, u = check_parity.embed(model, params, images, ids, mask)
  with torch.no_grad():
    out = ref(input_ids=_torch(ids).long(), pixel_values=_torch(images.transpose(0, 3, 1, 2)))
  np.testing.assert_allclose(g, out.image_embeds.numpy() * np.linalg.norm(g, axis=1,
                                                                          keepdims=True),
                             atol=ATOL)
  with torch.no_grad():
    ref_g = ref.get_image_features(pixel_values=_torch(images.transpose(0, 3, 1, 2)))
    ref_u = ref.get_text_features(input_ids=_torch(ids).long())
  ref_g = getattr(ref_g, "pooler_output", ref_g).numpy()
  ref_u = getattr(ref_u, "pooler_output", ref_u).numpy()
  np.testing.assert_allclose(g, ref_g, atol=ATOL)
  np.testing.assert_allclose(u, ref_u, atol=ATOL)
  norm = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)
  s = float(model.apply(params, method="get_logit_scale"))
  b = float(model.apply(params, method="get_logit_bias"))
  assert b == pytest.approx(-3.0) and s == pytest.approx(10.0, rel=1e-6)
  np.testing.assert_allclose(s * norm(u) @ norm(g).T + b, out.logits_per_text.numpy(),
                             atol=1e-3)


def test_check_parity_cli_on_siglip(siglip_dir, capsys):
  path, _ = siglip_dir
  assert check_parity.main(["--init", f"hf:{path}"]) == 0
  out = capsys.readouterr().out
  assert "fixed token ids" in out and "image tower: max |flax - torch|" in out
  assert check_parity.main(["--init", f"hf:{path}", "--tol", "0"]) == 1


def _main_tail(init, tmp_path, extra=()):
  import subprocess
  import sys
  cmd = [sys.executable, "-m", "hica_jax.main", "--config", "configs/chestxray_fewshot.py:tiny",
         f"--config.model.init={init}", "--config.stages=('stage2',)",
         "--config.stage2.init=model", "--config.stage2.steps=2",
         f"--workdir={tmp_path}", *extra]
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ, PYTHONPATH=root, JAX_PLATFORMS="cpu")
  r = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  print(f"--- {init} ---\n" + "\n".join(r.stderr.splitlines()[-12:]))
  return r.stderr


@pytest.mark.slow
def test_tiny_main_from_open_clip_and_siglip(hf_text_dir, siglip_dir, tmp_path):
  """A stage-2 `:tiny` run starts from an open_clip folder (with tokenizer) and from a
  SigLIP folder with the sigmoid global loss."""
  path, _ = hf_text_dir
  vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(94)]
  tok_dir = os.path.join(path, "tiny-bert")
  with open(os.path.join(tok_dir, "vocab.txt"), "w") as f:
    f.write("\n".join(vocab) + "\n")
  transformers.BertTokenizerFast(os.path.join(tok_dir, "vocab.txt")).save_pretrained(tok_dir)
  log = _main_tail(f"open_clip:{path}", tmp_path / "oc")
  assert "stage2" in log
  spath, _ = siglip_dir
  transformers.BertTokenizerFast(os.path.join(tok_dir, "vocab.txt")).save_pretrained(spath)
  log = _main_tail(f"hf:{spath}", tmp_path / "sig", ["--config.stage2.loss.global_form=sigmoid"])
  assert "stage2" in log


def real_open_clip():
  """open_clip and timm, where installed (torchvision stubbed if it does not import)."""
  import importlib.util
  if not (importlib.util.find_spec("open_clip") and importlib.util.find_spec("timm")):
    pytest.skip("open_clip / timm not installed (the compact reference stands in)")
  try:
    import torchvision  # noqa: F401
  except Exception:  # pylint: disable=broad-except
    import torchvision_stub
    torchvision_stub.install()
  import open_clip
  import timm
  from timm.models import vision_transformer as vt
  if TIMM_NAME not in timm.list_models(TIMM_NAME):
    @timm.models.register_model
    def vit_base_patch8_32(pretrained=False, **kwargs):  # noqa: ARG001
      return vt._create_vision_transformer(  # pylint: disable=protected-access
          TIMM_NAME, pretrained=False, **dict(dict(
              img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=12, mlp_ratio=4 / 3),
              **kwargs))
  return open_clip


@pytest.mark.parametrize("folder", ["native_text_dir", "hf_text_dir"])
def test_compact_reference_is_open_clip(folder, request, monkeypatch):
  """The real open_clip loads the compact reference's folder with strict key matching and
  embeds as the reference does (runs where open_clip and timm are installed)."""
  open_clip = real_open_clip()
  path, ref = request.getfixturevalue(folder)
  monkeypatch.chdir(path)  # hf_model_name is a folder relative to the checkpoint
  model = open_clip.create_model(f"local-dir:{path}", pretrained=None).eval()
  sd = torch.load(os.path.join(path, "open_clip_pytorch_model.bin"))
  model.load_state_dict(sd, strict=True)
  images = torch.tensor(np.random.RandomState(6).randn(2, 3, 32, 32).astype(np.float32))
  ids = _torch(_ids([16, 5])[0]).long()
  with torch.no_grad():
    np.testing.assert_allclose(model.encode_image(images), ref.encode_image(images), atol=1e-5)
    np.testing.assert_allclose(model.encode_text(ids), ref.encode_text(ids), atol=1e-5)
  # And the user-facing check, against the real open_clip, passes.
  diffs = check_parity.check(f"open_clip:{path}")
  assert max(diffs.values()) < ATOL, diffs

"""The whole config is checked before any work, each message naming the
field, the value and what is allowed; data sets too small for the config
fail at start, naming the folder."""
import pytest

from hica_jax import base_config
from hica_jax import testing
from hica_jax import config_validation as cv
from hica_jax import stages as stages_lib


@pytest.mark.parametrize("family", ["chestxray", "busi"])
@pytest.mark.parametrize("arg", ["", "tiny", "tiny,study", "study", "minilm"])
def test_every_shipped_config_is_valid(family, arg):
  cv.validate(testing.config(family, arg), num_devices=8)


@pytest.mark.parametrize("field,value,allowed", [
    ("stage2.loss.local_mode", "foo", "choose one of ['roi', 'attention']"),
    ("stage2.loss.phrases", "all", "choose one of ['roi', 'class']"),
    ("stage2.loss.phrases", "class", "set --config.stage2.loss.local_mode="
     "attention"),
    ("stage2.batch_size", 0, "use an integer >= 1"),
    ("stage2.batch_size", 12, "divisible by the 8 data-parallel devices"),
    ("stage1.batch_size", 20, "divisible by the 8 data-parallel devices"),
    ("eval.batch_size", 4, "divisible by the 8 data-parallel devices"),
    ("eval.shots", (0,), "every K must be an integer >= 1"),
    ("stage2.shots", 0, "use an integer >= 1"),
    ("data.image_size", -32, "use an integer >= 32"),
    ("data.normalization", "clip2", "choose one of ['auto', "),
    ("data.augment.hflip", "on", "choose one of ['off', 'no_laterality'"),
    ("data.dataset", "kermani", "choose one of ['busi', 'csv', "),
    ("model.image.pool", "max", "choose one of ['cls', 'gap', 'map']"),
    ("model.image.stem", "conv2", "choose one of ['patch', 'conv']"),
    ("model.text.pool", "second", "choose one of ['cls', 'mean', 'eos'"),
    ("stage2.loss.global_form", "tanh", "choose one of ['softmax', "
     "'sigmoid']"),
    ("stage2.loss.targets", "hard", "choose one of ['multi_positive', "
     "'soft']"),
    ("eval.methods", ("hica", "pixle_probe"), "['pixle_probe'] not allowed"),
    ("eval.pixel_size", 0, "use an integer >= 1"),
    ("model.text.act", "swish", "choose one of ['gelu'"),
    ("model.dtype", "float16", "choose one of ['float32', 'bfloat16']"),
    ("model.image.heads", 5, "must divide model.image.width=32"),
    ("model.image.arch", "cnn", "choose one of ['vit', 'resnet']"),
    ("model.image.stage_depths", (1, 1), "only the resnet tower has stages"),
    ("stage1.text_objective", "mlm2", "choose one of ['mlm', 'clm']"),
    ("stage1.mlm_rate", 1.5, "< 1"),
    ("stage1.pool_fraction", 0.0, "> 0"),
    ("stage1.pool_fraction", 1.5, "<= 1"),
    ("stage1.num_clusters", 1, ">= 2"),
    ("stage2.optim.lr", 0.0, "> 0"),
    ("stage2.init", "scratch", "choose one of ['stage1', 'model']"),
    ("stage2.freeze_for", 1.5, "<= 1"),
    ("stage2.thaw_lr_scale", 0.0, "> 0"),
    ("eval.hica_freeze", ("^params/image/", "^params/(text"),
     "'^params/(text' is not a regex"),
    ("eval.hica_feature_norm", "zscore",
     "choose one of ['none', 'center', 'standardize']"),
    ("eval.hica_proj_init", "pca",
     "choose one of ['random', 'pool_pca']"),
    ("eval.hica_logit_scale", -1.0, ">= 0.0"),
    ("eval.probe_crops", (0.8, 1.2), "give side fractions in (0, 1]"),
    ("eval.probe_crops", (0.0,), "give side fractions in (0, 1]"),
    ("stage2.accum_steps", 3, "must divide stage2.batch_size=16"),
    ("sharding.preset", "zero3", "choose one of ['dp', 'fsdp']"),
    ("sharding.model_axis", 3, "must divide the 8 devices"),
    ("restart", "stage3", "out of ['stage1', 'stage2']"),
    ("restart", "stage2", "add it to config.stages"),
    ("stages", ("stage1", "stage3"), "['stage3'] not allowed; choose entries "
     "from ['stage1', 'stage2', 'eval', 'study']"),
    ("data.builder_options", "[1]", "use a JSON object"),
    ("data.synthetic.difficulty", 2.0, "<= 1"),
    ("data.stored_max_side", 16, "use 0 (store real images at full size) or "
     "an integer >= data.image_size (32)"),
    ("data.stored_max_side", -1, "or an integer >= data.image_size"),
])
def test_a_bad_value_is_named_with_what_is_allowed(field, value, allowed):
  config = testing.config("chestxray", "tiny")
  if field == "restart" and value == "stage2":
    config.stages = ("stage1",)
  *parents, leaf = field.split(".")
  node = config
  for p in parents:
    node = node[p]
  node[leaf] = value
  with pytest.raises(cv.ConfigError) as e:
    cv.validate(config, num_devices=8)
  message = str(e.value)
  assert f"config.{field}={value!r}" in message
  assert allowed in message


def test_resnet_tower_needs_a_pool_without_class_token_and_no_vit_weights():
  config = testing.config("chestxray", "tiny")
  config.model.image.arch = "resnet"
  config.model.image_init = "hf:/some/vit"
  with pytest.raises(cv.ConfigError) as e:
    cv.validate(config, num_devices=1)
  message = str(e.value)
  assert "config.model.image.pool='cls': the resnet tower has no class token" \
      in message
  assert "config.model.image_init='hf:/some/vit': pretrained image weights" \
      in message
  config.model.image.pool, config.model.image_init = "gap", ""
  cv.validate(config, num_devices=1)
  config.model.image.stage_depths = (0, 1)   # tiny: patch 8, three stages
  with pytest.raises(cv.ConfigError, match=r"give 3 block counts >= 0"):
    cv.validate(config, num_devices=1)
  config.model.image.stage_depths = (0, 1, 2)
  cv.validate(config, num_devices=1)


def test_every_problem_is_listed_at_once():
  config = testing.config("chestxray", "tiny")
  config.stage2.loss.local_mode = "foo"
  config.stage2.batch_size = 0
  config.eval.shots = (0,)
  with pytest.raises(cv.ConfigError, match="3 invalid config value"):
    cv.validate(config, num_devices=1)


def test_real_data_checks_size_and_csv_bank():
  config = testing.config("chestxray", "tiny")
  config.data.root = "/data/somewhere"
  config.data.image_size = -3
  config.data.dataset = "csv"
  with pytest.raises(cv.ConfigError) as e:
    cv.validate(config, num_devices=1)
  assert "config.data.image_size=-3: use an integer >= 1" in str(e.value)
  assert "config.data.bank=''" in str(e.value)
  assert "no built-in descriptor bank" in str(e.value)


def test_unknown_config_argument_lists_the_known_ones():
  with pytest.raises(ValueError, match=r"\['tiyn'\].*known: tiny .*minilm "
                                       r".*study"):
    testing.config("chestxray", "tiyn")


def test_bad_values_fail_in_run_before_any_work(tmp_path):
  config = testing.config("chestxray", "tiny")
  config.stage2.loss.local_mode = "foo"
  with pytest.raises(cv.ConfigError, match="local_mode"):
    stages_lib.run(config, str(tmp_path / "w"))
  assert not (tmp_path / "w").exists()


def test_classes_too_small_for_the_largest_k_name_the_folder():
  config = testing.config("chestxray", "tiny")
  config.eval.shots = (1, 4)
  counts = {"train": {"normal": 9, "pneumonia": 3, "effusion": 0},
            "test": {"normal": 2, "pneumonia": 2, "effusion": 1}}
  with pytest.raises(cv.ConfigError) as e:
    cv.validate_data(config, counts, ["normal", "pneumonia", "effusion"],
                     "/data/chest_xray")
  message = str(e.value)
  assert message.startswith("Data set at /data/chest_xray:")
  assert "class 'effusion' has no training images" in message
  assert "class 'pneumonia' has 3 training images, fewer than K=4" in message
  assert "normal" not in message
  cv.validate_data(config, counts, ["normal"], "/data/chest_xray")


@pytest.mark.parametrize("family", ["chestxray", "busi"])
@pytest.mark.parametrize("arg", ["", "study", "tiny"])
def test_real_defaults_apply_with_a_root_and_spare_command_line_fields(
    family, arg):
  config = testing.config(family, arg)
  assert base_config.resolve_real_defaults(config) == {}  # no root: synthetic
  assert config.stage1.image_objective == "deepcluster"
  steps, wd = config.stage1.steps, config.stage1.optim.weight_decay
  config.data.root = "/data/somewhere"
  explicit = {"stage1.optim.weight_decay"}
  applied = base_config.resolve_real_defaults(config, explicit)
  assert config.stage1.image_objective == "swav"
  assert config.stage1.steps == config.real.stage1.steps
  assert ("stage1.steps" in applied) == (steps != config.real.stage1.steps)
  assert config.stage1.optim.weight_decay == wd  # given on the command line
  assert "stage1.optim.weight_decay" not in applied
  assert config.name.endswith("_real") and config.data.unseen == ""
  assert config.stage2.freeze == ("^params/text/",)
  cv.validate(config, num_devices=8)
  # A resumed run resolves to the same config.
  assert base_config.resolve_real_defaults(config, explicit) == {}


def test_chest_xrays_default_to_the_resnet_held_in_hica_runs():
  """Kermany runs the ResNet, held in HiCA's few-shot runs; BUSI the ViT;
  a command line that names the architecture keeps the tower's shape and
  trains it."""
  synthetic = testing.config("chestxray", "").model.image
  config = testing.config("chestxray", "")
  config.data.root = "/data/chest_xray"
  base_config.resolve_real_defaults(config)
  image = config.model.image
  assert (image.arch, image.pool, image.depth) == ("resnet", "gap", 1)
  assert config.eval.hica_freeze == ("^params/image/",)
  assert config.eval.hica_logit_scale == 3.0
  cv.validate(config, num_devices=1)
  busi = testing.config("busi", "")
  busi.data.root = "/data/Dataset_BUSI_with_GT"
  base_config.resolve_real_defaults(busi)
  assert busi.model.image.arch == "vit" and busi.eval.hica_freeze == ()
  assert busi.eval.hica_logit_scale == 0.0
  vit = testing.config("chestxray", "")
  vit.data.root = "/data/chest_xray"
  applied = base_config.resolve_real_defaults(vit, {"model.image.arch"})
  assert vit.model.image.to_dict() == synthetic.to_dict()
  assert not any(f.startswith(base_config.ARCH_BOUND_FIELDS)
                 for f in applied)
  assert vit.eval.hica_freeze == () and vit.eval.hica_logit_scale == 0.0
  # A pretrained checkpoint brings its own tower (and trains it).
  clip = testing.config("chestxray", "")
  clip.data.root = "/data/chest_xray"
  clip.model.init = "hf:/models/clip-vit-base-patch16"
  base_config.resolve_real_defaults(clip, {"model.init"})
  assert clip.model.image.arch == "vit" and clip.eval.hica_freeze == ()


def test_a_real_default_that_is_no_config_field_is_named():
  config = testing.config("busi", "tiny")
  config.data.root = "/data/somewhere"
  with config.real.stage1.unlocked():
    config.real.stage1.stepz = 5
  with pytest.raises(ValueError, match=r"config\.real\.stage1\.stepz"):
    base_config.resolve_real_defaults(config)


def test_class_phrases_need_bank_phrases_for_two_classes():
  """Kermany's bank has phrases for pneumonia only: under phrases='class'
  every example of the local term would be a positive of every other, so
  the run fails at start; BUSI's (benign, malignant) passes."""
  from hica_jax.data import descriptors  # pylint: disable=g-import-not-at-top
  config = testing.config("chestxray", "")
  config.stage2.loss.update(dict(local_mode="attention", phrases="class"))
  kermany = descriptors.load_bank("kermany")
  with pytest.raises(cv.ConfigError, match=r"phrases for \['pneumonia'\]"):
    cv.validate_class_phrases(config, kermany, ["normal", "pneumonia"])
  cv.validate_class_phrases(config, descriptors.load_bank("busi"),
                            ["benign", "malignant", "normal"])
  config.stage2.loss.phrases = "roi"
  cv.validate_class_phrases(config, kermany, ["normal", "pneumonia"])
  config.stages = ("stage1", "stage2", "study")
  config.study.sweep = ("cross_weight=1.0",
                        "local_mode=attention, phrases=class")
  with pytest.raises(cv.ConfigError, match="sweep entry 'local_mode=attention"):
    cv.validate_class_phrases(config, kermany, ["normal", "pneumonia"])
  busi = descriptors.load_bank("busi")
  config.stage2.loss.local_mode = "roi"
  config.study.sweep = ("phrases=class",)
  with pytest.raises(cv.ConfigError, match="add local_mode=attention"):
    cv.validate_class_phrases(config, busi, ["benign", "malignant", "normal"])

"""The run's Context (config, model, data, tokenizer, mesh) and the params
every stage starts from: fresh (optionally Hugging Face) or a finished
stage's.
"""
import dataclasses
import os

import flax
import jax
import jax.numpy as jnp
import numpy as np

from hica_jax import checkpoint as ckpt_lib
from hica_jax import distributed
from hica_jax import sharding
from hica_jax import tokenizer as tokenizer_lib
from hica_jax.data import fewshot
from hica_jax.data import pipeline
from hica_jax.data import preprocess
from hica_jax.data import text_tables
from hica_jax.models import build_model
from hica_jax.models import hf_import


@dataclasses.dataclass
class Context:
  """Everything the stages share: config, model, data, tokenizer, mesh."""
  config: object
  model_config: object              # config.model resolved against HF inits
  workdir: str
  mesh: object
  model: object
  data: pipeline.DatasetHandle
  tokenizer: object
  tables: text_tables.TextTables    # seen classes, the stage-2 task
  mean: tuple
  std: tuple

  def preprocessor(self, tables=None, train=True, class_phrases=False):
    """class_phrases: stage 2 under stage2.loss.phrases='class' only."""
    tables = tables or self.tables
    class_of = {self.data.categories.index(c): i
                for i, c in enumerate(tables.classes)}
    aug = dict(self.config.data.augment) if train else None
    return preprocess.Preprocessor(tables=tables, class_of=class_of,
                                   image_size=self.config.data.image_size,
                                   mean=self.mean, std=self.std, aug=aug,
                                   class_phrases=bool(class_phrases and train))

  def class_ids(self, classes):
    return [self.data.categories.index(c) for c in classes]

  def param_shardings(self, params):
    """Shardings of a param tree under config.sharding's rules."""
    sc = self.config.get("sharding")
    return sharding.param_shardings(
        params, self.mesh, sharding.config_rules(sc),
        sc.fsdp_min_size if sc is not None else 2**12)

  def max_nonfinite(self):
    train = self.config.get("train")
    return int(train.max_nonfinite) if train is not None else 0

  def desc_arrays(self, tables=None):
    tables = tables or self.tables
    return sharding.replicate({"ids": tables.desc_ids,
                               "mask": tables.desc_mask,
                               "category": tables.desc_category}, self.mesh)

  def support_indices(self, shots, seed):
    """Train-split records a run learns from: a class-balanced K-shot
    support set of the seen classes (seeded), or all of them (shots None)."""
    source = self.data.source("train")
    seen_ids = self.class_ids(self.data.seen)
    if not shots:
      return source.indices_of(seen_ids)
    return np.asarray(fewshot.sample_support(source.labels(), shots, seed,
                                             classes=seen_ids))


def setup_tokenizer(config, model_config, workdir, bank):
  """The run's tokenizer: a HF folder, or WordPiece trained on the corpus.

  A text tower initialised from Hugging Face brings its own tokenizer. A
  trained vocabulary is saved in the workdir so checkpoints stay usable.
  """
  path = config.tokenizer.path or hf_import.hf_tokenizer_path(model_config)
  if path:
    return tokenizer_lib.load_tokenizer(path)
  out = os.path.join(workdir, "tokenizer")
  if os.path.exists(os.path.join(out, "tokenizer.json")):
    return tokenizer_lib.load_tokenizer(out)
  corpus = text_tables.text_corpus(bank)
  # A checkpoint's text tower fixes the vocabulary it can embed.
  vocab = min(int(config.tokenizer.vocab_size),
              int(model_config.text.get("vocab_size") or 2**31))
  return tokenizer_lib.train_wordpiece(corpus, out, vocab_size=vocab)


def build_context(config, workdir, mesh=None):
  """The run's Context; `mesh` defaults to every device (config.sharding)."""
  if mesh is None:
    sc = config.get("sharding")
    mesh = sharding.make_mesh(model_axis=sc.model_axis if sc else 1)
  data_dir = config.data.data_dir or os.path.join(workdir, "data")

  def open_data():
    data = pipeline.open_dataset(config.data, data_dir)
    data.split_counts()   # writes the per-split label caches once
    return data

  data = distributed.leader_first(open_data, "data")
  # A tower initialised from Hugging Face takes its architecture from there.
  model_config = hf_import.resolve_model_config(config.model)
  tok = distributed.leader_first(
      lambda: setup_tokenizer(config, model_config, workdir, data.bank),
      "tokenizer")
  model = build_model(model_config, tokenizer_lib.vocab_size(tok))
  tables = text_tables.build_text_tables(
      data.bank, data.seen, tok, model_config.text.max_len,
      config.data.max_phrase_len)
  mean, std = preprocess.normalization(config.data.normalization, model_config)
  return Context(config=config, model_config=model_config,
                           workdir=workdir, mesh=mesh,
                           model=model, data=data, tokenizer=tok,
                           tables=tables, mean=mean, std=std)


def init_params(ctx, key):
  """Fresh model params, optionally initialised from Hugging Face weights."""
  size = ctx.config.data.image_size
  images = jnp.zeros((1, size, size, 3))
  ids = jnp.zeros((1, ctx.model_config.text.max_len), jnp.int32)
  params = jax.jit(ctx.model.init)(key, images, ids, jnp.ones_like(ids))
  params = flax.core.unfreeze(params)
  if ctx.config.stage2.loss.get("global_form") == "sigmoid":  # SigLIP's s = 10
    params["params"]["logit_scale"] = jnp.full((), np.log(10.0), jnp.float32)
  return hf_import.init_from_hf(ctx.model_config, params)


def load_final_params(ctx, stage):
  """Model params from a stage's final checkpoint (None if not finished)."""
  if not ckpt_lib.is_final(ctx.workdir, stage):
    return None
  params = ckpt_lib.restore_params(ckpt_lib.manager(ctx.workdir, stage),
                                   ctx.param_shardings)
  return params["model"] if stage == "stage1" else params



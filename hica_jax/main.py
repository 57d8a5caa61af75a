r"""Runs HiCA: the stages named in config.stages, then writes the report.

  python -m hica_jax.main --config configs/chestxray_fewshot.py \
      [--workdir runs/chestxray_fewshot] [--config.stage2.steps=500]

The stages are in hica_jax/stages.py. SIGTERM checkpoints and exits with
status 0 (rerun to resume). Multi-process runs (launch/) start one such
process per host or accelerator; process 0 logs and writes the reports.
"""
import contextlib
import os

import jax
from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from hica_jax import distributed
from hica_jax import stages
from hica_jax import workdir as workdir_lib
from hica_jax.training import loop

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Path to a config file (configs/*.py[:arg]).",
    lock_config=True)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Output folder; default runs/<config.name>.")
_DISTRIBUTED = flags.DEFINE_enum(
    "distributed", "auto", ["auto", "on", "off"],
    "Multi-process init through jax.distributed.initialize(): 'auto' when the "
    "environment names several processes (JAX_NUM_PROCESSES, SLURM, TPU "
    "pod), 'on' always, 'off' never.")
flags.mark_flags_as_required(["config"])


def enable_compilation_cache(path=None):
  """Persistent XLA cache: repeated runs skip most compilation (minutes on
  a small CPU machine). HICA_COMPILATION_CACHE=off disables it."""
  path = path or os.environ.get(
      "HICA_COMPILATION_CACHE",
      os.path.join(os.path.expanduser("~"), ".cache", "hica_jax", "xla"))
  if path == "off":
    return
  jax.config.update("jax_compilation_cache_dir", path)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


class _QuietLibraries:
  """Drops INFO chatter of orbax/tfds/grain from the log; warnings stay."""
  NOISY = ("/orbax/", "/tensorflow_datasets/", "/grain/", "/absl/")

  def filter(self, record):
    return record.levelno >= 30 or not any(
        n in record.pathname for n in self.NOISY)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  logging.get_absl_handler().addFilter(_QuietLibraries())
  enable_compilation_cache()
  config = _CONFIG.value
  distributed.initialize_distributed(_DISTRIBUTED.value)
  if jax.process_index() != 0:
    logging.set_verbosity(logging.WARNING)
  # SIGTERM outside a training loop also ends the run cleanly (several
  # processes leave SIGTERM to JAX's preemption service).
  on_sigterm = (workdir_lib.sigterm_raises(lambda: loop.Preempted(
      "Stopped by SIGTERM outside a training loop (nothing new to save); "
      "rerun the same command to resume.")) if jax.process_count() == 1
                else contextlib.nullcontext())
  try:
    with on_sigterm:
      # Fields given as --config.* keep their values over config.real's.
      explicit = config_flags.get_override_values(flags.FLAGS["config"])
      stages.run(config, _WORKDIR.value, explicit=explicit)
  except loop.Preempted as e:
    # A clean exit: the checkpoint is durable and a rerun resumes from it.
    logging.warning("%s", e)


if __name__ == "__main__":
  app.run(main)

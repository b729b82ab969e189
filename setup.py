"""simjax: one-step diffusion distillation with Score Implicit Matching, in JAX."""
import re
from pathlib import Path

from setuptools import find_packages, setup

_version = re.search(r'__version__ = "([^"]+)"', Path(__file__).with_name("simjax").joinpath("__init__.py").read_text()).group(1)

setup(
    name="simjax",
    version=_version,
    description="Score Implicit Matching (SIM) distillation of diffusion models into one-step generators, in JAX/Flax.",
    long_description=Path(__file__).with_name("README.md").read_text(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11,<3.13",
    packages=find_packages(include=["simjax", "simjax.*"]),
    # Ranges are the ones tested together (see README); upper bounds guard against API breaks.
    install_requires=[
        "jax>=0.10.2,<0.11",
        "jaxlib>=0.10.2,<0.11",
        "flax>=0.12.8,<0.13",
        "optax>=0.2.8,<0.3",
        "orbax-checkpoint>=0.12.8,<0.13",
        "chex>=0.1.92,<0.2",
        "ml_collections>=1.1.0,<1.2",
        "absl-py>=2.5.1,<3",
        "etils[epath]>=1.15",
        "numpy>=2.0,<3",
        "ml_dtypes>=0.5",  # bfloat16 tensors in PyTorch files (also a jax dependency)
        "pillow>=10.0",
        # TensorBoard event files (writing only; the viewer is `pip install tensorboard`).
        "tensorboardX>=2.6.4,<2.7",
        # The embedded default trains on the 8x8 digits that ship inside scikit-learn.
        "scikit-learn>=1.5,<2",
        "scipy>=1.11",  # sqrtm for Frechet distances
        "safetensors>=0.4",  # diffusers / transformers weight files, read without torch
    ],
    extras_require={
        # The test extra carries the parity extra so the tests against PyTorch references run, not skip;
        # pytest-xdist runs the suite on two workers (pytest.ini), one per core of a 2-core machine.
        "test": ["pytest>=8.0", "pytest-xdist>=3.5", "torch>=2.13,<2.15", "diffusers>=0.42,<0.43",
                 "transformers>=5.0,<6", "sentencepiece>=0.2", "gcsfs>=2024.2", "tensorflow-datasets>=4.9.10,<4.10"],
        # Reference PyTorch implementations (random weights only) for the parity tests: EDM's files are
        # written with torch; PixArt, DiT, T5 and the VAE are diffusers' / transformers' modules.
        "parity": ["torch>=2.13,<2.15", "diffusers>=0.42,<0.43", "transformers>=5.0,<6"],
        # CIFAR-10 configs: the dataset through `tfds.data_source` (array_record; no TensorFlow).
        "cifar10": ["tensorflow-datasets>=4.9.10,<4.10"],
        # T5's sentencepiece tokenizer (a user's spiece.model); the byte-level tokenizer needs nothing.
        "text": ["sentencepiece>=0.2"],
        # gs:// workdirs: etils' object-store backend (checkpoints go through orbax/tensorstore directly).
        "gcs": ["gcsfs>=2024.2"],
    },
)

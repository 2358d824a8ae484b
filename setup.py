"""Packaging for the Triton-accelerated Wanda pruning engine."""

from setuptools import find_packages, setup

setup(
    name="wanda-kernels",
    version="0.1.0",
    description="Triton-accelerated LLM pruning (Wanda, SparseGPT, magnitude) with 2:4 sparse inference",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["wanda_kernels", "wanda_kernels.*", "pruning", "pruning.*"]),
    package_data={"pruning": ["assets/*"]},
    install_requires=[
        # Not pinned: GPU users keep the CUDA build of torch they already have. Tested: torch 2.11 and 2.13,
        # triton 3.6 and 3.9, transformers 5.17 and 5.24 (CI runs both stacks).
        "torch>=2.5",  # torch.OutOfMemoryError
        "triton",
        "transformers>=5.17",  # its cache layers, masks and rope_parameters, which the runners and llama2c use
        "tokenizers",
        "accelerate",
        "datasets",
        "safetensors",
        "tqdm",
        "gguf",  # --model FILE.gguf (transformers dequantizes it on load)
    ],
    extras_require={
        "dev": ["pytest", "pytest-benchmark", "ruff", "hypothesis", "matplotlib"],
        "eval": ["lm-eval>=0.4"],
        "plot": ["matplotlib"],  # --plot, wanda-prune report --plot
    },
    entry_points={"console_scripts": ["wanda-prune = pruning.cli:main"]},
)

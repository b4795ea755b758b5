"""Packaging for zhllama: the Chinese-LLaMA recipe in plain PyTorch.

`pip install -e .` makes the top-level packages `model`, `tokenizer`, `data`, `train` and
`kernels` importable from anywhere, so scripts such as `torchrun train/pretrain.py cfg.yaml`
need no path hacks, and installs the `zhllama` command (train/cli.py), which a user's own
data/ or model/ folder cannot shadow as it can `python -m data.prepare`.
"""

from setuptools import find_packages, setup

setup(
    name="zhllama",
    version="0.1.0",
    description="Teach LLaMA Chinese: vocabulary, continued pretraining, LoRA, SFT, export.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["model*", "tokenizer*", "data*", "train*", "kernels*"]),
    entry_points={"console_scripts": ["zhllama = train.cli:main"]},
    install_requires=[
        # GPU users bring their own torch build; CPU installs pin it (see Makefile).
        "torch>=2.6",
        "sentencepiece>=0.2",
        # sentencepiece's bundled model proto (sentencepiece_model_pb2) needs this protobuf.
        "protobuf>=7.36.1",
        "safetensors>=0.4",
        "numpy>=1.24",
        "tqdm>=4.60",
        "pyyaml>=6.0",
    ],
    extras_require={
        # llama.cpp's own GGUF reader/writer, for `--to gguf` / `--output_type gguf`
        "gguf": ["gguf>=0.10"],
        # loss.png beside every run's metrics.jsonl, and `zhllama plot` (train/plot.py)
        "plot": ["matplotlib>=3.7"],
        # `log.tensorboard: true`: scalars through torch.utils.tensorboard, which needs it
        "tensorboard": ["tensorboard>=2.14"],
        # model.quantize: nf4 (QLoRA, torchao's NF4Tensor, as torchtune uses) and
        # optim.name: adamw8bit (torchao's 8-bit AdamW)
        "torchao": ["torchao>=0.18"],
        # `zhllama self-instruct`: the official client for any OpenAI-compatible endpoint
        # (its ROUGE-L is our own, tested equal to the rouge-score package's, in "test")
        "instruct": ["openai>=1.0"],
        # `zhllama serve` runs on the standard library's HTTP server: nothing to add; the
        # extra exists so that `pip install zhllama[serve]` works as documented
        "serve": [],
        # real reference implementations the tests compare against, and the optional
        # extras' libraries so that their tests run
        "test": ["pytest>=7", "pytest-xdist>=3", "transformers>=4.45", "peft>=0.13", "gguf>=0.10",
                 "matplotlib>=3.7", "tensorboard>=2.14", "torchao>=0.18", "openai>=1.0", "rouge-score>=0.1.2"],
        # llama.cpp itself, to prove our GGUF files run there (built from source by pip)
        "llamacpp": ["llama-cpp-python>=0.3"],
    },
)

from setuptools import setup

setup(
    name="curriculum-pretrain",
    version="0.1.0",
    description="Pretrain GPT/Llama-style models on DeepSpeed with a per-stage sequence-length curriculum",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=["curriculum", "curriculum.recipes", "pipeline", "ds_configs"],
    package_data={"curriculum.recipes": ["*.yaml"], "ds_configs": ["*.json"], "pipeline": ["csrc/*.cpp"]},
    install_requires=[
        # install torch first (CPU machines: pip install torch==2.13.0); any 2.x from 2.4 on works
        "torch>=2.4",
        "deepspeed>=0.19.8,<0.20",  # the tested range: pipeline/engine.py lists the internals it depends on
        "transformers>=4.46",
        "datasets>=3.0",
        "tokenizers>=0.20",
        "pydantic>=2.6",
        "pyyaml>=6.0",
        "numpy>=1.26",
        "pyarrow>=15",
        "tqdm>=4.66",
        "matplotlib>=3.8",
        "tensorboard>=2.15",
    ],
    extras_require={
        "gpu": ["liger-kernel>=0.5"],
        "wandb": ["wandb>=0.17"],
        # accelerate: the HF Trainer needs it, and the tests train one to give diagnose and doctor its files
        "dev": ["pytest>=8", "pytest-xdist>=3", "hypothesis>=6.100", "wandb>=0.17", "accelerate>=0.26"],
    },
    entry_points={"console_scripts": ["curriculum-pretrain = pipeline.cli:main"]},
)

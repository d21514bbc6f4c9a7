# Sourced by the launch scripts: the config to train and where runs and compiled extensions go.
# CONFIG: a recipe name or YAML path (default gpt2-124m-curriculum). Extra arguments go to the trainer,
# e.g. --set curriculum.base_lr=3e-4 --output-dir runs/my-run --resume auto.
CONFIG="${CONFIG:-gpt2-124m-curriculum}"
# DeepSpeed's op builder cannot parse arch suffixes such as 9.0a; the trainer strips them too.
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-}"
# JIT-built ops (FusedAdam, CPUAdam) are cached here and reused by every later run.
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$HOME/.cache/torch_extensions}"

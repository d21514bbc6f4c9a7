"""The training side: data preparation, the DeepSpeed config, the model, the training loop and its logging."""

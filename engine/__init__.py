"""EchoFM model, losses, trainer and downstream adaptation (imports kernels and loaders)."""

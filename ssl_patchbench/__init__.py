"""patchbench: evaluate self-supervised image checkpoints with bags of patch embeddings."""

__version__ = "0.1.0"

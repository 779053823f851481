"""lmschool: train a chat language model in three stages with one readable PyTorch codebase."""

__version__ = "0.1.0"

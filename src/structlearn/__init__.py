"""structlearn: a Hydra-configured PyTorch framework for structure-learning research."""

__version__ = "0.1.0"

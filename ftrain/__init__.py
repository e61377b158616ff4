"""ftrain: fault-tolerant training for PyTorch."""

__version__ = "0.1.0"

"""diffrl-bench: head-to-head RL for text-to-image flow models."""
__version__ = "0.1.0"

"""distreg: distributed training with distributed-aware regularization hooks."""
__version__ = "0.1.0"

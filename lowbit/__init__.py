"""lowbit: trace a PyTorch model to torch.fx, rewrite it with passes, compile it to a backend."""

__version__ = "0.1.0"

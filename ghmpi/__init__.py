"""ghmpi: offline LLM batch inference over MPI, attention offloaded from GPUs to CPU ranks."""

__version__ = "0.1.0"

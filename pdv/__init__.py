"""pdv (pipeDejavu): profile real hardware, plan hybrid-parallel training on it, run the plan."""

__version__ = "0.1.0"
__all__ = ["__version__"]

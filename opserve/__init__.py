"""opserve: a Triton-compatible inference server whose custom operations live with their models."""

__version__ = "0.1.0"
__all__ = ["__version__"]

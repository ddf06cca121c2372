"""skquant: supervised deep quantization for fast, compact similarity search."""

__version__ = "0.1.0.dev0"

__all__ = ["__version__"]

"""The skquant version, in a module of its own: the package's modules read it
(pickles record it) without importing the package that imports them."""

__version__ = "0.1.0.dev0"

"""The library's version, in a module of its own so that modules can name it (in anchor
file metadata) without importing the package ``__init__``."""

__version__ = "0.1.0"

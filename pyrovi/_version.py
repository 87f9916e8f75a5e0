"""pyrovi's version, in a module of its own so that the package's modules can import it."""

__version__ = "0.2.0"

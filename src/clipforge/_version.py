"""The package version, in a module of its own so that modules writing it into files need not import the package
root (which imports them)."""

__version__ = "0.1.0"

"""The version, for the package root and for the engine (which must not import the root)."""
__version__ = "0.1.0"

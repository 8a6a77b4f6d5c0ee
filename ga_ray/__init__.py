"""ga-ray: Gradient Atoms on Ray."""

__version__ = "0.1.0"

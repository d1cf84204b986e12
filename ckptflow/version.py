"""ckptflow's version, importable without the package root (manifest.py and tasks read it)."""
__version__ = "0.1.0"

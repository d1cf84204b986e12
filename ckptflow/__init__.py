"""ckptflow: checkpoint stages of an LLM fine-tuning run."""
__version__ = "0.1.0"

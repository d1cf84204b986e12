"""ckptflow: checkpoint stages of an LLM fine-tuning run."""
from ckptflow.version import __version__  # noqa: F401  (one place for the version)


def __getattr__(name):
    # load/save import torch; keep `import ckptflow` light until they are used.
    if name in ("load", "save", "load_state_dict"):
        from ckptflow import api

        return getattr(api, name)
    raise AttributeError(name)

"""The token loss that training, evaluation and the model's chunked loss share.

    labels[i] = IGNORE          # ckptflow.data marks the tokens that are not targets
    cross_entropy_sum(logits, labels)   # summed over the other tokens, in float32

Importing this module does not import torch.
"""
from __future__ import annotations

IGNORE = -100   # PyTorch's default ignore_index, as transformers' labels use it


def cross_entropy_sum(logits, labels):
    """The token cross-entropy of logits [..., vocab] against labels [...], computed in float32
    and summed over the tokens whose label is not IGNORE."""
    import torch.nn.functional as F

    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1), ignore_index=IGNORE,
                           reduction="sum")

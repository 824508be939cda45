"""Sparse momentum (Dettmers & Zettlemoyer 2019): grow where an EMA of dense gradients is largest.

The reference scores growth by the optimizer's momentum buffer, which is degenerate once the
optimizer state of inactive weights is zeroed every step. Here the sparsifier keeps its own
exponential moving average of the *dense* gradients (``grad_ema_beta``, 0.9 like SGD momentum) and
grows by its magnitude. SNFS's cross-layer redistribution is not done: every layer keeps its density,
as in ITOP.
"""

from .base import MethodInfo, register_method
from .scores import grad_ema_score, magnitude_score

register_method(
    MethodInfo(
        "snfs",
        magnitude_score,
        grad_ema_score,
        "sparse momentum: drop smallest |w|, grow largest |EMA of dense grads|",
        grad_ema_beta=0.9,
        needs_grad=True,
    )
)

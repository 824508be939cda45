"""RigL (Evci et al. 2020): drop the smallest weights, grow where the dense gradient is largest."""

from .base import MethodInfo, register_method
from .scores import gradient_score, magnitude_score

register_method(
    MethodInfo(
        "rigl",
        magnitude_score,
        gradient_score,
        "RigL: drop smallest |w|, grow largest |dense grad|",
        needs_grad=True,
    )
)

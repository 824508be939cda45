"""ITOP's unfired growth (Liu et al. 2021): grow never-active weights first, maximising R_s."""

from .base import MethodInfo, register_method
from .scores import magnitude_score, unfired_score

register_method(
    MethodInfo(
        "unfired",
        magnitude_score,
        unfired_score,
        "ITOP: drop smallest |w|, grow never-active weights at random",
    )
)

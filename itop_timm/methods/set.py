"""SET (Mocanu et al. 2018): drop the smallest weights, grow at random."""

from .base import MethodInfo, register_method
from .scores import magnitude_score, random_score

register_method(MethodInfo("set", magnitude_score, random_score, "SET: drop smallest |w|, grow at random"))

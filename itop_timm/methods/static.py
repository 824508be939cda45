"""Static sparsity: a fixed random mask, no topology updates."""

from .base import MethodInfo, register_method

register_method(MethodInfo("static", None, None, "fixed random sparse mask (no topology updates)"))

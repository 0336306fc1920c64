"""Per-example gradient rules of the DP step, one module per layer family (registry.py)."""
from dpmem.models.samplers import conv, groupnorm, linear  # noqa: F401  (each registers its rule)
from dpmem.models.samplers.registry import GRAD_SAMPLERS, register, sampler_for

__all__ = ["GRAD_SAMPLERS", "register", "sampler_for"]

"""fastsr: EDSR/MDSR super-resolution, official-checkpoint compatible, with fused kernels."""
from fastsr import weights
from fastsr.models import EDSR, MDSR, count_parameters, edsr, edsr_baseline, mdsr, mdsr_baseline

__version__ = "0.1.0"
__all__ = ["EDSR", "MDSR", "count_parameters", "edsr", "edsr_baseline", "mdsr", "mdsr_baseline", "weights"]

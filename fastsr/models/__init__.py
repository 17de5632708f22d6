"""The networks: thin nn.Modules in the official layout."""
from fastsr.models.edsr import (
    EDSR,
    MDSR,
    PRESETS,
    MeanShift,
    ResBlock,
    Upsampler,
    count_parameters,
    edsr,
    edsr_baseline,
    mdsr,
    mdsr_baseline,
)

__all__ = [
    "EDSR", "MDSR", "PRESETS", "MeanShift", "ResBlock", "Upsampler", "count_parameters",
    "edsr", "edsr_baseline", "mdsr", "mdsr_baseline",
]

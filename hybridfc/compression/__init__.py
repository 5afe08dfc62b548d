"""Compressed exchanges of the backbone's gradient: top-k sparsification with error feedback.

=====================  =============================================================
module                 what it holds
=====================  =============================================================
``topk``               which entries to send (fast top-k by magnitude), the warm-up
``error_feedback``     the residual, momentum correction, the exchange of the pairs
=====================  =============================================================
"""

from hybridfc.compression.error_feedback import TopKGradientReducer
from hybridfc.compression.topk import density_at, largest_magnitudes

__all__ = ["TopKGradientReducer", "density_at", "largest_magnitudes"]

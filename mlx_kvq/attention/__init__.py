"""Attention over the quantized caches' views: ``quantized_sdpa`` dispatches to the fused
kernels, the GPU prefill path or the reference (``dispatch``)."""

from .dispatch import PATHS, packed_attention, quantized_sdpa
from .latent import latent_sdpa
from .rows import rows_sdpa
from .reference import blocked_attention, dense_attention, merge, packed_quantized_matmul, packed_reference

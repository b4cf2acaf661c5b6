"""Attention kernels: ragged paged attention as a Pallas kernel, its plain-jnp reference (the CPU
serving path), and the switch between them."""
from jaxserve.pallas_kernels.backend import attention_backend
from jaxserve.pallas_kernels.ragged_paged_attention import ragged_paged_attention
from jaxserve.pallas_kernels.reference import ragged_paged_attention_naive, ragged_paged_attention_reference

__all__ = ["attention_backend", "ragged_paged_attention", "ragged_paged_attention_naive",
           "ragged_paged_attention_reference"]

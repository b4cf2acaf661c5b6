"""Attention kernels: ragged paged attention as Pallas kernels (TPU/interpreted, GPU), as a chunked
jnp path tuned for the CPU, the dense oracle all of them are tested against, and the switch."""
from jaxserve.pallas_kernels.backend import attention_backend
from jaxserve.pallas_kernels.ragged_paged_attention import ragged_paged_attention
from jaxserve.pallas_kernels.ragged_paged_attention_gpu import ragged_paged_attention_gpu
from jaxserve.pallas_kernels.ragged_paged_attention_jnp import ragged_paged_attention_jnp
from jaxserve.pallas_kernels.reference import ragged_paged_attention_reference

__all__ = ["attention_backend", "ragged_paged_attention", "ragged_paged_attention_gpu",
           "ragged_paged_attention_jnp", "ragged_paged_attention_reference"]

"""Pre-train and fine-tune MM1-style multimodal LLMs on Megatron-Core.

Importing the package imports neither torch nor megatron-core. It only arranges that
megatron-core's fused functions are compiled on first use rather than at import
(``compat/deferred_compile.py``), which has to happen before megatron-core loads.
"""

from mm1_megatron.compat.deferred_compile import defer_megatron_compile

defer_megatron_compile()

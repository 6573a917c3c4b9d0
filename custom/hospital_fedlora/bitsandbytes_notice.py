"""Drop bitsandbytes' advice to ``pip install kernels``, which no site here needs.

bitsandbytes 0.50 imports its CPU backend on every machine, and on a CPU with AVX512-BF16 it tries to
fetch an optional fused CPU kernel for 4-bit matmuls from the Hugging Face hub; without the
``kernels`` package it logs "Failed to load CPU gemm_4bit_forward ... `pip install kernels`" and falls
back to its own CPU path. Our sites never run 4-bit on CPU (``SiteConfig`` refuses ``load_in_4bit``
without CUDA), and QLoRA on CUDA uses bitsandbytes' CUDA kernels, so the advice only misleads. The
filter drops that one record on that one logger; every other bitsandbytes message still shows.
"""

import logging

CPU_OPS_LOGGER = "bitsandbytes.backends.cpu.ops"
KERNELS_NOTICE = "Failed to load CPU gemm_4bit_forward from kernels-community"


class KernelsNoticeFilter(logging.Filter):
    """Refuses bitsandbytes' "pip install kernels" record; passes every other record."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.name == CPU_OPS_LOGGER and str(record.msg).startswith(KERNELS_NOTICE))


def silence_kernels_notice() -> None:
    """Install the filter on bitsandbytes' CPU-backend logger (once); call before bitsandbytes is imported."""
    logger = logging.getLogger(CPU_OPS_LOGGER)
    if not any(isinstance(f, KernelsNoticeFilter) for f in logger.filters):
        logger.addFilter(KernelsNoticeFilter())

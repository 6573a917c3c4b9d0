"""Federated LoRA fine-tuning of Llama-family models across hospitals, on NVIDIA FLARE.

Every FLARE component the server and the hospitals import; job configs name them by import path. The
folders say who runs what: ``site/`` at a hospital, ``server/`` at the server, ``he/`` the encrypted
path on both sides, ``deploy/`` at provisioning. ``protocol`` names what travels between them.
"""

from .bitsandbytes_notice import silence_kernels_notice

__version__ = "0.1.0"

# Before any module here imports peft (and so bitsandbytes): its CPU-kernel advice misleads every site.
silence_kernels_notice()

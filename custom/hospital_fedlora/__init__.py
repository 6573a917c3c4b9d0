"""Federated LoRA fine-tuning of Llama-family models across hospitals, on NVIDIA FLARE.

Every FLARE component the server and the sites import lives in this package; job configs name them by
import path (``hospital_fedlora.lora_executor.LoraExecutor``, ...).
"""

__version__ = "0.1.0"

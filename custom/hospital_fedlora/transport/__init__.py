"""How adapter tensors travel in plaintext jobs: quantized on the way out, restored on the way in.

``quantization`` is the numeric core (no FLARE types); ``quantize_filter`` and ``dequantize_filter`` are
the thin FLARE filters a job config names. ``docs/large-models.md`` has the modes and their measurements.
"""

"""The encrypted path. A numeric core free of FLARE (``bfv_context``, ``encoding``, ``packed_bfv``,
``wire_format``), then thin FLARE parts: the hospital's key and filters, the server's encrypted-sum
aggregator and encrypted log."""

"""Tooling around the bundle, used from a checkout and never installed at a hospital: the demo, a local
federation runner for provisioned kits, the synthetic hospital notes and the offline base model."""

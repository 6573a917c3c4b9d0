"""What runs at a hospital: the executor, its trainer, the hospital's data and base model, its privacy gate."""

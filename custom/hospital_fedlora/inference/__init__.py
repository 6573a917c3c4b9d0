"""Using the federation's result: generate with the final adapter on the base model, or merge the two into one checkpoint."""

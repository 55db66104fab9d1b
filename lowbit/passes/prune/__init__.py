"""Pruning passes: masks as annotations and buffers, and baking them in. Importing this package registers them."""

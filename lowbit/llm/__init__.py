"""Autoregressive generation for language models: prefill and decode steps with a key/value cache."""

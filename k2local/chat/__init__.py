"""Chat-level text processing: what sits between the model's decoded output and the API responses."""

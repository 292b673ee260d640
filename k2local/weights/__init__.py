"""Weights: how checkpoints store the model's tensors, and the quirks that turn what is stored into what the model
computes with (k2local.weights.sanitize). The tensor names and shapes themselves are k2local.arch's."""

"""Checkpoint -> GGUF: the converter, quantization recipes, importance matrices."""

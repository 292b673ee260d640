"""Tokenizers: Kimi's tiktoken BPE, Hugging Face tokenizer.json, and both rebuilt from GGUF metadata."""

"""offload package."""

"""k2local package."""

"""`python -m k2local.cli`."""
from k2local.cli import main

main()

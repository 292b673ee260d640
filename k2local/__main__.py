"""`python -m k2local ...`: the same as the `k2local` command."""
from k2local.cli import main

main()

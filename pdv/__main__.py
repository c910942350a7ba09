"""`python -m pdv` is the same as the `pdv` command."""

from pdv.cli import run_main

run_main()

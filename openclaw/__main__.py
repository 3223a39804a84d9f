"""`python -m openclaw` is the `openclaw` command."""

from openclaw.cli import main

main()

"""`python -m clipexport` runs the CLI."""

from clipexport.cli import main

main()

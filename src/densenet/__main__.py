"""`python -m densenet ...`: the same as the `densenet` command."""
import sys

from .cli import main

sys.exit(main())

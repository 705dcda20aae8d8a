"""`python -m densenet ...`: the same as the `densenet` command."""
import sys

try:
    from .cli import main
except KeyboardInterrupt:  # Ctrl-C before the command started: nothing was done
    print("densenet: interrupted", file=sys.stderr)
    sys.exit(130)

sys.exit(main())

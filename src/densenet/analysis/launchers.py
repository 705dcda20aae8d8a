"""Old place of densenet.grid.launchers (reproducing the paper trains models: it is not an analysis).
Importing this module gives densenet.grid.launchers itself (kept for one release: import from there)."""
import sys

from ..grid import launchers

sys.modules[__name__] = launchers

"""Old place of densenet.grid.reproduce (reproducing the paper trains models: it is not an analysis).
Importing this module gives densenet.grid.reproduce itself (kept for one release: import from there)."""
import sys

from ..grid import reproduce

sys.modules[__name__] = reproduce

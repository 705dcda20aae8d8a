"""Old place of densenet.grid.status (reproducing the paper trains models: it is not an analysis).
Importing this module gives densenet.grid.status itself (kept for one release: import from there)."""
import sys

from ..grid import status

sys.modules[__name__] = status

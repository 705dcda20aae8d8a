"""Old name of resnet.py, which now holds class ResNet, its units and the ResNet builders together.
Importing this module gives resnet.py itself (kept for one release: import from .resnet)."""
import sys

from . import resnet

sys.modules[__name__] = resnet

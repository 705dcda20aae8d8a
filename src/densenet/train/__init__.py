"""Training and evaluation with the paper's recipe: config, the loop, checkpoints, torchrun."""
from .config import TrainConfig
from .engine import TrainingStopped, evaluate, fit

__all__ = ["TrainConfig", "TrainingStopped", "evaluate", "fit"]

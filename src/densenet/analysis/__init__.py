"""The paper's analyses: complexity (parameters, multiply-adds), feature reuse, plots."""
from .complexity import count_macs, count_params, model_table

__all__ = ["count_macs", "count_params", "model_table"]

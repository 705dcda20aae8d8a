"""densenet.train.config: what TrainConfig resolves to (the first run's recipe, the paper's datasets'
rules)."""
from __future__ import annotations

from densenet.train import TrainConfig


def test_first_run_recipe_has_no_dropout_and_the_papers_datasets_keep_their_rule():
    c = TrainConfig().resolve()
    assert (c.dataset, c.augment, c.drop_rate, c.epochs) == ("digits", "none", 0.0, 30)
    assert TrainConfig(drop_rate=0.2).resolve().drop_rate == 0.2  # still a choice
    assert TrainConfig(dataset="svhn").resolve().drop_rate == 0.2
    assert TrainConfig(dataset="cifar10", augment="none").resolve().drop_rate == 0.2

"""The command line's --help (densenet.cli.build_parser): every `densenet train` option has help that
shows its default."""
from __future__ import annotations


def test_every_train_option_has_help_and_shows_its_default(capsys):
    from densenet.cli import build_parser

    parser = build_parser()
    train = parser._subparsers._group_actions[0].choices["train"]
    for action in train._actions:
        if action.option_strings and action.help is not argparse_suppress():
            assert action.help, action.option_strings
    text = train.format_help().split("options:", 1)[1]
    for flag, default in [("--lr LR", "the recipe's: 0.1"), ("--momentum MOMENTUM", "the recipe's: 0.9"),
                          ("--seed SEED", "0")]:
        block = text.split(flag, 1)[1].split("\n  --", 1)[0]
        assert f"(default: {default}" in " ".join(block.split()), flag
    assert "300 on CIFAR" in " ".join(text.split("--epochs EPOCHS", 1)[1].split("\n  --", 1)[0].split())


def argparse_suppress():
    import argparse

    return argparse.SUPPRESS

"""``lit-p3o``: a LightningCLI over every stage and data module of the library.

Configs name their classes (``class_path: lit_p3o.SFTModule``), so the same YAML files
work under any user's LightningCLI; ``lit-p3o fit --print_config`` documents every knob.
"""

from __future__ import annotations

import sys
from typing import Any

from lightning.pytorch.cli import LightningCLI


class LitP3OCLI(LightningCLI):
    """LightningCLI over any LightningModule/DataModule named by ``class_path``.

    ``data`` is optional: RL stages feed themselves from their replay buffer.
    """

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        super().__init__(model_class=None, datamodule_class=None, auto_configure_optimizers=False, **kwargs)


def main(args: list[str] | None = None) -> None:
    """Entry point of the ``lit-p3o`` console script and ``python -m lit_p3o``.

    ``lit-p3o frontier|winrate|report …`` compare finished runs, ``lit-p3o export`` turns a
    checkpoint into a transformers/peft directory
    (:mod:`lit_p3o.commands`); every other subcommand (``fit``, ``validate``, …) is LightningCLI's.
    """
    from lit_p3o.commands import COMMANDS

    argv = sys.argv[1:] if args is None else list(args)
    if argv and argv[0] in COMMANDS:
        COMMANDS[argv[0]](argv[1:])
        return
    import lit_p3o  # noqa: F401  (registers the classes' import paths for short names)

    LitP3OCLI(args=args)


if __name__ == "__main__":
    main()

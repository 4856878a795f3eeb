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

    Optimizers: every stage builds its own from its ``optimizer`` block
    (:class:`lit_p3o.OptimizerSpec`: AdamW or bitsandbytes' 8-bit/paged AdamW, warm-up,
    cosine). LightningCLI's ``--optimizer`` (any ``torch.optim`` class or import path) and
    ``--lr_scheduler`` work as in plain LightningCLI instead: they replace the stage's
    ``configure_optimizers`` (over ``model.parameters()``; frozen ones get no gradient and so
    no update; the scheduler steps once per epoch, i.e. per rollout in RL stages). Giving both
    that and the stage's ``optimizer`` block is refused, as is ``--lr_scheduler`` alone
    (LightningCLI would ignore it silently).
    """

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        super().__init__(model_class=None, datamodule_class=None, **kwargs)

    def before_instantiate_classes(self) -> None:
        config = self.config.get(str(self.subcommand), self.config)
        cli_optimizer, cli_scheduler = config.get("optimizer"), config.get("lr_scheduler")
        if cli_scheduler is not None and cli_optimizer is None:
            self.parser.error(
                "--lr_scheduler needs --optimizer; with the stage's own optimizer use "
                "model.init_args.optimizer.schedule/warmup_steps instead"
            )
        if cli_optimizer is not None and config.get("model.init_args.optimizer") is not None:
            self.parser.error(
                "--optimizer replaces the stage's `optimizer` block (model.init_args.optimizer), which "
                "would then be ignored; give one of them (e.g. add --model.init_args.optimizer null)"
            )


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

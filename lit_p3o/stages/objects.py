"""Python objects given to a stage (models, tokenizers, datasets, functions, scorers) stay out
of its hyperparameters, hence out of its checkpoints, which torch's safe loader then reads:
resuming passes the same objects to the stage again, and exporting passes them to
:func:`lit_p3o.commands.export_checkpoint`.

Objects given as constructor arguments are left out by name
(:func:`lit_p3o.models.python_objects`); an object inside a spec (a ``datasets.Dataset`` as
``RolloutSpec.prompts``) is replaced, in the saved copy of the spec only, by a note naming its
type (:func:`config_only`)."""

from __future__ import annotations

from dataclasses import fields, is_dataclass, replace
from typing import Any

from lightning.pytorch.core.mixins import HyperparametersMixin

_PLAIN = (int, float, bool, type(None))


def config_only(value: Any) -> Any:
    """``value`` as plain config: specs (dataclasses), lists, tuples and dicts rebuilt with every
    Python object inside replaced by ``"<Dataset given from Python>"`` (its type named), and
    ``str`` subclasses (a list of :class:`lit_p3o.data.prompts.Prompt`) made plain strings.
    ``value`` itself is returned when it is plain already."""
    if is_dataclass(value) and not isinstance(value, type):
        changed = {}
        for f in fields(value):
            if f.init and (clean := config_only(getattr(value, f.name))) is not getattr(value, f.name):
                changed[f.name] = clean
        return replace(value, **changed) if changed else value
    if isinstance(value, (list, tuple)):
        items = [config_only(v) for v in value]
        return type(value)(items) if any(c is not v for c, v in zip(items, value)) else value
    if isinstance(value, dict):
        entries = {k: config_only(v) for k, v in value.items()}
        return entries if any(entries[k] is not v for k, v in value.items()) else value
    if isinstance(value, str):
        return value if type(value) is str else str(value)
    if isinstance(value, _PLAIN):
        return value
    return f"<{type(value).__name__} given from Python>"


def keep_config_only(module: HyperparametersMixin) -> None:
    """After ``save_hyperparameters``: make every saved hyperparameter :func:`config_only`, in
    what checkpoints store and in what loggers record."""
    for saved in (module._hparams, module._hparams_initial):
        for name, value in saved.items():
            saved[name] = config_only(value)

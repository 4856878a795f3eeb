"""``lit-p3o export`` turns a Lightning checkpoint of any stage into a directory that plain
transformers/peft load (the trained network and its tokenizer)."""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from lightning.pytorch import LightningModule
from lightning.pytorch.cli import instantiate_module

from lit_p3o.checkpoints import _RUN_ID_KEY, RUN_MARKER, check_export_dir, read_checkpoint, run_marker
from lit_p3o.commands._common import _CommandParser
from lit_p3o.errors import ConfigError
from lit_p3o.models import has_adapters, save_pretrained
from lit_p3o.runs import OutputLock, write_error


def constructor_parameters(cls: type) -> dict[str, inspect.Parameter]:
    """``cls``'s constructor parameters, a ``**kwargs`` passed on to the parent's constructor
    (the RL stages' ``**shared``) replaced by the parent's, as the CLI reads them."""
    params: dict[str, inspect.Parameter] = {}
    for klass in cls.__mro__:
        if "__init__" not in vars(klass):
            continue
        own = list(inspect.signature(klass.__init__).parameters.values())[1:]  # without self
        variadic = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
        params.update({p.name: p for p in own if p.kind not in variadic and p.name not in params})
        if all(p.kind is not inspect.Parameter.VAR_KEYWORD for p in own):
            break
    return params


_OBJECT_ARGUMENTS = {"model", "policy", "reward_model"}
"""Required stage arguments that a Python object may have filled (then not in the hyperparameters)."""


def stage_class(hparams: Mapping[str, Any], class_path: str | None = None) -> type:
    """The stage a checkpoint was written by: ``class_path`` when given, else the one that
    LightningCLI recorded (``_class_path``), else the one of the library's stages whose
    constructor takes exactly the saved hyperparameters (or, for a checkpoint older than an
    added argument, the fewest others). The model arguments may be missing: given as Python
    objects, they were left out (:mod:`lit_p3o.stages.objects`)."""
    class_path = class_path or hparams.get("_class_path")
    if class_path is not None:
        module, _, name = class_path.rpartition(".")
        try:
            cls = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError, ValueError) as err:  # ValueError: no module part
            raise ValueError(f"{class_path} does not import ({err})") from err
        if not (isinstance(cls, type) and issubclass(cls, LightningModule)):
            raise ValueError(f"{class_path} is not a LightningModule, so it wrote no checkpoint")
        return cls
    import lit_p3o

    keys = set(hparams) - {"_instantiator"}
    fits = []
    for cls in (
        lit_p3o.SFTModule,
        lit_p3o.RewardModule,
        lit_p3o.P3OModule,
        lit_p3o.PPOModule,
        lit_p3o.OnlineDPOModule,
        lit_p3o.RLOOModule,
        lit_p3o.GRPOModule,
    ):
        params = constructor_parameters(cls)
        required = {n for n, p in params.items() if p.default is inspect.Parameter.empty} - _OBJECT_ARGUMENTS
        if required <= keys <= set(params):
            fits.append((len(set(params) - keys), cls))
    fits.sort(key=lambda fit: fit[0])
    if not fits or (len(fits) > 1 and fits[0][0] == fits[1][0]):
        names = ", ".join(cls.__name__ for _, cls in fits) or "none"
        raise ValueError(
            f"cannot tell which stage wrote this checkpoint (hyperparameters {sorted(keys)}; matching: {names}); "
            "pass --stage with its class path, e.g. --stage lit_p3o.P3OModule"
        )
    return fits[0][1]


def export_checkpoint(
    ckpt: str | Path, out: str | Path, merge: bool = False, class_path: str | None = None, **objects: Any
) -> Path:
    """Write the trained network of a Lightning checkpoint (``policy`` of SFT and RL stages,
    ``reward_model`` of the reward stage) and its tokenizer to ``out`` with
    :func:`lit_p3o.models.save_pretrained`; LoRA adapters are saved alone unless ``merge``.

    The stage is rebuilt from the checkpoint's hyperparameters, so its model sources (e.g.
    ``policy.name_or_path``) must resolve from the working directory, as in training. An RL
    stage's reward model is not rebuilt (it is not exported); PPO's value head is not exported.

    ``out`` follows the rules of ``fit``'s ``save_dir``: it must be missing, empty, or hold an
    export of the checkpoint's own run (re-exporting after more training replaces it), and it
    is locked while written. The export is marked with :data:`~lit_p3o.checkpoints.RUN_MARKER` (the
    run and the checkpoint it was made from) and replaces ``out`` whole, so a failure leaves
    the previous export as it was. Errors are :class:`~lit_p3o.errors.ConfigError` lines naming
    ``--ckpt`` or ``--out``.

    A stage built from Python objects (a ready ``policy``/``model`` and its ``tokenizer``, a
    ``critic``) has them left out of its checkpoint (:mod:`lit_p3o.stages.objects`): pass the
    same ``objects`` again, e.g. ``export_checkpoint(ckpt, out, policy=model, tokenizer=tok)``;
    from the command line such a checkpoint is refused, naming them.
    """
    import lit_p3o  # noqa: F401  (registers the checkpoint's classes as safe to unpickle)
    from lit_p3o.stages.base import RLStage

    checkpoint = read_checkpoint(ckpt, "--ckpt")
    if "hyper_parameters" not in checkpoint:
        raise ConfigError(
            f"--ckpt {ckpt}: a Lightning checkpoint without hyperparameters; it was not written by a lit-p3o stage"
        )
    source, run_id = str(Path(ckpt).expanduser().resolve()), checkpoint.get(_RUN_ID_KEY)
    writer = f"this export of {ckpt} (run {run_id or 'without an id'})"
    with OutputLock(out, "--out", f"lit-p3o export of {ckpt}"):
        check_export_dir(out, run_id, "--out", writer, checkpoint=source)
        hparams = dict(checkpoint["hyper_parameters"], **objects)
        try:
            cls = stage_class(hparams, class_path)
        except ValueError as err:
            raise ConfigError(f"{'--stage' if class_path else f'--ckpt {ckpt}'}: {err}") from err
        if issubclass(cls, RLStage):
            hparams["reward_model"] = "embedded:reviews"  # the scorer is frozen, not in the checkpoint, not exported
        params = constructor_parameters(cls)
        left_out = [n for n, p in params.items() if p.default is inspect.Parameter.empty and n not in hparams]
        if left_out:
            given = ", ".join(f"{n}=..." for n in left_out)
            raise ConfigError(
                f"--ckpt {ckpt}: {cls.__name__} was built from Python objects ({', '.join(left_out)}), which "
                f"checkpoints do not hold; export it from Python with them: "
                f"lit_p3o.commands.export_checkpoint(ckpt, out, {given}, tokenizer=...)"
            )
        try:
            if hparams.pop("_instantiator", None) is not None:  # written by LightningCLI: the parsed config
                hparams.pop("_class_path", None)
                module = instantiate_module(cls, hparams)
            else:
                module = cls(**hparams)
        except OSError as err:
            raise ConfigError(
                f"--ckpt {ckpt}: rebuilding {cls.__name__} failed; run export from the directory "
                f"training ran in ({err})"
            ) from err
        missing, unexpected = module.load_state_dict(checkpoint["state_dict"], strict=False)
        missing = [k for k in missing if not k.startswith(("reference.", "reward_model."))]
        if missing or unexpected:
            raise ConfigError(
                f"--ckpt {ckpt}: weights do not fit {cls.__name__}: missing {missing[:5]}, unexpected {unexpected[:5]}"
            )
        network = module.policy if hasattr(module, "policy") else module.reward_model
        if has_adapters(network) and not merge:
            bases = [c.base_model_name_or_path for c in network.peft_config.values()]
            if any(Path(b, "adapter_config.json").is_file() for b in bases if b):
                print(
                    f"[lit-p3o] the adapters' base {bases[0]} is itself an adapter directory; merging (peft cannot stack them)"
                )
                merge = True
        marker = {RUN_MARKER: run_marker(run_id, cls.__name__, checkpoint=source)}
        try:
            path = save_pretrained(network.eval(), module.tokenizer, out, merge=merge, extra_files=marker)
        except OSError as err:  # a full disk, a read-only directory, a file in the way
            raise write_error("--out", out, err) from err
    print(
        f"[lit-p3o] exported {cls.__name__}.{'policy' if hasattr(module, 'policy') else 'reward_model'} "
        f"of {ckpt} to {Path(path).resolve()}"
    )
    return path


def export_main(argv: Sequence[str] | None = None) -> Path:
    """``lit-p3o export --ckpt CKPT --out DIR [--merge] [--stage CLASS_PATH]``."""
    parser = _CommandParser(prog="lit-p3o export", description=export_checkpoint.__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt", required=True, type=Path, help="a Lightning checkpoint (.ckpt) of any lit-p3o stage")
    parser.add_argument(
        "--out", required=True, type=Path, help="directory to write (missing, empty, or an export of the same run)"
    )
    parser.add_argument("--merge", action="store_true", help="merge LoRA adapters into the base and save it whole")
    parser.add_argument(
        "--stage", default=None, help="the stage's class path, when it cannot be told from the checkpoint"
    )
    args = parser.parse_args(argv)
    try:
        return export_checkpoint(args.ckpt, args.out, args.merge, args.stage)
    except ConfigError as err:  # names --ckpt or --out and the file: one line, no usage
        parser.exit(2, f"{parser.prog}: error: {err}\n")

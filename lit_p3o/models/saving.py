"""Writing a trained model (or its LoRA adapters) and its tokenizer so that plain
transformers/peft load them again: :func:`save_pretrained`, used by every stage's export."""

from __future__ import annotations

import copy
import errno
import json
import logging
import os
import re
from collections.abc import Mapping
from pathlib import Path

from safetensors import SafetensorError
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from lit_p3o.models.factory import has_adapters
from lit_p3o.runs import replaced_directory

log = logging.getLogger(__name__)


def save_pretrained(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    directory: str | Path,
    merge: bool = False,
    extra_files: Mapping[str, str] | None = None,
) -> Path:
    """Write model (or its adapters) and tokenizer so plain transformers/peft load them from
    any working directory.

    LoRA adapters are saved alone when their base model can be loaded again (a hub id or a
    directory), with ``base_model_name_or_path`` made absolute when it is a local path; with
    ``merge``, or when the base was built from ``architecture`` (it exists only in memory),
    the adapters are merged into a copy that is saved whole.

    A causal LM's tokenizer is saved padding on the left, as batched ``generate()`` needs (with
    right padding HF warns and continues after the pad tokens). A reward model's keeps its
    side: HF's sequence-classification heads read the last token that is not
    ``pad_token_id``, on either side (so when pad = EOS a final EOS is not the token read), as
    :class:`lit_p3o.RewardScorer` does (:func:`lit_p3o.scoring.pooling_positions`).

    ``extra_files`` (name → text) are written beside them. The directory is written beside
    ``directory`` and then renamed into its place (:func:`lit_p3o.runs.replaced_directory`):
    a failure (a full disk) leaves the previous export whole, and files of an earlier export
    that this one does not write (full weights under new adapters) do not linger. A non-empty
    ``directory`` that holds no saved model is refused rather than replaced.
    """
    directory = Path(directory)
    _check_replaceable(directory)
    if has_adapters(model) and (merge or not all(c.base_model_name_or_path for c in model.peft_config.values())):
        log.info("saving the model with its adapters merged to %s", directory)
        model = copy.deepcopy(model).merge_and_unload()
    if _is_causal_lm(model) and tokenizer.padding_side != "left":
        tokenizer = copy.deepcopy(tokenizer)
        tokenizer.padding_side = tokenizer.init_kwargs["padding_side"] = "left"  # init_kwargs is what is saved
    with replaced_directory(directory) as staging:
        try:
            model.save_pretrained(staging)
        except SafetensorError as err:  # safetensors reports a full disk as its own error type
            code = re.search(r"\(os error (\d+)\)", str(err))
            if code is None:
                raise
            raise OSError(int(code[1]), os.strerror(int(code[1])), str(staging)) from err
        if has_adapters(model):
            _absolute_adapter_bases(staging)
        tokenizer.save_pretrained(staging)
        for name, text in (extra_files or {}).items():
            (staging / name).write_text(text, encoding="utf-8")
    return directory


def _check_replaceable(directory: Path) -> None:
    """Refuse to replace a file, or a directory of files that are no saved model."""
    if directory.exists() and not directory.is_dir():
        raise FileExistsError(errno.EEXIST, f"{directory} is a file, not a directory to save a model in")
    if (
        directory.is_dir()
        and any(directory.iterdir())
        and not any((directory / name).is_file() for name in ("config.json", "adapter_config.json"))
    ):
        raise FileExistsError(
            errno.ENOTEMPTY,
            f"{directory} holds files but no saved model (no config.json or adapter_config.json); an export "
            "replaces its directory whole, so it is not written there",
        )


def _is_causal_lm(model: nn.Module) -> bool:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return bool(getattr(base, "can_generate", lambda: False)())


def _absolute_adapter_bases(directory: Path) -> None:
    """Make ``base_model_name_or_path`` of every saved adapter config absolute when it names a
    local directory (peft records it as given, often relative to the training's cwd)."""
    for config_path in directory.rglob("adapter_config.json"):
        config = json.loads(config_path.read_text())
        base = config.get("base_model_name_or_path")
        if base and Path(base).expanduser().is_dir() and not Path(base).is_absolute():
            config["base_model_name_or_path"] = str(Path(base).expanduser().resolve())
            config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")

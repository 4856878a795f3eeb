"""The model factory: the one place that turns configuration into models.

Every stage describes its network with a :class:`ModelSpec` (a typed dataclass, so
``lit-p3o fit --print_config`` documents each field) and calls :func:`build_causal_lm`,
:func:`build_reward_model` or :func:`load_tokenizer`. Only this module knows about peft
(LoRA) and bitsandbytes (4-/8-bit weights).

Memory note on the frozen reference π_ref (:class:`FrozenReference`): with LoRA the
reference *is* the policy with its adapters switched off, so it costs no extra weights;
without LoRA it is a frozen deep copy, which doubles the weight memory of the policy.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import logging
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from lit_p3o.models.specs import LoraSpec, ModelSource, ModelSpec, QuantizationSpec
from lit_p3o.tasks import resolve_embedded

log = logging.getLogger(__name__)

_TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def as_spec(spec: ModelSource | dict[str, Any]) -> ModelSpec | nn.Module:
    """Accept plain dicts (handy outside the CLI) as well as specs; a ready model passes through."""
    if isinstance(spec, (ModelSpec, nn.Module)):
        return spec
    spec = dict(spec)
    if isinstance(spec.get("lora"), dict):
        spec["lora"] = LoraSpec(**spec["lora"])
    if isinstance(spec.get("quantization"), dict):
        spec["quantization"] = QuantizationSpec(**spec["quantization"])
    return ModelSpec(**spec)


def python_objects(**arguments: Any) -> list[str]:
    """The names of constructor arguments given as Python objects (models, tokenizers, datasets,
    functions): ``save_hyperparameters`` leaves them out, as they are neither config nor small.
    Containers count by exact type: a ``DatasetDict`` is a ``dict`` subclass, not config."""
    plain = (str, int, float, bool, type(None), ModelSpec)
    return [
        name
        for name, value in arguments.items()
        if not (isinstance(value, plain) or type(value) in (dict, list, tuple))
    ]


def load_tokenizer(
    spec: ModelSpec | nn.Module, given: PreTrainedTokenizerBase | None = None, argument: str = "model"
) -> PreTrainedTokenizerBase:
    """The tokenizer for a spec, or ``given`` (required with a ready model), with a pad token
    guaranteed (EOS when the model has none). ``argument`` names the stage's model argument in errors."""
    if isinstance(spec, nn.Module):
        _check_ready_model(spec, argument)
        if given is None:
            raise ValueError(
                f"{argument}: a ready {type(spec).__name__} was given without its tokenizer; "
                "pass the stage's `tokenizer=` argument too"
            )
    source = type(given).__name__ if given is not None else spec.tokenizer or spec.name_or_path
    field_name = "tokenizer" if given is None and spec.tokenizer else "name_or_path"  # the field the user wrote
    if given is not None:
        tokenizer = given
    elif source is None:
        raise ValueError("ModelSpec.tokenizer: required when the model is built from `architecture`")
    elif (task := resolve_embedded(source)) is not None:
        tokenizer = task.build_tokenizer()
    else:
        check_model_source(source, f"ModelSpec.{field_name}", "tokenizer")
        tokenizer = _from_pretrained(
            AutoTokenizer,
            source if Path(source, "tokenizer_config.json").is_file() else _adapter_base(source) or source,
            field_name,
            revision=spec.revision,
            trust_remote_code=spec.trust_remote_code,
        )
    if tokenizer.eos_token_id is None:
        raise ValueError(
            f"ModelSpec.{field_name}: tokenizer {source!r} has no EOS token, so responses could never end "
            "(set eos_token in its tokenizer_config.json)"
        )
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def build_causal_lm(spec: ModelSpec | nn.Module, tokenizer: PreTrainedTokenizerBase) -> PreTrainedModel:
    """A causal LM ready to train: loaded or built, then quantized/LoRA-wrapped as asked (a
    ready model is used as it is, in train mode)."""
    if isinstance(spec, nn.Module):
        return _ready(spec, tokenizer)
    model = _load_or_build(spec, tokenizer, AutoModelForCausalLM)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return _finish(spec, model, task_type="CAUSAL_LM")


def build_reward_model(
    spec: ModelSpec | nn.Module, tokenizer: PreTrainedTokenizerBase, new_head_expected: bool = False
) -> PreTrainedModel:
    """A scalar-head model (``AutoModelForSequenceClassification`` with one label).

    Initialising from a causal LM (e.g. the SFT policy) keeps its backbone and adds a new
    head, which is how reward models are usually started. The config's ``pad_token_id`` decides
    where the score is read (:func:`lit_p3o.scoring.pooling_positions`), as in transformers; a
    config without one gets the tokenizer's (EOS when it has none), as TRL sets it and as a
    ready model gets it. So training, scoring here, a ready model and a loaded one read the
    same token, and the model is saved with the pad id its tokenizer is saved with: plain
    transformers can batch-score it and TRL, which sets the config's pad id to the
    tokenizer's, reads the same token.

    ``new_head_expected`` (the reward stage, which trains the head): transformers' load report
    is not shown when all it says is that the score head is new and the LM head unused. A
    model loaded to score keeps the report, as a missing head there means untrained scores.
    """
    if isinstance(spec, nn.Module):
        return _ready(spec, tokenizer)
    with _new_head_report_hidden(new_head_expected):
        model = _load_or_build(spec, tokenizer, AutoModelForSequenceClassification, num_labels=1)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return _finish(spec, model, task_type="SEQ_CLS")


def has_adapters(model: nn.Module) -> bool:
    """True for a peft-wrapped model (its reference view is 'adapters off')."""
    return hasattr(model, "disable_adapter") and hasattr(model, "peft_config")


def disable_dropout(model: nn.Module) -> nn.Module:
    """Zero every dropout rate: RL stages need ``logp_old`` and the update's log-probs to come
    from the same deterministic function, or the trajectory ratio is noise from the start.

    Besides dropout modules this zeroes float rates that attention layers keep as plain
    attributes (Llama, Mistral, Qwen: ``self.attention_dropout``, passed to the attention
    kernel in train mode)."""
    for module in model.modules():
        if isinstance(module, nn.modules.dropout._DropoutNd):
            module.p = 0.0
        for name, value in list(vars(module).items()):
            if name.endswith("dropout") and isinstance(value, float):
                setattr(module, name, 0.0)
    return model


class FrozenReference(nn.Module):
    """π_ref as a view on the policy.

    With LoRA, calling it runs the policy with adapters disabled (no extra memory). Without
    LoRA it holds a frozen deep copy taken at construction time (twice the weights), with
    dropout disabled so that train/eval mode does not change its outputs.
    """

    def __init__(self, policy: nn.Module) -> None:
        super().__init__()
        self._policy = [policy]  # a list keeps the policy out of this module's parameters
        self.copy: nn.Module | None = None
        if not has_adapters(policy):
            self.copy = disable_dropout(copy.deepcopy(policy)).requires_grad_(False)

    @contextmanager
    def active(self) -> Iterator[nn.Module]:
        """Yield a module that computes π_ref's forward."""
        if self.copy is not None:
            yield self.copy
            return
        policy = self._policy[0]
        with policy.disable_adapter():
            yield policy


# --------------------------------------------------------------------------- internals


_ANSI_STYLE = re.compile(r"\x1b\[[0-9;]*m")
_LOAD_REPORT_LOGGER = "transformers.modeling_utils"  # where from_pretrained logs its load report


class _NewHeadReport(logging.Filter):
    """Drops transformers' load report when its only rows are a missing ``score.*`` head and an
    unexpected ``lm_head.*`` (a causal LM loaded as a sequence classifier); any other row keeps it."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = _ANSI_STYLE.sub("", record.getMessage())
        if "LOAD REPORT" not in message:
            return True
        rows = re.findall(r"^(\S+)\s*\|\s*([A-Z]+)\s*\|", message, flags=re.MULTILINE)
        expected = [
            (status == "MISSING" and key.startswith("score."))
            or (status == "UNEXPECTED" and key.startswith("lm_head."))
            for key, status in rows
        ]
        return not (rows and all(expected))


@contextmanager
def _new_head_report_hidden(active: bool) -> Iterator[None]:
    if not active:
        yield
        return
    report_filter = _NewHeadReport()
    logger = logging.getLogger(_LOAD_REPORT_LOGGER)
    logger.addFilter(report_filter)
    try:
        yield
    finally:
        logger.removeFilter(report_filter)


def _load_or_build(
    spec: ModelSpec, tokenizer: PreTrainedTokenizerBase, auto_class: Any, **head_kwargs: Any
) -> PreTrainedModel:
    dtype = _DTYPES[spec.dtype]
    if spec.attn_implementation == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
        raise ValueError(
            "ModelSpec.attn_implementation: 'flash_attention_2' needs the `flash-attn` package and a CUDA GPU "
            "(pip install flash-attn); or use 'sdpa'"
        )
    if spec.attn_implementation is not None:
        head_kwargs["attn_implementation"] = spec.attn_implementation
    special = {
        "pad_token_id": tokenizer.pad_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "bos_token_id": tokenizer.bos_token_id,
    }
    if spec.architecture is not None:
        arch = dict(spec.architecture)
        config = AutoConfig.for_model(
            arch.pop("model_type"), vocab_size=len(tokenizer), **special, **head_kwargs, **arch
        )
        return auto_class.from_config(config, dtype=dtype)

    source = spec.name_or_path
    check_model_source(source, "ModelSpec.name_or_path", "model")
    kwargs: dict[str, Any] = dict(
        revision=spec.revision,
        trust_remote_code=spec.trust_remote_code,
        dtype=dtype,
        **head_kwargs,
        **spec.extra_kwargs,
    )
    if spec.quantization is not None:
        kwargs["quantization_config"] = _bnb_config(spec.quantization)
        kwargs.setdefault("device_map", {"": _quantization_device()})
    return _load_pretrained(source, auto_class, kwargs, "name_or_path")


def _check_ready_model(model: nn.Module, argument: str) -> None:
    if not (isinstance(model, PreTrainedModel) or has_adapters(model)):
        raise TypeError(
            f"{argument}: expected a ModelSpec, a transformers PreTrainedModel or a peft PeftModel, "
            f"got {type(model).__name__}"
        )


def _ready(model: nn.Module, tokenizer: PreTrainedTokenizerBase) -> nn.Module:
    """A model given from Python: in train mode, with the tokenizer's pad token when it has none."""
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model.train()


def _finish(spec: ModelSpec, model: PreTrainedModel, task_type: str) -> PreTrainedModel:
    model.train()  # from_pretrained returns eval mode; Lightning expects modules to train
    if spec.quantization is not None:
        _keep_4bit_layers_differentiable(model)
    if spec.gradient_checkpointing:
        _enable_checkpointing(model)
        model.config.use_cache = False
    if spec.lora is None:
        return model
    from peft import LoraConfig, get_peft_model

    if spec.gradient_checkpointing:
        model.enable_input_require_grads()
    config = LoraConfig(task_type=task_type, **asdict(spec.lora))
    return get_peft_model(model, config)


def _enable_checkpointing(model: PreTrainedModel) -> None:
    """Activation checkpointing, non-reentrant (torch's reentrant variant is deprecated and
    needs inputs that require grad), by the name this transformers has: 5.x renamed
    ``gradient_checkpointing_enable`` to ``activation_checkpointing_enable`` and warns on the old one."""
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def _bnb_config(q: QuantizationSpec) -> Any:
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ImportError(
            "ModelSpec.quantization: needs the `bitsandbytes` package "
            "(pip install 'lit-p3o[quant]'), or remove the `quantization` section"
        )
    from transformers import BitsAndBytesConfig

    if q.bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=q.quant_type,
        bnb_4bit_use_double_quant=q.double_quant,
        bnb_4bit_compute_dtype=_DTYPES[q.compute_dtype],
    )


def _keep_4bit_layers_differentiable(model: nn.Module) -> None:
    """Turn off bitsandbytes' CPU inference repack on every 4-bit layer.

    On a CPU with AVX512-BF16, bitsandbytes (0.50 at least) repacks a ``Linear4bit`` weight in
    place the first time the layer runs in eval mode without grad (``Linear4bit.forward``, gated
    by the per-layer flag ``support_avx512bf16_for_cpu`` that ``__init__`` sets from
    ``has_avx512bf16()``) and from then on computes the layer with ``gemv_4bit``, a bfloat16
    inference kernel without autograd. Every rollout runs the policy that way, so afterwards no
    LoRA parameter got a gradient (training silently did nothing) and ``logp_old`` came from
    another function than the update's log-probs; layers narrower than a quantisation block
    crashed in the repack instead. Without the flag, eval and train forwards share the
    dequantize-then-matmul path. Versions without the flag have no repack; should a later one
    move it, the no-gradient guard of the RL stages stops the run and
    ``tests/test_models.py`` (which forces the feature on) fails.
    """
    from bitsandbytes.nn import Linear4bit

    for module in model.modules():
        if isinstance(module, Linear4bit):
            module.support_avx512bf16_for_cpu = False


_BNB_OPTIMIZERS = {"adamw_8bit": "AdamW8bit", "paged_adamw": "PagedAdamW", "paged_adamw_8bit": "PagedAdamW8bit"}


def bitsandbytes_optimizer(name: str) -> type[torch.optim.Optimizer]:
    """The bitsandbytes optimizer class behind ``OptimizerSpec.name`` (this module is the one
    that imports bitsandbytes)."""
    if name not in _BNB_OPTIMIZERS:
        raise ValueError(
            f"OptimizerSpec.name: no bitsandbytes optimizer {name!r}; choose from {sorted(_BNB_OPTIMIZERS)}"
        )
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ImportError(
            f"OptimizerSpec.name: {name!r} needs the `bitsandbytes` package "
            "(pip install 'lit-p3o[quant]'), or use name: adamw"
        )
    import bitsandbytes as bnb

    return getattr(bnb.optim, _BNB_OPTIMIZERS[name])


def _quantization_device() -> str:
    return f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu"


def _adapter_base(source: str) -> str | None:
    """The base model of a LoRA adapter directory, or None for an ordinary model."""
    config = Path(source) / "adapter_config.json"
    if not config.is_file():
        return None
    base = json.loads(config.read_text()).get("base_model_name_or_path")
    if not base:
        raise ValueError(f"{config}: no `base_model_name_or_path`; cannot find the adapters' base model")
    return base


def _load_pretrained(source: str, auto_class: Any, kwargs: dict[str, Any], field_name: str) -> PreTrainedModel:
    """A model directory or hub id as is; an adapter directory merged into its base."""
    base = _adapter_base(source)
    if base is None:
        return _from_pretrained(auto_class, source, field_name, **kwargs)
    return _load_merged_adapters(source, base, auto_class, kwargs)


def _load_merged_adapters(source: str, base: str, auto_class: Any, kwargs: dict[str, Any]) -> PreTrainedModel:
    """Load base + saved adapters and merge them into plain weights.

    The base may itself be an adapter directory (LoRA SFT → LoRA RL): it is merged first. The
    merged model is named after ``source``, so adapters trained on top of it record ``source``
    (not the bare base) as their ``base_model_name_or_path``.

    Adapters cannot be merged into quantized weights, and stacking the new ``lora`` on a
    loaded peft model would overwrite the saved adapters (both are named ``default``). So for
    a quantized load the merge happens in ``dtype`` first and the merged model is quantized
    while loading from a temporary directory: the policy then starts at the saved model (up to
    quantization), and π_ref (adapters off) is that model, not the bare base.
    """
    import tempfile

    from peft import PeftModel

    plain = {k: v for k, v in kwargs.items() if k not in ("quantization_config", "device_map")}
    model = _load_pretrained(base, auto_class, plain, "name_or_path (adapter base)")
    model = PeftModel.from_pretrained(model, source).merge_and_unload()
    if "quantization_config" in kwargs:
        log.info("merging the adapters of %s into their base before quantizing it", source)
        with tempfile.TemporaryDirectory(prefix="lit-p3o-merged-") as merged:
            model.save_pretrained(merged)
            del model
            model = _from_pretrained(auto_class, merged, "name_or_path (merged adapters)", **kwargs)
    model.name_or_path = model.config._name_or_path = source
    return model


def looks_local(source: str) -> bool:
    """A path rather than a hub id (``name`` or ``owner/name``): it exists, starts like a path,
    has more than one slash, or its first part is a local directory (``outputs/sft``)."""
    first = source.split("/", 1)[0]
    return (
        source.startswith((".", "/", "~"))
        or "\\" in source
        or source.count("/") > 1
        or Path(source).expanduser().exists()
        or ("/" in source and Path(first).expanduser().is_dir())
    )


def check_model_source(source: str, field_name: str, needs: Literal["model", "tokenizer"]) -> None:
    """Fail at once, naming ``field_name``, on a local path that is missing or does not hold
    a saved model (``needs="model"``) or tokenizer; hub ids and ``embedded:`` sources pass.

    Without this a missing path is looked up on the hub (a minute of retries) and an
    incomplete directory fails inside transformers without its path."""
    if resolve_embedded(source) is not None or not looks_local(source):
        return
    path = Path(source).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"{field_name}: no such directory {source!r} (looked in {path.absolute()})")
    if not path.is_dir():
        raise NotADirectoryError(f"{field_name}: {source!r} is a file; expected a directory written by save_pretrained")
    if (path / "adapter_config.json").is_file():
        return  # LoRA adapters: the tokenizer may live with their base model, checked when loaded
    if needs == "model":
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{field_name}: {source!r} holds no model (no config.json or adapter_config.json)")
        if not any(path.glob("*.safetensors")) and not any(path.glob("*.bin")):
            raise FileNotFoundError(
                f"{field_name}: {source!r} holds a config.json but no weights (*.safetensors, *.bin)"
            )
    elif not any((path / name).is_file() for name in _TOKENIZER_FILES):
        raise FileNotFoundError(f"{field_name}: {source!r} holds no tokenizer ({' or '.join(_TOKENIZER_FILES)})")


def _from_pretrained(auto_class: Any, source: str, field_name: str, **kwargs: Any) -> Any:
    """``from_pretrained`` with an error that names the config field and the source."""
    try:
        return auto_class.from_pretrained(source, **kwargs)
    except OSError as err:
        raise OSError(
            f"ModelSpec.{field_name}: {source!r} is neither a local model directory nor a reachable hub model ({err})"
        ) from err

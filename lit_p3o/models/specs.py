"""The typed descriptions of a network (:class:`ModelSpec` and its sections): what a stage's
model argument holds in YAML/CLI, and what checkpoints store as hyperparameters."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Union

from torch import nn
from transformers import PreTrainedModel


@dataclass
class LoraSpec:
    """The fields of ``peft.LoraConfig`` that users tune.

    ``target_modules=None`` lets peft pick its default projections for the architecture.
    """

    r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    target_modules: list[str] | str | None = None
    bias: Literal["none", "all", "lora_only"] = "none"
    modules_to_save: list[str] | None = None


@dataclass
class QuantizationSpec:
    """The fields of ``transformers.BitsAndBytesConfig`` that users tune.

    Quantized weights cannot be trained, so quantization requires ``lora``.
    """

    bits: Literal[4, 8] = 4
    quant_type: Literal["nf4", "fp4"] = "nf4"
    double_quant: bool = False
    compute_dtype: Literal["float32", "bfloat16", "float16"] = "float32"


@dataclass
class ModelSpec:
    """Which network to build and how.

    Give either ``name_or_path`` (a hub id or a local directory written by
    ``save_pretrained``, including a directory of LoRA adapters) or ``architecture``
    (keyword arguments of ``AutoConfig.for_model``, e.g. ``{"model_type": "llama",
    "hidden_size": 128, ...}``) to build a fresh, randomly initialised model.
    ``tokenizer`` defaults to ``name_or_path``; ``"embedded:reviews"`` builds the embedded
    task's tokenizer locally.
    ``attn_implementation`` picks transformers' attention kernel (``None``: transformers'
    default, ``sdpa`` where the model supports it); ``flash_attention_2`` needs the
    ``flash-attn`` package and a CUDA GPU.
    """

    name_or_path: str | None = None
    architecture: dict[str, Any] | None = None
    tokenizer: str | None = None
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    revision: str | None = None
    trust_remote_code: bool = False
    lora: LoraSpec | None = None
    quantization: QuantizationSpec | None = None
    gradient_checkpointing: bool = False
    attn_implementation: Literal["eager", "sdpa", "flash_attention_2"] | None = None
    extra_kwargs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if (self.name_or_path is None) == (self.architecture is None):
            raise ValueError("ModelSpec: give exactly one of `name_or_path` or `architecture`")
        if self.architecture is not None and "model_type" not in self.architecture:
            raise ValueError("ModelSpec.architecture: needs a `model_type` key (e.g. 'llama')")
        if self.quantization is not None and self.lora is None:
            raise ValueError("ModelSpec.quantization: quantized weights cannot be trained; add a `lora` section")
        if self.attn_implementation is not None and "attn_implementation" in self.extra_kwargs:
            raise ValueError("ModelSpec.attn_implementation: also given in `extra_kwargs`; keep the typed field only")
        if self.quantization is not None and self.architecture is not None:
            raise ValueError(
                "ModelSpec.quantization: bitsandbytes quantizes weights while loading; save the "
                "model first and point `name_or_path` at it"
            )


ModelSource = Union[ModelSpec, PreTrainedModel, nn.Module]
"""What a stage's model argument accepts: a :class:`ModelSpec` (YAML/CLI), or from Python a
ready ``transformers.PreTrainedModel`` or ``peft.PeftModel``, used as it is (its tokenizer is
then the stage's ``tokenizer`` argument)."""

"""Optimizer settings shared by every stage, so each YAML has the same ``optimizer`` block.

The ``lit-p3o`` CLI also accepts LightningCLI's own ``--optimizer``/``--lr_scheduler``
(:mod:`lit_p3o.cli`), which replace this block; giving both is refused.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.plugins.precision import MixedPrecision

from lit_p3o.models import bitsandbytes_optimizer

log = logging.getLogger(__name__)


@dataclass
class OptimizerSpec:
    """AdamW with linear warm-up, then constant or cosine decay to zero.

    ``name`` picks the implementation: ``adamw`` (torch), or bitsandbytes' ``adamw_8bit``
    (optimizer state in 8 bits, a quarter of AdamW's memory), ``paged_adamw`` and
    ``paged_adamw_8bit`` (state in paged memory that spills to CPU under GPU memory
    pressure), the usual companions of QLoRA. bitsandbytes runs them on CPU too (paged ones
    fall back to ordinary memory there, with a warning). ``cpu_fallback``: a bitsandbytes
    ``name`` where the model is on CUDA, torch's ``adamw`` elsewhere, with one logged note (the
    QLoRA overlay's choice: ``paged_adamw_8bit`` on GPUs, a plain run on a laptop).

    ``fused`` (``adamw`` only): torch's fused AdamW kernel, one pass over all parameters
    instead of a Python loop over them (the same update up to float rounding). ``None``, the
    default, turns it on for ``adamw`` (as transformers' Trainer does on GPUs) except where
    Lightning would refuse it: gradient clipping under ``16-mixed``/``bf16-mixed``. On a 2-core
    CPU it made a step 4x faster for a 2 x 128 Llama and 7x for 4 x 512 (docs/benchmarks.md);
    torch ships it for CPU, CUDA and the other accelerators. ``false``: torch's default loop.
    """

    learning_rate: float = 1e-5
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    warmup_steps: int = 0
    schedule: Literal["constant", "cosine"] = "constant"
    name: Literal["adamw", "adamw_8bit", "paged_adamw", "paged_adamw_8bit"] = "adamw"
    fused: bool | None = None
    cpu_fallback: bool = False

    def __post_init__(self) -> None:
        if self.learning_rate <= 0:
            raise ValueError(f"OptimizerSpec.learning_rate: must be > 0, got {self.learning_rate}")
        if self.warmup_steps < 0:
            raise ValueError(f"OptimizerSpec.warmup_steps: must be >= 0, got {self.warmup_steps}")
        if self.fused and self.name != "adamw":
            raise ValueError(f"OptimizerSpec.fused: torch's fused kernel is for name 'adamw', not {self.name!r}")
        if self.cpu_fallback and self.name == "adamw":
            raise ValueError("OptimizerSpec.cpu_fallback: is for a bitsandbytes name; 'adamw' runs everywhere")


def configure_adamw(module: L.LightningModule, spec: OptimizerSpec) -> dict[str, Any]:
    """AdamW over the trainable parameters only (LoRA, value heads), plus the schedule."""
    params = [p for p in module.parameters() if p.requires_grad]
    hyper = {"lr": spec.learning_rate, "weight_decay": spec.weight_decay, "betas": spec.betas, "eps": spec.eps}
    name = spec.name
    if spec.cpu_fallback and module.device.type != "cuda":
        log.info("OptimizerSpec.cpu_fallback: %s is for CUDA; on %s this run uses torch's AdamW", name, module.device)
        name = "adamw"
    if name == "adamw":
        optimizer = torch.optim.AdamW(params, fused=_use_fused(spec, module.trainer), **hyper)
    else:
        optimizer = bitsandbytes_optimizer(name)(params, **hyper)
    total = None
    if spec.schedule == "cosine":
        total = max(1, int(module.trainer.estimated_stepping_batches))

    def factor(step: int) -> float:
        if step < spec.warmup_steps:
            return (step + 1) / spec.warmup_steps
        if total is None:
            return 1.0
        progress = min(1.0, (step - spec.warmup_steps) / max(1, total - spec.warmup_steps))
        return 0.5 * (1.0 + math.cos(progress * math.pi))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def _use_fused(spec: OptimizerSpec, trainer: L.Trainer) -> bool:
    """``spec.fused``, with ``None`` resolved: fused unless Lightning would refuse it. Its
    mixed-precision plugin (``16-mixed``, ``bf16-mixed``) does not clip the gradients of an
    optimizer that unscales them itself, as the fused kernel does."""
    clips = bool(trainer.gradient_clip_val) and isinstance(trainer.precision_plugin, MixedPrecision)
    if spec.fused and clips:
        raise ValueError(
            f"OptimizerSpec.fused: true cannot be combined with trainer.gradient_clip_val={trainer.gradient_clip_val} "
            f"under trainer.precision={trainer.precision!r} (Lightning does not clip a fused optimizer's gradients "
            "in mixed precision); set fused to null or false, or turn clipping off"
        )
    return not clips if spec.fused is None else spec.fused

"""The rollout's no-grad forwards (step 2 of :mod:`lit_p3o.rollout`): ``logp_old``, ``logp_ref``
and the stage's per-token extras of every sampled response.

Under bf16 a row's log-probs depend on the batch it is computed in (its neighbours and its
padding width change the kernels' blocking), so ``logp_old`` is computed in exactly the batches
the update's first pass recomputes it in: the minibatches of
:meth:`lit_p3o.buffer.ReplayBuffer.next_first_pass`, each collated as
:func:`lit_p3o.buffer.collate_groups` collates it (same groups, same order, same padding
width). The first update's trajectory ratio is then exactly 1, with no extra forward: the
first pass covers every group once. ``logp_ref`` and the extras enter no ratio and are computed
in ``forward_batch_size`` chunks.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor
from tqdm.auto import tqdm

from lit_p3o.data.encoding import Encoded, collate
from lit_p3o.generation import response_logprobs

if TYPE_CHECKING:
    from lit_p3o.rollout import RolloutStage


@torch.no_grad()
def logp_old_in_update_layout(
    stage: RolloutStage,
    examples: list[Encoded],
    k: int,
    minibatches: list[list[int]],
    temperature: float,
    show_progress: bool = False,
) -> list[Tensor]:
    """Per-token ``logp_old`` of each response (``examples`` group-major, ``k`` per group),
    computed minibatch by minibatch of ``minibatches`` (group indices, covering every group once)."""
    device = next(stage.policy.parameters()).device
    out: list[Tensor] = [torch.empty(0)] * len(examples)
    for groups in tqdm(minibatches, desc="rollout: log-probs (policy)", leave=False, disable=not show_progress):
        rows = [g * k + j for g in groups for j in range(k)]
        batch = collate([examples[r] for r in rows], stage.tokenizer.pad_token_id).to(device)
        old = response_logprobs(stage.policy, batch, temperature).cpu()
        for i, r in enumerate(rows):
            out[r] = old[i, : len(examples[r].response_ids)].clone()
    return out


@torch.no_grad()
def reference_passes(
    stage: RolloutStage, examples: list[Encoded], batch_size: int, temperature: float, show_progress: bool = False
) -> tuple[list[Tensor], dict[str, list[Tensor]]]:
    """Per-token ``logp_ref`` (at the sampling temperature) and the stage's extras, trimmed to
    each response, in chunks of ``batch_size``."""
    device = next(stage.policy.parameters()).device
    logp_ref: list[Tensor] = []
    extras: dict[str, list[Tensor]] = {}
    starts = tqdm(
        range(0, len(examples), batch_size),
        desc="rollout: log-probs (reference)",
        leave=False,
        disable=not show_progress,
    )
    for start in starts:
        chunk = examples[start : start + batch_size]
        batch = collate(chunk, stage.tokenizer.pad_token_id).to(device)
        with stage.reference.active() as reference:
            ref = response_logprobs(reference, batch, temperature).cpu()
        more = {name: t.float().cpu() for name, t in stage.rollout_extras(batch).items()}
        for i, e in enumerate(chunk):
            n = len(e.response_ids)
            logp_ref.append(ref[i, :n].clone())
            for name, t in more.items():
                extras.setdefault(name, []).append(t[i, :n].clone())
    return logp_ref, extras

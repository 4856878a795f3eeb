"""The replay buffer: whole groups of K responses to one prompt, kept on CPU.

A *group* is never split: minibatches are lists of groups, padded on the fly into one
``[G·K, T]`` batch, group-major (rows ``g·K … g·K+K−1`` belong to group ``g``), which is the
layout the pairwise losses reshape to ``[G, K]``.

The buffer also owns the *update schedule* of the current rollout (``update_epochs`` passes,
each a seeded shuffle of the groups cut into minibatches) and counts consumed minibatches,
so a run resumed from a checkpoint taken mid-rollout continues with the next minibatch.

Data only flows out of the buffer: the rollout fills it, the update reads minibatches of it, and
nothing the update computes is written back (on-policy, the update's own ``logp_old``, KL and r̃
live in its :class:`RolloutBatch` only). The one count that moves during the replay, ``consumed``,
is advanced by the rollout callback after each trained minibatch.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset

from lit_p3o.data.encoding import Batch, Encoded, collate
from lit_p3o.losses import sequence_kl_rewards


@dataclass
class Group:
    """K responses to one prompt with everything the losses need, per response.

    ``logp_old``/``logp_ref`` hold one float32 tensor of per-token log-probs per response;
    ``extras`` holds per-token tensors an algorithm adds at rollout time (PPO's values);
    ``reward_terms`` each reward term's own values (None as NaN), logged with the rollout.
    ``logp_old``, ``kl`` and ``rewards`` are ``None`` when the rollout left them to the update
    (on-policy, ``RolloutSpec.defer_logp_old``): its own forward gives them, for its minibatch only.
    ``sampler_logp``: the sampling engine's per-token log-probs of each response, when it reports
    them (:attr:`lit_p3o.generation.Sampled.logprobs`), for the sampler–trainer gap and the
    truncated importance-sampling correction; None with ``generate()``.
    """

    prompt_ids: list[int]
    responses: list[list[int]]
    logp_old: list[Tensor] | None
    logp_ref: list[Tensor]
    scores: Tensor
    kl: Tensor | None
    rewards: Tensor | None
    ended: Tensor
    extras: dict[str, list[Tensor]] = field(default_factory=dict)
    reward_terms: dict[str, Tensor] = field(default_factory=dict)
    sampler_logp: list[Tensor] | None = None

    def __post_init__(self) -> None:
        k = len(self.responses)
        if (self.logp_old is None) != (self.kl is None) or (self.kl is None) != (self.rewards is None):
            raise ValueError("Group: logp_old, kl and rewards are all given or all left to the update (None)")
        present = [
            x
            for x in (self.logp_old, self.logp_ref, self.scores, self.kl, self.rewards, self.ended, self.sampler_logp)
            if x is not None
        ]
        if {len(x) for x in present} != {k} or any(
            len(v) != k for v in (*self.extras.values(), *self.reward_terms.values())
        ):
            raise ValueError(f"Group: inconsistent sizes for {k} responses")
        if self.sampler_logp is not None and [len(t) for t in self.sampler_logp] != [len(r) for r in self.responses]:
            raise ValueError("Group: sampler_logp needs one log-prob per response token")


class RolloutBatch:
    """A minibatch of G groups: the padded batch plus per-token and per-response tensors.

    Per-token tensors are ``[G·K, R]`` (R = response width), aligned with
    ``batch.input_ids[:, batch.prompt_width:]``; per-response tensors are ``[G, K]``.
    ``logp_old``, ``kl`` and ``rewards`` are ``None`` when the rollout left them to the update
    (on-policy), which makes them with :meth:`with_logp_old`; ``sampler_logp`` ``[G·K, R]`` is
    None when the sampler gave no log-probs.

    Not a dataclass on purpose: Lightning's ``bf16-true``/``16-true`` precision casts every
    floating tensor it finds inside a batch's dataclasses, lists and dicts to half precision
    (``convert_input``), which would round ``logp_old`` and the rewards; an opaque object is
    only moved to the device, through :meth:`to`.
    """

    def __init__(
        self,
        batch: Batch,
        logp_old: Tensor | None,
        logp_ref: Tensor,
        scores: Tensor,
        kl: Tensor | None,
        rewards: Tensor | None,
        ended: Tensor,
        extras: dict[str, Tensor],
        sampler_logp: Tensor | None = None,
    ) -> None:
        self.batch, self.logp_old, self.logp_ref = batch, logp_old, logp_ref
        self.scores, self.kl, self.rewards, self.ended, self.extras = scores, kl, rewards, ended, extras
        self.sampler_logp = sampler_logp

    @property
    def response_mask(self) -> Tensor:
        return self.batch.response_mask[:, self.batch.prompt_width :]

    @property
    def num_groups(self) -> int:
        return self.scores.shape[0]

    def to(self, device: torch.device | str) -> RolloutBatch:
        return RolloutBatch(
            self.batch.to(device),
            *(
                None if t is None else t.to(device)
                for t in (self.logp_old, self.logp_ref, self.scores, self.kl, self.rewards, self.ended)
            ),
            {k: v.to(device) for k, v in self.extras.items()},
            None if self.sampler_logp is None else self.sampler_logp.to(device),
        )

    def with_logp_old(self, logp_old: Tensor, beta: float) -> RolloutBatch:
        """A new batch with ``logp_old`` ``[N, R]`` given and the KL and r̃ made from it, as the
        rollout makes them (:func:`lit_p3o.losses.sequence_kl_rewards`). On-policy the update
        passes its own forward, detached, so the trajectory ratio is exactly 1; the buffer's
        groups are left as they are."""
        mask = self.response_mask
        logp_old = logp_old.float() * mask
        kl, rewards = sequence_kl_rewards(self.scores, logp_old, self.logp_ref, mask, beta)
        return RolloutBatch(
            self.batch, logp_old, self.logp_ref, self.scores, kl, rewards, self.ended, self.extras, self.sampler_logp
        )


def _pad_rows(rows: list[Tensor], width: int) -> Tensor:
    out = torch.zeros(len(rows), width, dtype=rows[0].dtype)
    for i, row in enumerate(rows):
        out[i, : len(row)] = row
    return out


def collate_groups(groups: list[Group], pad_token_id: int) -> RolloutBatch:
    """Pad a list of groups into one group-major :class:`RolloutBatch`."""
    if not groups:
        raise ValueError("cannot collate an empty list of groups")
    k = len(groups[0].responses)
    if any(len(g.responses) != k for g in groups):
        raise ValueError("all groups of a minibatch must have the same number of responses")
    examples = [Encoded(g.prompt_ids, r) for g in groups for r in g.responses]
    batch = collate(examples, pad_token_id)
    width = batch.input_ids.shape[1] - batch.prompt_width

    deferred = groups[0].logp_old is None  # on-policy: the update makes logp_old, kl and r̃
    if any((g.logp_old is None) != deferred for g in groups):
        raise ValueError("a minibatch mixes groups with and without logp_old")
    sampled_logp = groups[0].sampler_logp is not None
    if any((g.sampler_logp is not None) != sampled_logp for g in groups):
        raise ValueError("a minibatch mixes groups with and without the sampler's log-probs")

    def per_token(get: Any) -> Tensor:
        return _pad_rows([t for g in groups for t in get(g)], width)

    def per_response(get: Any) -> Tensor | None:
        return None if deferred else torch.stack([get(g) for g in groups])

    return RolloutBatch(
        batch=batch,
        logp_old=None if deferred else per_token(lambda g: g.logp_old),
        logp_ref=per_token(lambda g: g.logp_ref),
        scores=torch.stack([g.scores for g in groups]),
        kl=per_response(lambda g: g.kl),
        rewards=per_response(lambda g: g.rewards),
        ended=torch.stack([g.ended for g in groups]),
        extras={name: per_token(lambda g, n=name: g.extras[n]) for name in groups[0].extras},
        sampler_logp=per_token(lambda g: g.sampler_logp) if sampled_logp else None,
    )


class ReplayBuffer:
    """Groups of the latest rollout and the schedule of minibatches that replays them."""

    def __init__(self, update_epochs: int, minibatch_groups: int, seed: int = 0) -> None:
        if update_epochs < 1:
            raise ValueError(f"update_epochs: must be >= 1, got {update_epochs}")
        if minibatch_groups < 1:
            raise ValueError(f"minibatch_groups: must be >= 1, got {minibatch_groups}")
        self.update_epochs = update_epochs
        self.minibatch_groups = minibatch_groups
        self.seed = seed
        self.groups: list[Group] = []
        self.rollouts = 0  # how many times the buffer was filled: seeds each schedule
        self.consumed = 0  # minibatches of the current schedule already trained on

    def __len__(self) -> int:
        return len(self.groups)

    def fill(self, groups: list[Group]) -> None:
        """Replace the contents with a new rollout's groups and restart the schedule."""
        if not groups:
            raise ValueError("ReplayBuffer.fill: a rollout produced no groups")
        self.groups = list(groups)
        self.rollouts += 1
        self.consumed = 0

    def schedule(self) -> list[list[int]]:
        """Group indices of every minibatch of this rollout, ``update_epochs`` shuffled passes."""
        return self._schedule(self.rollouts, len(self.groups), self.update_epochs)

    def next_first_pass(self, num_groups: int) -> list[list[int]]:
        """The first pass of the schedule that the next :meth:`fill` with ``num_groups`` groups
        gets: the rollout computes ``logp_old`` in these minibatches, so that under bf16 (where a
        row's log-probs depend on the batch it is computed in) the first update's ratio is
        exactly 1."""
        return self._schedule(self.rollouts + 1, num_groups, 1)

    def _schedule(self, rollouts: int, num_groups: int, passes: int) -> list[list[int]]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + rollouts)
        minibatches = []
        for _ in range(passes):
            order = torch.randperm(num_groups, generator=generator).tolist()
            minibatches += [order[i : i + self.minibatch_groups] for i in range(0, len(order), self.minibatch_groups)]
        return minibatches

    def num_minibatches(self, num_groups: int | None = None) -> int:
        """Length of a schedule over ``num_groups`` groups (default: the current contents)."""
        num_groups = len(self.groups) if num_groups is None else num_groups
        return self.update_epochs * -(-num_groups // self.minibatch_groups)

    def state_dict(self) -> dict[str, Any]:
        return {"groups": self.groups, "rollouts": self.rollouts, "consumed": self.consumed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Checkpoints written before 2026-12-07 also hold ``beta``, which the KL controller owns now."""
        self.groups = list(state["groups"])
        self.rollouts = state["rollouts"]
        self.consumed = state["consumed"]


class BufferDataset(IterableDataset):
    """Iterates the buffer's remaining minibatches; one pass of this is one Lightning epoch.

    The iterator is created after ``on_train_epoch_start`` (when the rollout callback has
    refilled the buffer), so it always sees the current rollout. ``len`` is the length of a
    full schedule over ``groups_per_rollout`` groups: Lightning reads it once, before the
    first rollout, for the progress bar and for schedulers that need the total step count.
    """

    def __init__(self, buffer: ReplayBuffer, pad_token_id: int, groups_per_rollout: int) -> None:
        self.buffer = buffer
        self.pad_token_id = pad_token_id
        self.groups_per_rollout = groups_per_rollout

    def __len__(self) -> int:
        return self.buffer.num_minibatches(self.groups_per_rollout)

    def __iter__(self) -> Iterator[RolloutBatch]:
        for indices in self.buffer.schedule()[self.buffer.consumed :]:
            yield collate_groups([self.buffer.groups[i] for i in indices], self.pad_token_id)


class BufferLoader(DataLoader):
    """The loader of a :class:`BufferDataset`, resumable in Lightning's sense: where a rollout's
    replay stands is the buffer's ``consumed``, checkpointed with the stage, so the loader has
    no state of its own to save (Lightning otherwise warns, wrongly here, that resuming inside
    an epoch is unreliable)."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Nothing to restore: the buffer is restored from the stage's checkpoint."""

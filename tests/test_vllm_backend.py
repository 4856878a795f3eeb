"""``rollout.sampling.backend``: the package works without vLLM, and asking for the vLLM
backend without it is one line naming the field and the install command (both environments)."""

from __future__ import annotations

import sys

import pytest
import torch
from micro import MICRO_ARCH
from test_bad_inputs import lit_p3o, p3o_config, write_yaml
from test_user_errors import fails_in_one_line

from lit_p3o import LoraSpec, ModelSpec, QuantizationSpec, SamplingSpec
from lit_p3o.errors import UserError
from lit_p3o.generation import VLLMSpec, sample_responses
from lit_p3o.models import build_causal_lm


def test_vllm_backend_without_vllm_names_the_field_and_the_install(monkeypatch, micro_tokenizer):
    monkeypatch.setitem(sys.modules, "vllm", None)  # as if not installed
    model = build_causal_lm(ModelSpec(architecture=dict(MICRO_ARCH), tokenizer="embedded:reviews"), micro_tokenizer)
    with pytest.raises(UserError, match=r"^SamplingSpec.backend: 'vllm' needs the vllm package \(pip install"):
        sample_responses(model, micro_tokenizer, [[1, 2, 3]], SamplingSpec(backend="vllm"))


def test_vllm_backend_on_a_4bit_policy_is_refused_in_one_line(micro_model_dir, micro_tokenizer):
    spec = ModelSpec(
        name_or_path=str(micro_model_dir),
        lora=LoraSpec(r=4, lora_dropout=0.0, target_modules=["q_proj", "v_proj"]),
        quantization=QuantizationSpec(bits=4, quant_type="nf4"),
    )
    model = build_causal_lm(spec, micro_tokenizer)
    with pytest.raises(UserError, match=r"^SamplingSpec.backend: 'vllm' cannot take the weights of a quantized policy"):
        sample_responses(model, micro_tokenizer, [[1, 2, 3]], SamplingSpec(backend="vllm"))


@pytest.mark.skipif(
    __import__("importlib").util.find_spec("vllm") is not None, reason="runs where vllm is not installed"
)
def test_cli_run_with_vllm_backend_without_vllm_fails_in_one_line(tmp_path):
    config = p3o_config()
    config["model"]["init_args"]["rollout"]["sampling"]["backend"] = "vllm"
    result = lit_p3o("fit", "--config", str(write_yaml(tmp_path / "p3o.yaml", config)), cwd=tmp_path)
    fails_in_one_line(result, "model.init_args.rollout.sampling.backend", "pip install 'lit-p3o[vllm]'")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"kv_cache_gib": 0}, "VLLMSpec.kv_cache_gib: must be > 0"),
        ({"gpu_memory_utilization": 1.5}, r"VLLMSpec.gpu_memory_utilization: must be in \(0, 1\]"),
        ({"max_model_len": 0}, "VLLMSpec.max_model_len: must be >= 1 when set"),
    ],
)
def test_engine_settings_are_checked(kwargs, message):
    with pytest.raises(ValueError, match=message):
        VLLMSpec(**kwargs)


def test_the_engine_samples_with_the_threads_asked_and_training_gets_its_own_back():
    from lit_p3o.vllm_engine import _engine_threads

    before = torch.get_num_threads()
    torch.set_num_threads(2)  # the tests' processes run on one thread (conftest)
    try:
        with _engine_threads(None):
            assert torch.get_num_threads() == 2  # the training's count
        with _engine_threads(1):
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    with pytest.raises(ValueError, match="VLLMSpec.cpu_threads: must be >= 1"):
        VLLMSpec(cpu_threads=0)


def test_generation_kwargs_are_refused_with_the_vllm_backend():
    with pytest.raises(ValueError, match="SamplingSpec.generation_kwargs: transformers GenerationConfig fields"):
        SamplingSpec(backend="vllm", generation_kwargs={"no_repeat_ngram_size": 2})
    assert SamplingSpec(backend="hf", generation_kwargs={"no_repeat_ngram_size": 2}).generation_kwargs


def test_hf_backend_reports_no_sampler_logprobs(micro_tokenizer):
    torch.manual_seed(0)
    model = build_causal_lm(ModelSpec(architecture=dict(MICRO_ARCH), tokenizer="embedded:reviews"), micro_tokenizer)
    assert sample_responses(model, micro_tokenizer, [[1, 2, 3]], SamplingSpec(max_new_tokens=2)).logprobs is None

"""The model factory: specs, loading, LoRA, 4-bit, the frozen reference, saving, errors."""

from __future__ import annotations

import importlib.util
import json
import shutil

import pytest
import torch
from micro import MICRO_ARCH
from torch import nn

from lit_p3o.models import (
    FrozenReference,
    LoraSpec,
    ModelSpec,
    QuantizationSpec,
    as_spec,
    build_causal_lm,
    build_reward_model,
    disable_dropout,
    factory,
    has_adapters,
    load_tokenizer,
    save_pretrained,
)

IDS = torch.tensor([[3, 105, 7, 77, 62, 91, 71, 5], [0, 0, 3, 95, 62, 91, 44, 6]])
MASK = (IDS != 0).long()


def logits_of(model: nn.Module, ids: torch.Tensor = IDS, mask: torch.Tensor = MASK) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


def perturb_lora(model: nn.Module, seed: int = 1) -> None:
    """LoRA starts as the identity (lora_B = 0); make the adapters do something."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)


# --------------------------------------------------------------------------- building


def test_tiny_model_from_architecture(micro_spec):
    tok = load_tokenizer(micro_spec)
    model = build_causal_lm(micro_spec, tok)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert len(tok) == 108
    assert model.config.vocab_size == len(tok)
    assert model.get_input_embeddings().weight.shape == (len(tok), 32)
    assert (model.config.pad_token_id, model.config.eos_token_id, model.config.bos_token_id) == (0, 1, 3)
    assert model.config.hidden_size == 32 and model.config.num_hidden_layers == 1
    assert model.training  # Lightning expects train mode
    assert all(p.requires_grad for p in model.parameters())
    assert logits_of(model).shape == (2, 8, len(tok))


def test_as_spec_accepts_plain_dicts():
    spec = as_spec({"architecture": dict(MICRO_ARCH), "tokenizer": "embedded:reviews", "lora": {"r": 2}})
    assert isinstance(spec.lora, LoraSpec) and spec.lora.r == 2 and spec.lora.lora_alpha == 16


def test_load_from_saved_dir_has_identical_weights(micro_model_dir):
    spec = ModelSpec(name_or_path=str(micro_model_dir))
    tok = load_tokenizer(spec)
    assert (
        tok.get_vocab()
        == load_tokenizer(ModelSpec(architecture=dict(MICRO_ARCH), tokenizer="embedded:reviews")).get_vocab()
    )
    a = build_causal_lm(spec, tok)
    b = build_causal_lm(spec, tok)
    assert a.training
    torch.testing.assert_close(logits_of(a), logits_of(b), rtol=0, atol=0)
    saved = json.loads((micro_model_dir / "config.json").read_text())
    assert saved["vocab_size"] == 108 and saved["pad_token_id"] == 0


def test_reward_model_has_scalar_head(micro_model_dir):
    spec = ModelSpec(name_or_path=str(micro_model_dir))
    tok = load_tokenizer(spec)
    rm = build_reward_model(spec, tok)
    assert rm.config.num_labels == 1
    assert logits_of(rm).shape == (2, 1)


def test_lora_only_adapters_trainable_and_config_passed_through(micro_spec):
    micro_spec.lora = LoraSpec(r=3, lora_alpha=6, lora_dropout=0.0, target_modules=["q_proj", "v_proj"])
    tok = load_tokenizer(micro_spec)
    model = build_causal_lm(micro_spec, tok)
    assert has_adapters(model)
    config = model.peft_config["default"]
    assert config.r == 3 and config.lora_alpha == 6 and config.lora_dropout == 0.0
    assert set(config.target_modules) == {"q_proj", "v_proj"}
    assert config.task_type == "CAUSAL_LM"
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    # one layer × {q, v} × {A, B}
    assert len(trainable) == 4 and all("lora_" in n for n in trainable)
    assert {n.split(".")[-4] for n in trainable} == {"q_proj", "v_proj"}
    a = dict(model.named_parameters())["base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight"]
    assert a.shape == (3, 32)


@pytest.fixture(params=[True, False], ids=["avx512bf16", "no-avx512bf16"])
def cpu_avx512bf16(request, monkeypatch) -> bool:
    """Run a 4-bit test as on a CPU with AVX512-BF16 and as on one without, whatever this one has.

    bitsandbytes reads the feature once per layer (``Linear4bit.__init__`` calls
    ``has_avx512bf16()``); with it, the layer's first eval-mode no-grad forward repacks the
    weight for an inference-only kernel: small layers crash there, larger ones never pass a
    gradient again. Forcing the flag makes every machine take both branches."""
    pytest.importorskip("bitsandbytes")
    import bitsandbytes.nn.modules as bnb_modules

    monkeypatch.setattr(bnb_modules, "has_avx512bf16", lambda: request.param)
    return request.param


def test_4bit_lora_on_cpu(micro_model_dir, cpu_avx512bf16):
    import bitsandbytes as bnb

    spec = ModelSpec(
        name_or_path=str(micro_model_dir),
        lora=LoraSpec(r=4, lora_dropout=0.0, target_modules=["q_proj", "v_proj"]),
        quantization=QuantizationSpec(bits=4, quant_type="nf4"),
    )
    tok = load_tokenizer(spec)
    model = build_causal_lm(spec, tok)
    inner = model.get_base_model().model.layers[0]
    for linear in (
        inner.self_attn.k_proj,
        inner.self_attn.o_proj,
        inner.mlp.down_proj,
        inner.self_attn.q_proj.base_layer,
    ):
        assert isinstance(linear, bnb.nn.Linear4bit)
        assert linear.weight.dtype == torch.uint8  # packed 4-bit storage
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    out = model(input_ids=IDS, attention_mask=MASK).logits
    assert out.shape == (2, 8, 108) and torch.isfinite(out).all()
    out.logsumexp(-1).mean().backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert all(g is not None for g in grads.values())
    assert any(g.abs().sum() > 0 for n, g in grads.items() if "lora_A" in n or "lora_B" in n)


def lora_grads(model: nn.Module) -> dict[str, torch.Tensor | None]:
    """Gradients of every LoRA tensor after one train-mode forward/backward (then cleared)."""
    model.train()
    model(input_ids=IDS, attention_mask=MASK).logits.logsumexp(-1).mean().backward()
    grads = {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters() if "lora_" in n}
    model.zero_grad(set_to_none=True)
    return grads


def test_4bit_lora_still_learns_after_an_eval_forward(wide_model_dir, cpu_avx512bf16):
    """Every rollout runs the policy in eval mode without grad; the update that follows must get
    the same LoRA gradients as if that forward never happened (and the same logits)."""
    spec = ModelSpec(
        name_or_path=str(wide_model_dir),
        lora=LoraSpec(r=4, lora_dropout=0.0, target_modules=["q_proj", "v_proj", "o_proj", "down_proj"]),
        quantization=QuantizationSpec(bits=4, quant_type="nf4"),
    )
    tok = load_tokenizer(spec)
    model = build_causal_lm(spec, tok)
    perturb_lora(model)  # lora_B = 0 would give lora_A a zero gradient
    expected = lora_grads(model)
    assert len(expected) == 2 * 4 * 2  # layers × targets × {A, B}
    assert all(g is not None and g.abs().sum() > 0 for g in expected.values())
    train_logits = logits_of(model.train())

    eval_logits = logits_of(model.eval())  # what the rollout does
    torch.testing.assert_close(eval_logits, train_logits, rtol=0, atol=1e-6)
    torch.testing.assert_close(logits_of(model.train()), train_logits, rtol=0, atol=0)
    got = lora_grads(model)
    missing = [n for n, g in got.items() if g is None]
    assert not missing, f"{len(missing)} of {len(got)} LoRA tensors got no gradient"
    for name, grad in got.items():
        torch.testing.assert_close(grad, expected[name], rtol=0, atol=0, msg=name)


# --------------------------------------------------------------------------- reference and dropout


def test_frozen_reference_without_lora_is_a_snapshot(micro_spec):
    torch.manual_seed(0)
    tok = load_tokenizer(micro_spec)
    policy = build_causal_lm(micro_spec, tok)
    initial = logits_of(policy)
    reference = FrozenReference(policy)
    assert reference.copy is not None and reference.copy is not policy
    assert not any(p.requires_grad for p in reference.parameters())
    # the policy is not part of the reference's parameters
    assert sum(p.numel() for p in reference.parameters()) == sum(p.numel() for p in policy.parameters())
    with reference.active() as ref:
        torch.testing.assert_close(logits_of(ref), initial, rtol=0, atol=0)

    optimizer = torch.optim.SGD([p for p in policy.parameters() if p.requires_grad], lr=1.0)
    policy(input_ids=IDS, attention_mask=MASK).logits.logsumexp(-1).mean().backward()
    optimizer.step()
    assert (logits_of(policy) - initial).abs().max() > 1e-3  # the policy moved
    with reference.active() as ref:
        torch.testing.assert_close(logits_of(ref), initial, rtol=0, atol=0)  # the reference did not
        assert all(p.grad is None for p in ref.parameters())


def test_frozen_reference_with_lora_is_the_base_model(micro_model_dir):
    spec = ModelSpec(name_or_path=str(micro_model_dir), lora=LoraSpec(r=4, target_modules=["q_proj", "v_proj"]))
    tok = load_tokenizer(spec)
    base = build_causal_lm(ModelSpec(name_or_path=str(micro_model_dir)), tok)
    base_logits = logits_of(base.eval())
    policy = build_causal_lm(spec, tok)
    reference = FrozenReference(policy)
    assert reference.copy is None
    assert list(reference.parameters()) == []  # costs no weights
    perturb_lora(policy)
    policy.eval()
    assert (logits_of(policy) - base_logits).abs().max() > 1e-3
    with reference.active() as ref:
        torch.testing.assert_close(logits_of(ref), base_logits, rtol=0, atol=0)
    # adapters are back on afterwards
    assert (logits_of(policy) - base_logits).abs().max() > 1e-3


def test_disable_dropout_makes_train_mode_deterministic(micro_spec):
    micro_spec.architecture["attention_dropout"] = 0.5
    micro_spec.lora = LoraSpec(r=2, lora_dropout=0.5, target_modules=["q_proj"])
    tok = load_tokenizer(micro_spec)
    torch.manual_seed(0)
    model = build_causal_lm(micro_spec, tok)
    perturb_lora(model)
    model.train()
    assert not torch.equal(logits_of(model), logits_of(model))  # dropout is live
    assert disable_dropout(model) is model
    assert model.training
    torch.testing.assert_close(logits_of(model), logits_of(model), rtol=0, atol=0)
    assert all(m.p == 0.0 for m in model.modules() if isinstance(m, nn.Dropout))


# --------------------------------------------------------------------------- saving


def test_lora_adapters_round_trip_to_a_merged_model(micro_model_dir, tmp_path):
    spec = ModelSpec(name_or_path=str(micro_model_dir), lora=LoraSpec(r=4, target_modules=["q_proj", "v_proj"]))
    tok = load_tokenizer(spec)
    policy = build_causal_lm(spec, tok)
    perturb_lora(policy)
    expected = logits_of(policy.eval())
    adapter_dir = save_pretrained(policy, tok, tmp_path / "adapters")
    assert (adapter_dir / "adapter_config.json").is_file()
    assert not (adapter_dir / "model.safetensors").exists()  # adapters only
    assert json.loads((adapter_dir / "adapter_config.json").read_text())["base_model_name_or_path"] == str(
        micro_model_dir
    )

    reloaded_spec = ModelSpec(name_or_path=str(adapter_dir))
    reloaded = build_causal_lm(reloaded_spec, load_tokenizer(reloaded_spec))
    assert not has_adapters(reloaded)  # merged into plain weights
    assert not any("lora" in n for n, _ in reloaded.named_parameters())
    torch.testing.assert_close(logits_of(reloaded.eval()), expected, rtol=1e-5, atol=1e-5)


def _saved_adapters(micro_model_dir, tmp_path, name, seed=1):
    spec = ModelSpec(name_or_path=str(micro_model_dir), lora=LoraSpec(r=2, target_modules=["q_proj"]))
    tok = load_tokenizer(spec)
    policy = build_causal_lm(spec, tok)
    perturb_lora(policy, seed)
    return save_pretrained(policy, tok, tmp_path / name), logits_of(policy.eval()), tok


def test_lora_on_top_of_saved_adapters_chains(micro_model_dir, tmp_path):
    """LoRA SFT → LoRA RL: the RL adapters' base is the SFT model, not the bare base."""
    sft_dir, sft_logits, tok = _saved_adapters(micro_model_dir, tmp_path, "sft")
    spec = ModelSpec(name_or_path=str(sft_dir), lora=LoraSpec(r=2, target_modules=["v_proj"]))
    policy = build_causal_lm(spec, tok)
    reference = FrozenReference(policy)
    with reference.active() as ref:  # π_ref is the SFT model
        torch.testing.assert_close(logits_of(ref.eval()), sft_logits, rtol=1e-5, atol=1e-5)
    perturb_lora(policy, seed=2)
    rl_logits = logits_of(policy.eval())
    rl_dir = save_pretrained(policy, tok, tmp_path / "rl")
    assert json.loads((rl_dir / "adapter_config.json").read_text())["base_model_name_or_path"] == str(sft_dir)
    reloaded = build_causal_lm(ModelSpec(name_or_path=str(rl_dir)), tok)
    torch.testing.assert_close(logits_of(reloaded.eval()), rl_logits, rtol=1e-5, atol=1e-5)


def test_4bit_from_saved_adapters_starts_at_the_merged_model(micro_model_dir, tmp_path, cpu_avx512bf16):
    """QLoRA SFT → QLoRA RL: the saved adapters are merged, then quantized; not overwritten."""
    sft_dir, sft_logits, tok = _saved_adapters(micro_model_dir, tmp_path, "sft")
    lora, quant = LoraSpec(r=2, target_modules=["v_proj"]), QuantizationSpec()
    policy = build_causal_lm(ModelSpec(name_or_path=str(sft_dir), lora=lora, quantization=quant), tok)
    assert not any("q_proj.lora" in n for n, _ in policy.named_parameters())  # no nested adapters
    # what a user gets by merging and saving by hand, then loading that in 4 bits
    merged_dir = save_pretrained(build_causal_lm(ModelSpec(name_or_path=str(sft_dir)), tok), tok, tmp_path / "merged")
    by_hand = build_causal_lm(ModelSpec(name_or_path=str(merged_dir), lora=lora, quantization=quant), tok)
    bare = build_causal_lm(ModelSpec(name_or_path=str(micro_model_dir), lora=lora, quantization=quant), tok)
    expected = logits_of(by_hand.eval())
    torch.testing.assert_close(logits_of(policy.eval()), expected, rtol=0, atol=0)
    assert (logits_of(bare.eval()) - expected).abs().max() > 1e-2  # the SFT adapters matter
    with FrozenReference(policy).active() as ref:
        torch.testing.assert_close(logits_of(ref), expected, rtol=0, atol=0)


def test_saving_lora_on_a_fresh_architecture_keeps_the_weights(micro_spec, tmp_path):
    """Adapters alone are useless when the base was built from `architecture` (no base on disk)."""
    micro_spec.lora = LoraSpec(r=2, target_modules=["q_proj"])
    tok = load_tokenizer(micro_spec)
    policy = build_causal_lm(micro_spec, tok)
    perturb_lora(policy)
    expected = logits_of(policy.eval())
    out = save_pretrained(policy, tok, tmp_path / "m")
    spec = ModelSpec(name_or_path=str(out))
    reloaded = build_causal_lm(spec, load_tokenizer(spec))
    torch.testing.assert_close(logits_of(reloaded.eval()), expected, rtol=1e-5, atol=1e-5)
    assert has_adapters(policy)  # the trained module is left as it was
    torch.testing.assert_close(logits_of(policy), expected, rtol=0, atol=0)


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({}, "exactly one"),
        ({"name_or_path": "x", "architecture": dict(MICRO_ARCH)}, "exactly one"),
        ({"architecture": {"hidden_size": 8}}, "model_type"),
        ({"name_or_path": "x", "quantization": QuantizationSpec()}, "lora"),
        ({"architecture": dict(MICRO_ARCH), "lora": LoraSpec(), "quantization": QuantizationSpec()}, "name_or_path"),
    ],
)
def test_spec_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ModelSpec(**kwargs)


def test_architecture_without_tokenizer_is_an_error():
    with pytest.raises(ValueError, match="ModelSpec.tokenizer"):
        load_tokenizer(ModelSpec(architecture=dict(MICRO_ARCH)))


def test_unknown_local_path_names_the_field(micro_tokenizer):
    with pytest.raises(FileNotFoundError, match=r"ModelSpec\.name_or_path.*nope/model"):
        build_causal_lm(ModelSpec(name_or_path="./nope/model"), micro_tokenizer)
    with pytest.raises(FileNotFoundError, match=r"ModelSpec\.name_or_path: no such directory './nope/model'"):
        load_tokenizer(ModelSpec(name_or_path="./nope/model"))  # the field the user wrote, not `tokenizer`
    with pytest.raises(FileNotFoundError, match=r"ModelSpec\.tokenizer: no such directory './nope/tok'"):
        load_tokenizer(ModelSpec(name_or_path="./nope/model", tokenizer="./nope/tok"))


def test_incomplete_model_directory_names_field_and_what_is_missing(tmp_path, micro_model_dir, micro_tokenizer):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match=r"ModelSpec\.name_or_path: .*empty' holds no tokenizer"):
        load_tokenizer(ModelSpec(name_or_path=str(empty)))
    with pytest.raises(FileNotFoundError, match=r"ModelSpec\.name_or_path: .*empty' holds no model"):
        build_causal_lm(ModelSpec(name_or_path=str(empty)), micro_tokenizer)
    weightless = tmp_path / "weightless"
    weightless.mkdir()
    (weightless / "config.json").write_text((micro_model_dir / "config.json").read_text())
    with pytest.raises(FileNotFoundError, match=r"holds a config.json but no weights"):
        build_causal_lm(ModelSpec(name_or_path=str(weightless)), micro_tokenizer)


def test_one_slash_path_under_an_existing_folder_is_local(tmp_path, monkeypatch, micro_tokenizer):
    """`outputs/sft` could be a hub id; with `outputs/` here it is a missing local path,
    reported at once instead of after a minute of hub retries."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "outputs").mkdir()
    with pytest.raises(FileNotFoundError, match=r"ModelSpec\.name_or_path: no such directory 'outputs/sft'"):
        build_causal_lm(ModelSpec(name_or_path="outputs/sft"), micro_tokenizer)


def test_unreachable_hub_name_names_the_field(micro_tokenizer, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read at import time
    with pytest.raises(OSError, match=r"ModelSpec\.name_or_path.*no-such-org/no-such-model"):
        build_causal_lm(ModelSpec(name_or_path="no-such-org/no-such-model"), micro_tokenizer)
    with pytest.raises(OSError, match=r"ModelSpec\.name_or_path.*no-such-org/no-such-model"):
        load_tokenizer(ModelSpec(name_or_path="no-such-org/no-such-model"))


def test_quantization_without_bitsandbytes(micro_model_dir, micro_tokenizer, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        factory.importlib.util,
        "find_spec",
        lambda name, *a, **k: None if name == "bitsandbytes" else real(name, *a, **k),
    )
    spec = ModelSpec(name_or_path=str(micro_model_dir), lora=LoraSpec(), quantization=QuantizationSpec())
    with pytest.raises(ImportError, match="quantization"):
        build_causal_lm(spec, micro_tokenizer)


def test_adapter_dir_without_base_is_an_error(tmp_path, micro_tokenizer):
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    with pytest.raises(ValueError, match="base_model_name_or_path"):
        build_causal_lm(ModelSpec(name_or_path=str(tmp_path)), micro_tokenizer)


def test_checkpoints_naming_specs_by_their_path_before_the_package_split_load(tmp_path, monkeypatch):
    """Checkpoints written when the specs lived in ``lit_p3o/models.py`` pickle them as
    ``lit_p3o.models.ModelSpec``; they still load with ``weights_only=True``."""
    spec = ModelSpec(name_or_path="m", lora=LoraSpec(r=4), quantization=QuantizationSpec(bits=8))
    for cls in (LoraSpec, ModelSpec, QuantizationSpec):
        monkeypatch.setattr(cls, "__module__", "lit_p3o.models")
    torch.save({"policy": spec}, tmp_path / "old.ckpt")
    monkeypatch.undo()
    assert torch.load(tmp_path / "old.ckpt", weights_only=True)["policy"] == spec


def test_the_reward_stage_hides_the_load_report_of_the_head_it_trains(micro_model_dir, caplog):
    from lit_p3o.stages.reward import RewardModule

    RewardModule(ModelSpec(name_or_path=str(micro_model_dir)))
    assert "LOAD REPORT" not in caplog.text


def test_a_reward_model_loaded_to_score_still_reports_its_missing_head(micro_model_dir, micro_tokenizer, caplog):
    build_reward_model(ModelSpec(name_or_path=str(micro_model_dir)), micro_tokenizer)
    output = caplog.text
    assert "LOAD REPORT" in output and "score.weight" in output


def test_the_load_report_stays_when_more_than_the_new_head_is_missing(
    micro_model_dir, micro_tokenizer, caplog, tmp_path
):
    """A backbone weight missing from the checkpoint is a real problem, even for the reward stage."""
    from safetensors.torch import load_file, save_file

    broken = tmp_path / "broken"
    shutil.copytree(micro_model_dir, broken)
    weights = load_file(broken / "model.safetensors")
    del weights["model.norm.weight"]
    save_file(weights, broken / "model.safetensors", metadata={"format": "pt"})
    build_reward_model(ModelSpec(name_or_path=str(broken)), micro_tokenizer, new_head_expected=True)
    output = caplog.text
    assert "LOAD REPORT" in output and "model.norm.weight" in output

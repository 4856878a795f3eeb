"""FSDP2 (Lightning's ModelParallelStrategy) on 2 CPU processes: every stage shards, unequal
response lengths do not deadlock, a sharded run resumes exactly, the export loads in plain
transformers, and the README's FSDP command runs. (The equality of one FSDP2 update with one
single-process update is in tests/test_ddp.py.)"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPTS = Path(__file__).parent / "scripts"
ROOT = Path(__file__).parents[1]


def run_script(name: str, *args: str, timeout: int = 500) -> None:
    result = subprocess.run(
        [sys.executable, str(SCRIPTS / name), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode == 0, result.stderr[-4000:]


def load_complete(auto_class, directory: Path):
    """A model saved by an export, loaded by plain transformers, with no weight missing."""
    model, info = auto_class.from_pretrained(directory, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    return model


@pytest.mark.parametrize("overlay", ["fsdp1.yaml", "deepspeed_zero3.yaml"])
def test_gpu_strategy_overlays_parse_and_force_synced_generation(overlay, capsys):
    import yaml

    from lit_p3o.cli import LitP3OCLI

    with pytest.raises(SystemExit) as exit_info:
        LitP3OCLI(
            args=[
                "fit",
                "--config",
                str(ROOT / "configs/demo/p3o.yaml"),
                "--config",
                str(ROOT / "configs/gpu" / overlay),
                "--print_config",
            ]
        )
    assert exit_info.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["trainer"]["strategy"]["class_path"].startswith("lightning.pytorch.strategies.")
    assert printed["model"]["init_args"]["rollout"]["sampling"]["synced_gpus"] is True
    assert printed["model"]["init_args"]["variant"] == "v1"  # the overlay kept the stage config


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_every_stage_shards_and_unequal_lengths_do_not_deadlock(tmp_path):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    run_script("fsdp_stages.py", str(tmp_path))
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["sft"] == {"steps": 2, "sharded": True}
    assert summary["reward"] == {"steps": 1, "sharded": True}
    assert summary["ppo"]["reward_model_sharded"] and summary["ppo"]["value_head_sharded"]  # LoRA + value head
    for name in ("ppo", "dpo", "rloo"):
        assert summary[name]["sharded"] and summary[name]["steps"] == 1 and summary[name]["rollouts"] == 1
        # rank 0 stopped generating after 2 tokens, rank 1 after 8: generation stayed in lockstep
        # (a response may end earlier with EOS; the longest on each rank is its limit)
        assert [max(lengths) for lengths in summary[name]["lengths_by_rank"]] == [2, 8]
    assert summary["dpo"]["reference_sharded"] and summary["rloo"]["reference_sharded"]  # full fine-tuning
    load_complete(AutoModelForCausalLM, tmp_path / "sft")
    load_complete(AutoModelForSequenceClassification, tmp_path / "reward")


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_sharded_run_resumes_mid_rollout_exactly_and_exports_full_weights(tmp_path):
    from transformers import AutoModelForCausalLM

    run_script("fsdp_resume.py", str(tmp_path / "full"), "2")
    # step 2 is half-way through the first rollout's replay: each rank's buffer is in the checkpoint
    checkpoint = tmp_path / "full" / "ckpt" / "epoch=0-step=2.ckpt"
    saved = torch.load(checkpoint, weights_only=False)
    assert [b["consumed"] for b in saved["replay_buffer"]] == [2, 2]
    assert not [k for k in saved["state_dict"] if not k.startswith("policy.")]  # frozen copy left out
    run_script("fsdp_resume.py", str(tmp_path / "resumed"), "2", str(checkpoint))

    full = torch.load(tmp_path / "full" / "result.pt", weights_only=False)
    resumed = torch.load(tmp_path / "resumed" / "result.pt", weights_only=False)
    assert (resumed["step"], resumed["rollouts"]) == (full["step"], full["rollouts"]) == (8, 2)
    assert resumed["weights"].keys() == full["weights"].keys()
    assert any(not torch.equal(full["initial"][k], v) for k, v in full["weights"].items())  # it trained
    for name, value in full["weights"].items():
        torch.testing.assert_close(resumed["weights"][name], value, rtol=0, atol=1e-6)

    exported = load_complete(AutoModelForCausalLM, tmp_path / "full" / "policy").state_dict()
    for name, value in full["weights"].items():
        torch.testing.assert_close(exported[name], value, rtol=0, atol=0)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_readme_fsdp_command_runs(tmp_path):
    """The README's command (`lit-p3o fit --config configs/demo/p3o_fsdp.yaml`), run in a scratch directory."""
    from transformers import AutoModelForCausalLM

    config = ROOT / "configs" / "demo" / "p3o_fsdp.yaml"
    assert f"lit-p3o fit --config configs/demo/{config.name}" in (ROOT / "README.md").read_text()
    result = subprocess.run(
        [sys.executable, "-m", "lit_p3o", "fit", "--config", str(config)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=500,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert "saved the policy" in result.stdout
    load_complete(AutoModelForCausalLM, tmp_path / "outputs" / "demo" / "p3o_fsdp")
    logs = tmp_path / "outputs" / "demo" / "logs" / "p3o_fsdp"
    assert list(logs.rglob("*.ckpt"))
    frontier = (logs / "demo" / "frontier.csv").read_text().splitlines()
    assert len(frontier) == 3  # header, before training, after training (written by rank 0 only)


@pytest.mark.parametrize("precision, dtype", [("bf16-mixed", torch.bfloat16), ("32-true", torch.float32)])
def test_fsdp2_runs_the_forward_in_the_trainers_mixed_precision(tmp_path, precision, dtype):
    """``bf16-mixed`` under FSDP2 becomes its MixedPrecisionPolicy: the sharded layers compute
    with bfloat16 weights; ``32-true`` keeps float32. One process, gloo, in-process."""
    from types import SimpleNamespace

    import torch.distributed as dist
    from micro import MICRO_ARCH
    from torch.distributed.device_mesh import init_device_mesh

    from lit_p3o.models import ModelSpec, build_causal_lm, is_sharded, load_tokenizer
    from lit_p3o.stages.sharding import ShardableModule

    spec = ModelSpec(architecture=dict(MICRO_ARCH), tokenizer="embedded:reviews")
    module = ShardableModule()
    module.policy = build_causal_lm(spec, load_tokenizer(spec))
    seen = []
    q_proj = next(m for name, m in module.policy.named_modules() if name.endswith("q_proj"))
    q_proj.register_forward_hook(lambda mod, args, out: seen.append((mod.weight.dtype, out.dtype)))
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        module._device_mesh = init_device_mesh("cpu", (1,), mesh_dim_names=("data_parallel",))
        module._trainer = SimpleNamespace(precision=precision)
        module.configure_model()
        assert is_sharded(module.policy)
        module.policy(input_ids=torch.tensor([[1, 2, 3]]))
    finally:
        dist.destroy_process_group()
    assert seen == [(dtype, dtype)]

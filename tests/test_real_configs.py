"""configs/hh and configs/tldr run as shipped, with only the download left out.

Each hub id the configs name (model or dataset) is made, in a scratch working directory, as a
local directory of that very name: a tiny model of the same family with a tokenizer like its
own, or data files in the dataset's format and splits. transformers and datasets take an
existing local directory over the hub, so the configs' strings are used unchanged, offline.
Every stage runs for one step: SFT, then the reward model from it, then P3O and PPO from both,
each RL stage also under the LoRA and QLoRA overlays. What the test changes is only what a
laptop lacks (GPU, hours): the accelerator, step counts, batch and sample sizes.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml
from hf_fixtures import gpt2_style_tokenizer, tiny_config
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, GenerationConfig

from lit_p3o.cli import main

ROOT = Path(__file__).resolve().parents[1]
OVERLAYS = ("lora", "qlora")

# the tokenizer each family ships, in miniature: Pythia's (GPT-NeoX) has no pad token; Qwen2.5's
# base model pads with its EOS, <|endoftext|>
HUB_MODELS = {
    "EleutherAI/pythia-1b-deduped": ("gpt_neox", None),
    "Qwen/Qwen2.5-0.5B": ("qwen2", "eos"),
}


def _hh_rows(n: int) -> list[dict]:
    dialogues = [
        f"\n\nHuman: How do I bake {k} loaves?\n\nAssistant: Mix flour.\n\nHuman: Then?\n\nAssistant:" for k in range(n)
    ]
    return [{"chosen": f"{d} Knead, let it rise, then bake it.", "rejected": f"{d} No."} for d in dialogues]


def _tldr_prompt(k: int) -> str:
    return (
        f"SUBREDDIT: r/cooking\nTITLE: My bread is flat ({k})\nPOST: I bake bread every day but it never rises.\nTL;DR:"
    )


HUB_DATASETS = {
    "Anthropic/hh-rlhf": {split: _hh_rows(6) for split in ("train", "test")},
    "trl-lib/tldr": {
        split: [{"prompt": _tldr_prompt(k), "completion": " My bread never rises."} for k in range(6)]
        for split in ("train", "validation", "test")
    },
    "trl-lib/tldr-preference": {
        split: [
            {"prompt": _tldr_prompt(k), "chosen": " My bread never rises.", "rejected": " Bread."} for k in range(6)
        ]
        for split in ("train", "validation")
    },
}


def make_hub_stand_ins(work: Path) -> None:
    """Directories named like the hub ids, under the working directory the runs start in."""
    for name, (model_type, pad) in HUB_MODELS.items():
        tokenizer = gpt2_style_tokenizer(pad=pad)
        # whole 4-bit blocks; the shipped prompt + response budgets fit (Pythia has 2048 positions, Qwen2.5 more)
        config = tiny_config(tokenizer, model_type, hidden_size=64, intermediate_size=128, max_position_embeddings=2048)
        model = AutoModelForCausalLM.from_config(config)
        model.generation_config = GenerationConfig(
            eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id
        )
        model.save_pretrained(work / name)
        tokenizer.save_pretrained(work / name)
    for name, splits in HUB_DATASETS.items():
        (work / name).mkdir(parents=True)
        for split, rows in splits.items():
            (work / name / f"{split}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))


def hub_ids(node) -> set[str]:
    """The strings of a config that name hub repositories (``owner/name``, not our outputs)."""
    if isinstance(node, dict):
        return set().union(*(hub_ids(v) for v in node.values()))
    if isinstance(node, list):
        return set().union(*(hub_ids(v) for v in node))
    if isinstance(node, str) and re.fullmatch(r"[\w.-]+/[\w.-]+", node) and not node.startswith("outputs/"):
        return {node}
    return set()


def one_step(config: dict, variant: str = "") -> dict:
    """The config as shipped, cut to one optimizer step on a CPU; a variant writes elsewhere."""
    trainer = config["trainer"]
    trainer.update(accelerator="cpu", max_epochs=1, max_steps=1, log_every_n_steps=1)
    if "val_check_interval" in trainer:
        trainer.update(val_check_interval=1.0, limit_val_batches=1)
    data = (config.get("data") or {}).get("init_args", {})
    if "batch_size" in data:
        data["batch_size"] = 2
    model = config["model"]["init_args"]
    rollout = model.get("rollout")
    if rollout is not None:
        rollout.update(
            num_prompts=2, minibatch_groups=2, update_epochs=1, generation_batch_size=4, forward_batch_size=4
        )
        rollout["sampling"]["max_new_tokens"] = 6
        for callback in trainer.get("callbacks", []):
            if callback["class_path"] == "lit_p3o.FrontierCallback":
                callback["init_args"]["eval_every"] = 1
                evaluation = callback["init_args"]["evaluation"]
                evaluation.update(num_prompts=2, batch_size=2)
                evaluation.setdefault("sampling", {})["max_new_tokens"] = 6
    if variant:
        model["save_dir"] += f"_{variant}"
        trainer["default_root_dir"] += f"_{variant}"
        trainer["logger"]["init_args"]["name"] += f"_{variant}"
    return config


def fit(work: Path, config_file: Path, overlay: str = "") -> Path:
    """``lit-p3o fit --config <one-step copy> [--config configs/peft/<overlay>.yaml]``; the export."""
    config = one_step(yaml.safe_load(config_file.read_text()), overlay)
    copy = work / f"{config_file.parent.name}_{config_file.stem}{'_' + overlay if overlay else ''}.yaml"
    copy.write_text(yaml.safe_dump(config))
    args = ["fit", "--config", str(copy)]
    if overlay:
        args += ["--config", str(ROOT / "configs" / "peft" / f"{overlay}.yaml")]
    main(args)
    return work / config["model"]["init_args"]["save_dir"]


def test_every_hub_id_the_configs_name_has_a_stand_in():
    """A config naming a new model or dataset must bring its stand-in, or the run below would
    go to the hub (and fail offline)."""
    named = set().union(*(hub_ids(yaml.safe_load(f.read_text())) for f in ROOT.glob("configs/*/*.yaml")))
    assert named == HUB_MODELS.keys() | HUB_DATASETS.keys()


@pytest.mark.timeout(300)
@pytest.mark.parametrize(("task", "family"), [("hh", "gpt_neox"), ("tldr", "qwen2")])
def test_shipped_pipeline_runs_a_step_of_every_stage(task, family, tmp_path, monkeypatch):
    import datasets

    make_hub_stand_ins(tmp_path)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("sys.argv", ["lit-p3o"])  # pytest's own arguments are not the CLI's
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))
    configs = ROOT / "configs" / task

    sft = fit(tmp_path, configs / "sft.yaml")
    assert AutoModelForCausalLM.from_pretrained(sft).config.model_type == family
    reward = fit(tmp_path, configs / "reward.yaml")
    assert AutoModelForSequenceClassification.from_pretrained(reward).config.num_labels == 1
    for stage in ("p3o", "ppo"):
        assert (
            AutoModelForCausalLM.from_pretrained(fit(tmp_path, configs / f"{stage}.yaml")).config.model_type == family
        )
        for overlay in OVERLAYS:
            adapters = fit(tmp_path, configs / f"{stage}.yaml", overlay)
            assert (adapters / "adapter_config.json").is_file(), f"{stage} + {overlay}: no LoRA adapters exported"
        frontier = next((tmp_path / "outputs" / task / "logs").glob(f"{stage}/*/frontier.csv")).read_text()
        assert len(frontier.splitlines()) >= 2, f"{stage}: the held-out evaluation wrote no row"

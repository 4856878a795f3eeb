"""Every user error in one line, no traceback (issue 22, part 2).

Each case runs ``python -m lit_p3o …`` in a subprocess, as a user meets it, and checks that it
exits with 2, that stderr holds no traceback, and that the one ``lit-p3o <command>: error: …``
line names the config path of the field (or the file, or the command's argument).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from micro import MICRO_ARCH
from test_bad_inputs import ENV, ROOT, error_line, p3o_config, sft_config, write_yaml

from lit_p3o.models import ModelSpec, build_causal_lm, load_tokenizer, save_pretrained

REWARDS = """
def raises(prompts, completions, **columns):
    return [float(columns["answer"][0])] * len(completions)  # the embedded prompts have no `answer`

def one_value(prompts, completions, **columns):
    return [1.0]

def nan(prompts, completions, **columns):
    return [float("nan")] * len(completions)

def text(prompts, completions, **columns):
    return ["good"] * len(completions)

def passed(prompts, completions, **columns):
    return [len(c) > 3 for c in completions]

def constant(prompts, completions, **columns):
    return [1.0] * len(completions)

def length(prompts, completions, **columns):
    return [float(len(c.split())) for c in completions]
"""


def fails_in_one_line(result: subprocess.CompletedProcess, *named: str) -> str:
    """The error line, after checking exit code 2, no traceback, and that it names ``named``."""
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    line = error_line(result)
    assert line.startswith("lit-p3o "), result.stderr[-3000:]
    for text in named:
        assert text in line, line
    return line


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    """Saved micro policies: ``sft`` (sound, also linked as ``gold``), ``nan`` (NaN output weights),
    ``no_eos`` (its tokenizer has no EOS token)."""
    root = tmp_path_factory.mktemp("models")
    spec = ModelSpec(architecture=dict(MICRO_ARCH), tokenizer="embedded:reviews")
    tokenizer = load_tokenizer(spec)
    torch.manual_seed(0)
    model = build_causal_lm(spec, tokenizer)
    save_pretrained(model, tokenizer, root / "sft")
    save_pretrained(model, tokenizer, root / "no_eos")
    (root / "gold").symlink_to(root / "sft")  # a judge whose folder name is the gold reward's label
    config = json.loads((root / "no_eos/tokenizer_config.json").read_text())
    (root / "no_eos/tokenizer_config.json").write_text(json.dumps({**config, "eos_token": None}))
    with torch.no_grad():
        model.lm_head.weight.fill_(float("nan"))
    save_pretrained(model, tokenizer, root / "nan")
    return root


def reward_config(policy: Path, **embedded) -> dict:
    """A K-wise (3 responses per prompt) reward stage on embedded pairs sampled from ``policy``."""
    return {
        "trainer": {
            "accelerator": "cpu",
            "max_steps": 1,
            "logger": False,
            "enable_checkpointing": False,
            "enable_progress_bar": False,
            "enable_model_summary": False,
        },
        "model": {"class_path": "lit_p3o.RewardModule", "init_args": {"model": {"name_or_path": str(policy)}}},
        "data": {
            "class_path": "lit_p3o.PreferenceDataModule",
            "init_args": {
                "train": "embedded:reviews",
                "max_length": 32,
                "batch_size": 4,
                "embedded": {
                    "policy": str(policy),
                    "train_pairs": 6,
                    "val_pairs": 2,
                    "max_new_tokens": 4,
                    "responses_per_prompt": 3,
                    **embedded,
                },
            },
        },
    }


SPEC_VALUES = [
    ("rollout.num_responses", "1", "pairwise methods need K >= 2, got 1"),
    ("optimizer.learning_rate", "-1", "must be > 0, got -1.0"),
    ("clip_epsilon", "-0.2", "must be in (0, 1), got -0.2"),
    ("rollout.sampling.max_new_tokens", "0", "must be >= 1, got 0"),
    ("rollout.sampling.temperature", "0", "must be > 0, got 0.0"),
    ("kl.beta", "-1", "must be >= 0, got -1.0"),
    ("guards.max_zero_grad_steps", "0", "must be >= 1, got 0"),
    ("guards.max_skipped_fraction", "2", "must be in [0, 1], got 2.0"),
]

BAD_REWARD_FUNCTIONS = [
    ("raises", "raised KeyError: 'answer'"),
    ("one_value", "must return one value per completion (8), got 1 values"),
    ("text", "value 0 is 'good'; expected a float or None"),
    ("passed", "value 0 is "),  # True or False: booleans are refused, not read as 1.0/0.0
    ("missing", "module 'rewards' has no attribute 'missing'"),
]


TRAINER_COUNTS = [  # Lightning does not check these: each 0 was a ZeroDivisionError inside its loops
    ("accumulate_grad_batches", "0", "must be >= 1, got 0"),
    ("check_val_every_n_epoch", "0", "must be >= 1, got 0"),
]


def cases(models: Path, work: Path) -> dict[str, list[str]]:
    """Every case's command line (configs written into ``work``), by name."""
    (work / "rewards.py").write_text(REWARDS)
    (work / "notes.txt").write_text("my reward model\n")
    (work / "train.csv").write_text("prompt,completion\nhello,world\n")
    (work / "empty_data").mkdir()
    (work / "frontier.csv").write_text("step,kl,score,gold\n")
    torch.save(
        {"hyper_parameters": {"policy": None, "unknown_knob": 1}, "state_dict": {}, "loops": {}},
        work / "unknown_stage.ckpt",
    )  # its stage cannot be told
    configs = {
        "p3o": p3o_config(),
        "sft": sft_config(),
        "sft_csv": sft_config(train="train.csv"),
        "sft_empty_dir": sft_config(train="empty_data"),
        "no_eos": p3o_config(policy={"name_or_path": str(models / "no_eos")}),
        "nan_weights": p3o_config(policy={"name_or_path": str(models / "nan")}),
        "k_wise_batch": reward_config(models / "sft"),
        "k_wise_one": reward_config(models / "sft", responses_per_prompt=1),
        "nan_rewards": p3o_config(reward_model="rewards:nan"),
        "constant_rewards": p3o_config(reward_model="rewards:constant", guards={"max_zero_grad_steps": 2}),
        "weighted": p3o_config(
            reward_model=[{"source": "embedded:reviews"}, {"source": "rewards:text", "weight": 0.5}]
        ),
        "no_module": p3o_config(reward_model="no_such_rewards:score"),
        **{f"function_{name}": p3o_config(reward_model=f"rewards:{name}") for name, _ in BAD_REWARD_FUNCTIONS},
    }
    for name, config in configs.items():
        write_yaml(work / f"{name}.yaml", config)
    fit = lambda name, *args: ["fit", "--config", f"{name}.yaml", *args]  # noqa: E731
    sft, judge_args = str(models / "sft"), ["--num-prompts", "2", "--max-new-tokens", "2", "--out-dir", "w"]
    return {
        **{f"spec {field}": fit("p3o", f"--model.init_args.{field}", value) for field, value, _ in SPEC_VALUES},
        "spec in two places": fit(
            "p3o",
            "--model.init_args.rollout.sampling.temperature",
            "0.7",
            "--model.init_args.evaluation.sampling.temperature",
            "0",
        ),
        "value of the wrong type": fit("p3o", "--model.init_args.rollout.num_responses", "abc"),
        "callback that does not import": fit("p3o", "--trainer.callbacks+", "lightning.pytorch.callbacks.Nope"),
        "trainer setting": fit("p3o", "--trainer.max_epochs", "-2"),
        **{f"trainer {name}": fit("p3o", f"--trainer.{name}", value) for name, value, _ in TRAINER_COUNTS},
        "reward model file": fit("p3o", "--model.init_args.reward_model", "notes.txt"),
        "unknown task as reward model": fit("p3o", "--model.init_args.reward_model", "embedded:nosuch"),
        "unknown task as tokenizer": fit("p3o", "--model.init_args.policy.tokenizer", "embedded:nosuch"),
        "data file on the command line": fit("sft", "--data.init_args.train", "train.csv"),
        "data file in the config": fit("sft_csv"),
        **{name: fit(name) for name in configs if name not in ("p3o", "sft", "sft_csv")},
        "constant_rewards": fit("constant_rewards", "--trainer.max_epochs", "2"),
        "frontier without rows": ["frontier", "p3o=frontier.csv", "--out", "f.png"],
        "misspelt fit flag": fit("p3o", "--trainer.max_epoch", "2", "--print_config"),  # was max_epochs
        "misspelt frontier flag": ["frontier", "p3o=frontier.csv", "--ou", "f.png"],  # was --out
        "export of an unknown stage": ["export", "--ckpt", "unknown_stage.ckpt", "--out", "exported"],
        "export --stage that does not import": [
            "export",
            "--ckpt",
            "unknown_stage.ckpt",
            "--out",
            "exported",
            "--stage",
            "lit_p3o.Nope",
        ],
        "export --stage that is no stage": [
            "export",
            "--ckpt",
            "unknown_stage.ckpt",
            "--out",
            "exported",
            "--stage",
            "lit_p3o.SamplingSpec",
        ],
        "report missing policy": [
            "report",
            "--reference",
            sft,
            "--policy",
            "outputs/missing",
            "--judge",
            "embedded:reviews",
            "--num-prompts",
            "2",
        ],
        "winrate missing judge": ["winrate", f"a={sft}", f"b={sft}", "--judge", "./judges/missing", *judge_args],
        "winrate judge not importable": [
            "winrate",
            f"a={sft}",
            f"b={sft}",
            "--judge",
            "no_such_judge:score",
            *judge_args,
        ],
        "winrate judge raises": ["winrate", f"a={sft}", f"b={sft}", "--judge", "rewards:raises", *judge_args],
        "winrate judge of another task": [
            "winrate",
            f"a={sft}",
            f"b={sft}",
            "--judge",
            "embedded:arithmetic",
            *judge_args,
        ],
        "winrate judge folder named gold": [
            "winrate",
            f"a={sft}",
            f"b={sft}",
            "--judge",
            str(models / "gold"),
            *judge_args,
        ],
        "report --also reference": [
            "report",
            "--reference",
            sft,
            "--policy",
            sft,
            "--judge",
            "embedded:reviews",
            "--num-prompts",
            "2",
            "--also",
            f"reference={sft}",
        ],
        "winrate unknown judge task": ["winrate", f"a={sft}", f"b={sft}", "--judge", "embedded:nosuch", *judge_args],
        "winrate unknown prompts task": [
            "winrate",
            f"a={sft}",
            f"b={sft}",
            "--judge",
            "embedded:reviews",
            "--prompts",
            "embedded:nosuch",
            *judge_args,
        ],
    }


RUN_EACH = """
import json, sys
from lit_p3o.cli import main
for args in json.loads(sys.argv[1]):
    try:
        main(args)
        code = 0
    except SystemExit as exit:
        code = exit.code
    print(f"\\n@@ exit {code}", file=sys.stderr, flush=True)
"""


@pytest.fixture(scope="module")
def results(models, tmp_path_factory) -> dict[str, subprocess.CompletedProcess]:
    """All cases through ``main()`` in one interpreter (its imports paid once, not per case):
    each one's exit code and stderr."""
    work = tmp_path_factory.mktemp("cases")
    command_lines = cases(models, work)
    run = subprocess.run(
        [sys.executable, "-c", RUN_EACH, json.dumps(list(command_lines.values()))],
        cwd=work,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=900,
    )
    chunks = run.stderr.split("\n@@ exit ")
    assert run.returncode == 0 and len(chunks) == len(command_lines) + 1, run.stderr[-5000:]
    out = {}
    for (name, args), before, after in zip(command_lines.items(), chunks, chunks[1:]):
        code, _, _ = after.partition("\n")
        out[name] = subprocess.CompletedProcess(args, int(code) if code.isdigit() else 1, "", before)
    return out


# --------------------------------------------------------------------------- spec values


@pytest.mark.parametrize("field, value, message", SPEC_VALUES)
def test_spec_value_out_of_range_names_its_config_path(results, field, value, message):
    assert fails_in_one_line(results[f"spec {field}"]) == f"lit-p3o fit: error: model.init_args.{field}: {message}"


def test_a_spec_used_in_two_places_is_named_where_its_value_is_bad(results):
    assert fails_in_one_line(results["spec in two places"]) == (
        "lit-p3o fit: error: model.init_args.evaluation.sampling.temperature: must be > 0, got 0.0"
    )


@pytest.mark.parametrize(
    "case, line",
    [
        ("value of the wrong type", "model.init_args.rollout.num_responses: Expected a <class 'int'>. Got value: abc"),
        (
            "callback that does not import",
            "trainer.callbacks: module 'lightning.pytorch.callbacks' has no attribute 'Nope'",
        ),
    ],
)
def test_parser_errors_are_one_line_naming_the_config_path(results, case, line):
    """jsonargparse printed the subcommand's usage (60 lines) and every union member it tried."""
    assert fails_in_one_line(results[case]) == f"lit-p3o fit: error: {line}"
    assert "usage:" not in results[case].stderr


def test_trainer_setting_lightning_refuses_is_one_line(results):
    assert fails_in_one_line(results["trainer setting"]) == (
        "lit-p3o fit: error: `max_epochs` must be a non-negative integer or -1. You passed in -2."
    )


@pytest.mark.parametrize("name, value, message", TRAINER_COUNTS)
def test_trainer_count_lightning_does_not_check_names_it(results, name, value, message):
    assert fails_in_one_line(results[f"trainer {name}"]) == f"lit-p3o fit: error: trainer.{name}: {message}"


def test_lit_p3o_debug_shows_the_traceback(tmp_path):
    write_yaml(tmp_path / "p3o.yaml", p3o_config())
    result = subprocess.run(
        [sys.executable, "-m", "lit_p3o", "fit", "--config", "p3o.yaml", "--model.init_args.kl.beta", "-1"],
        cwd=tmp_path,
        env={**ENV, "LIT_P3O_DEBUG": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2
    assert "Traceback" in result.stderr and 'raise ValueError(f"KLSpec.beta: must be >= 0' in result.stderr
    assert error_line(result) == "lit-p3o fit: error: model.init_args.kl.beta: must be >= 0, got -1.0"


def test_k_wise_batch_size_that_splits_a_group_names_the_data_field(results):
    fails_in_one_line(
        results["k_wise_batch"],
        "lit-p3o fit: error: data.init_args.batch_size: 4 is not a multiple of the 3 pairs per prompt",
    )


def test_k_wise_responses_per_prompt_of_one_names_the_data_field(results):
    assert fails_in_one_line(results["k_wise_one"]) == (
        "lit-p3o fit: error: data.init_args.embedded.responses_per_prompt: must be >= 2, got 1"
    )


# --------------------------------------------------------------------------- paths


def test_reward_model_pointing_at_a_file_names_the_path(results):
    assert fails_in_one_line(results["reward model file"]) == (
        "lit-p3o fit: error: model.init_args.reward_model: 'notes.txt' is a file; expected a directory written by save_pretrained"
    )


@pytest.mark.parametrize(
    "case, line",
    [
        ("unknown task as reward model", "lit-p3o fit: error: model.init_args.reward_model: "),
        ("unknown task as tokenizer", "lit-p3o fit: error: model.init_args.policy.tokenizer: "),
        ("winrate unknown judge task", "lit-p3o winrate: error: --judge: "),
        ("winrate unknown prompts task", "lit-p3o winrate: error: --prompts: "),
    ],
)
def test_unknown_embedded_task_names_the_field_and_the_known_tasks(results, case, line):
    """It was a ValueError traceback (resolve_embedded) that named neither."""
    assert fails_in_one_line(results[case]) == f"{line}unknown embedded task 'nosuch'; known tasks: arithmetic, reviews"


@pytest.mark.parametrize("case", ["data file on the command line", "data file in the config"])
def test_a_data_file_path_stays_a_path(results, case):
    """jsonargparse used to read a text file's contents as the value (a hub id to download)."""
    assert fails_in_one_line(results[case]) == (
        "lit-p3o fit: error: train.csv: unsupported file type; expected one of .jsonl, .json, .jsonl.gz, .json.gz, .parquet"
    )


def test_empty_data_directory_names_it(results):
    assert fails_in_one_line(results["sft_empty_dir"]) == (
        "lit-p3o fit: error: empty_data: an empty directory; expected data files (.jsonl, .json, .jsonl.gz, .json.gz, "
        ".parquet) or a dataset written by save_to_disk"
    )


def test_tokenizer_without_eos_names_the_model_field(results, models):
    assert fails_in_one_line(results["no_eos"]) == (
        f"lit-p3o fit: error: model.init_args.policy.name_or_path: tokenizer '{models / 'no_eos'}' has no EOS token, "
        "so responses could never end (set eos_token in its tokenizer_config.json)"
    )


def test_non_finite_policy_weights_are_named_as_the_cause(results, models):
    fails_in_one_line(
        results["nan_weights"],
        f"lit-p3o fit: error: model.init_args.policy.name_or_path: sampling from {models / 'nan'} met non-finite "
        "next-token probabilities; 1 of its weight tensors hold NaN/inf (first: lm_head.weight)",
    )


# --------------------------------------------------------------------------- reward functions


@pytest.mark.parametrize("function, message", BAD_REWARD_FUNCTIONS)
def test_bad_reward_function_names_it_and_the_field(results, function, message):
    fails_in_one_line(
        results[f"function_{function}"],
        f"lit-p3o fit: error: model.init_args.reward_model: reward function rewards:{function}: {message}",
    )


def test_reward_function_inside_a_weighted_reward_names_its_entry(results):
    fails_in_one_line(
        results["weighted"], "lit-p3o fit: error: model.init_args.reward_model[1].source: reward function rewards:text:"
    )


def test_reward_function_returning_nan_for_everything_stops_the_run(results):
    fails_in_one_line(
        results["nan_rewards"],
        "were skipped, more than model.init_args.guards.max_skipped_fraction = 0.1 allows",
        "(rewards:nan)",
    )


def test_constant_reward_function_stops_at_the_gradient_guard(results):
    fails_in_one_line(
        results["constant_rewards"],
        "`policy` got exactly-zero gradients in 2 consecutive optimizer steps "
        "(model.init_args.guards.max_zero_grad_steps = 2)",
        "every response to a prompt got the same reward",
    )


def test_reward_function_module_that_does_not_import_is_named(results):
    fails_in_one_line(
        results["no_module"],
        "model.init_args.reward_model: reward function no_such_rewards:score: cannot import module 'no_such_rewards'",
    )


def test_reward_function_in_the_working_directory_imports_without_python_m(tmp_path):
    """The ``lit-p3o`` console script does not put the working directory on sys.path (``python
    -P`` reproduces that); main() does, as ``python -m`` would."""
    (tmp_path / "rewards.py").write_text(REWARDS)
    write_yaml(tmp_path / "p3o.yaml", p3o_config(reward_model="rewards:length"))
    result = subprocess.run(
        [sys.executable, "-P", "-c", "from lit_p3o.cli import main; main()", "fit", "--config", "p3o.yaml"],
        cwd=tmp_path,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "export" / "model.safetensors").is_file()


# --------------------------------------------------------------------------- frontier, winrate, report


def test_frontier_of_a_csv_without_rows_names_it(results):
    assert fails_in_one_line(results["frontier without rows"]) == (
        "lit-p3o frontier: error: frontier.csv: no frontier rows (FrontierCallback writes one per evaluation)"
    )
    assert "usage:" not in results["frontier without rows"].stderr  # argparse's, above the line


@pytest.mark.parametrize(
    "case, line",
    [
        ("misspelt fit flag", "lit-p3o fit: error: unrecognized arguments: --trainer.max_epoch 2"),
        ("misspelt frontier flag", "lit-p3o frontier: error: unrecognized arguments: --ou f.png"),
    ],
)
def test_a_misspelt_flag_is_named_not_read_as_the_flag_it_abbreviates(results, case, line):
    assert fails_in_one_line(results[case]) == line
    assert "usage:" not in results[case].stderr


def test_report_with_a_missing_policy_names_the_argument(results):
    line = fails_in_one_line(
        results["report missing policy"],
        "lit-p3o report: error: --policy: 'outputs/missing' is neither a local model directory nor a reachable hub model",
    )
    assert "ModelSpec" not in line


@pytest.mark.parametrize(
    "case, message",
    [
        ("winrate missing judge", "--judge: no such directory './judges/missing'"),
        (
            "winrate judge not importable",
            "--judge: reward function no_such_judge:score: cannot import module 'no_such_judge'",
        ),
        ("winrate judge raises", "--judge: reward function rewards:raises: raised KeyError"),
    ],
)
def test_winrate_with_a_bad_judge_names_it(results, case, message):
    fails_in_one_line(results[case], f"lit-p3o winrate: error: {message}")


@pytest.mark.parametrize(
    "case, message",
    [
        (
            "winrate judge of another task",
            "winrate: error: --judge embedded:arithmetic: the gold reward of another "
            "task than --prompts embedded:reviews; a task's gold reward scores only its own prompts (give --judge "
            "embedded:reviews, or a reward model)",
        ),
        (
            "winrate judge folder named gold",
            "winrate: error: --judge {models}/gold: a reward model folder named "
            "'gold' would share its label with the gold reward of --prompts embedded:reviews; rename the folder",
        ),
        (
            "report --also reference",
            "report: error: --also reference=...: 'reference' names a built-in row of the "
            "report (reference, trained); label the extra policy otherwise",
        ),
    ],
)
def test_a_label_clash_names_the_argument(results, models, case, message):
    """Both were ValueError tracebacks naming the Python functions (judge_policies, report)."""
    assert fails_in_one_line(results[case]) == f"lit-p3o {message.format(models=models)}"


# --------------------------------------------------------------------------- export


@pytest.mark.parametrize(
    "case, message",
    [
        (
            "export of an unknown stage",
            "--ckpt unknown_stage.ckpt: cannot tell which stage wrote this checkpoint "
            "(hyperparameters ['policy', 'unknown_knob']; matching: none); pass --stage with its class path, e.g. "
            "--stage lit_p3o.P3OModule",
        ),
        (
            "export --stage that does not import",
            "--stage: lit_p3o.Nope does not import (module 'lit_p3o' has no attribute 'Nope')",
        ),
        (
            "export --stage that is no stage",
            "--stage: lit_p3o.SamplingSpec is not a LightningModule, so it wrote no checkpoint",
        ),
    ],
)
def test_export_of_a_checkpoint_whose_stage_is_unknown_names_stage(results, case, message):
    assert fails_in_one_line(results[case]) == f"lit-p3o export: error: {message}"


# --------------------------------------------------------------------------- bugs keep their traceback


def test_a_bug_keeps_its_traceback(tmp_path):
    """Only user errors are cut to one line: an exception of the library's own (here a bug
    planted in a callback) still shows where it happened."""
    (tmp_path / "planted.py").write_text(
        "import lightning as L\n\nclass Broken(L.Callback):\n"
        "    def on_train_start(self, trainer, pl_module):\n        raise KeyError('planted bug')\n"
    )
    config = p3o_config()
    config["trainer"]["callbacks"] = [{"class_path": "planted.Broken"}]
    write_yaml(tmp_path / "p3o.yaml", config)
    result = subprocess.run(
        [sys.executable, "-m", "lit_p3o", "fit", "--config", "p3o.yaml"],
        cwd=tmp_path,
        env={**ENV, "PYTHONPATH": os.pathsep.join([str(ROOT), str(tmp_path)])},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 1
    assert "Traceback" in result.stderr and "KeyError: 'planted bug'" in result.stderr
    assert ": error: " not in result.stderr

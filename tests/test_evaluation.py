"""Evaluation: win rates, the KL–reward frontier (evaluate_policy, FrontierCallback) and the
``lit-p3o frontier`` / ``lit-p3o winrate`` commands."""

import csv
import json
import struct
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import yaml
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from micro import MICRO_ARCH as MICRO

from lit_p3o import (
    EvaluationSpec,
    FrozenReference,
    ModelSpec,
    OnlineDPOModule,
    OptimizerSpec,
    P3OModule,
    PPOModule,
    RLOOModule,
    RolloutSpec,
    SamplingSpec,
)
from lit_p3o.cli import main
from lit_p3o.commands._common import _label_and_path
from lit_p3o.commands.frontier import plot_frontier
from lit_p3o.commands.report import report
from lit_p3o.commands.winrate import win_rate, win_rate_matrix
from lit_p3o.errors import UserError, locate
from lit_p3o.evaluation import (
    FRONTIER_COLUMNS,
    FrontierCallback,
    evaluate_examples,
    evaluate_policy,
    sample_completions,
    seeded,
)
from lit_p3o.models import build_causal_lm, build_reward_model, load_tokenizer, save_pretrained
from lit_p3o.scoring import build_scorer
from lit_p3o.tasks import get_task

SPEC = ModelSpec(architecture=MICRO, tokenizer="embedded:reviews")
TASK = get_task("reviews")


def micro_policy(seed: int = 0):
    torch.manual_seed(seed)
    tokenizer = load_tokenizer(SPEC)
    return build_causal_lm(SPEC, tokenizer), tokenizer


def read_rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def png_width(path: Path) -> int:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">I", data[16:20])[0]


# --------------------------------------------------------------------------- win rates


def test_win_rate_counts_ties_as_half():
    assert win_rate([1, 2, 3, 4], [0, 2, 5, 4]) == pytest.approx((1 + 0.5 * 2) / 4)
    assert win_rate([3.0, 3.0, 1.0], [1.0, 2.0, 3.0]) == pytest.approx(2 / 3)
    assert win_rate([1.0, 2.0, 3.0], [3.0, 3.0, 1.0]) == pytest.approx(1 / 3)
    assert win_rate([0.5, 0.5], [0.5, 0.5]) == 0.5
    assert win_rate(torch.tensor([2.0]), torch.tensor([1.0])) == 1.0
    with pytest.raises(ValueError):
        win_rate([1.0, 2.0], [1.0])
    with pytest.raises(ValueError):
        win_rate([], [])


def test_win_rate_matrix_has_half_diagonal_and_complements():
    g = torch.Generator().manual_seed(0)
    judged = {name: torch.randint(0, 4, (50,), generator=g).float() for name in ("p3o", "ppo", "dpo", "sft")}
    names, m = win_rate_matrix(judged)
    assert names == ["p3o", "ppo", "dpo", "sft"]
    assert torch.allclose(m.diagonal(), torch.full((4,), 0.5, dtype=m.dtype))
    assert torch.allclose(m + m.T, torch.ones_like(m))
    assert m[0, 1].item() == pytest.approx(win_rate(judged["p3o"], judged["ppo"]))


# --------------------------------------------------------------------------- evaluate_policy


def test_seeded_restores_the_callers_random_stream():
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    with seeded(123):
        inside = torch.rand(3)
    assert torch.equal(torch.rand(3), expected)
    with seeded(123):
        assert torch.equal(torch.rand(3), inside)


def test_kl_is_zero_against_itself_and_positive_after_a_perturbation():
    policy, tokenizer = micro_policy()
    reference = FrozenReference(policy)
    scorer = build_scorer("embedded:reviews", tokenizer)
    prompts = TASK.prompts("test", 24)
    sampling = SamplingSpec(max_new_tokens=8)

    def point():
        with seeded(0):
            return evaluate_policy(policy, reference, tokenizer, scorer, prompts, sampling, 16, TASK, batch_size=10)

    same = point()
    assert same["kl"] == pytest.approx(0.0, abs=1e-5)
    assert 1 <= same["response_length"] <= 8 and 0 <= same["eos_rate"] <= 1
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    assert point()["kl"] > 0.1


def test_evaluation_kl_uses_the_sampling_temperature():
    policy, tokenizer = micro_policy()
    reference = FrozenReference(policy)
    with torch.no_grad():
        policy.lm_head.weight.add_(0.3 * torch.randn_like(policy.lm_head.weight))
    prompts, sampling = TASK.prompts("test", 6), SamplingSpec(max_new_tokens=6, temperature=0.7)
    scorer = build_scorer("embedded:reviews", tokenizer)
    with seeded(4):
        point = evaluate_policy(policy, reference, tokenizer, scorer, prompts, sampling, 16, batch_size=4)
    with seeded(4):
        out = sample_completions(policy, tokenizer, prompts, sampling, 16, batch_size=4)

    def logp(model, e):
        ids = torch.tensor([e.prompt_ids + e.response_ids])
        with torch.no_grad():
            z = model(input_ids=ids).logits[0, len(e.prompt_ids) - 1 : -1].double() / 0.7
        return torch.log_softmax(z, -1).gather(-1, ids[0, len(e.prompt_ids) :, None]).sum().item()

    with reference.active() as ref:
        expected = sum(logp(policy, e) - logp(ref, e) for e in out.examples) / len(prompts)
    assert point["kl"] == pytest.approx(expected, abs=1e-4)


def test_gold_is_the_task_reward_of_the_decoded_responses():
    policy, tokenizer = micro_policy(seed=1)
    prompts = TASK.prompts("test", 12)
    sampling = SamplingSpec(max_new_tokens=8)
    scorer = build_scorer("embedded:reviews", tokenizer)
    with seeded(3):
        point = evaluate_policy(
            policy, FrozenReference(policy), tokenizer, scorer, prompts, sampling, 16, TASK, batch_size=5
        )
    with seeded(3):
        out = sample_completions(policy, tokenizer, prompts, sampling, 16, batch_size=5)
    direct = [TASK.gold_reward(p, r, e) for p, r, e in zip(prompts, out.responses, out.ended)]
    assert point["gold"] == pytest.approx(sum(direct) / len(direct))
    assert point["score"] == pytest.approx(point["gold"], abs=1e-5)  # the scorer is the gold reward here
    assert point["eos_rate"] == pytest.approx(sum(out.ended) / len(prompts))
    assert evaluate_policy(policy, FrozenReference(policy), tokenizer, scorer, prompts, sampling, 16)["gold"] is None


# --------------------------------------------------------------------------- FrontierCallback


def p3o_stage() -> P3OModule:
    return P3OModule(
        policy=SPEC,
        reward_model="embedded:reviews",
        rollout=RolloutSpec(
            prompt_pool=32,
            num_prompts=4,
            num_responses=2,
            update_epochs=1,
            minibatch_groups=2,
            max_prompt_tokens=16,
            sampling=SamplingSpec(max_new_tokens=8),
        ),
        optimizer=OptimizerSpec(learning_rate=1e-2),
    )


def frontier(num_prompts: int, eval_every: int) -> FrontierCallback:
    return FrontierCallback(
        EvaluationSpec(num_prompts=num_prompts, sampling=SamplingSpec(max_new_tokens=8)), eval_every
    )


def fit(tmp_path: Path, callbacks: list[L.Callback], **kwargs) -> P3OModule:
    L.seed_everything(0)
    stage = p3o_stage()
    options = dict(
        accelerator="cpu",
        devices=1,
        logger=CSVLogger(tmp_path),
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=1,
        callbacks=callbacks,
        enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks),
    )
    L.Trainer(**{**options, **kwargs}).fit(stage)
    return stage


def test_frontier_callback_writes_one_row_per_evaluated_step(tmp_path):
    callback = frontier(8, eval_every=2)
    # 2 minibatches per rollout and 2 per optimizer step: steps 1, 2, 3 at the ends of epochs
    # 0, 1, 2; step 2 is still current at the first batch of epoch 2 and must not repeat.
    stage = fit(tmp_path, [callback], max_epochs=3, accumulate_grad_batches=2)
    assert stage.trainer.global_step == 3
    path = Path(stage.trainer.log_dir) / "frontier.csv"
    rows = read_rows(path)
    assert list(rows[0]) == list(FRONTIER_COLUMNS)
    assert [int(r["step"]) for r in rows] == [0, 2, 3]  # start, the multiple of 2, the end
    assert float(rows[0]["kl"]) == pytest.approx(0.0, abs=1e-4)  # π_θ = π_ref before any update
    assert all(r["gold"] != "" for r in rows)
    assert [r["step"] for r in callback.rows] == [0, 2, 3]
    metrics = read_rows(Path(stage.trainer.log_dir) / "metrics.csv")
    logged = [(int(r["step"]), float(r["eval/kl"])) for r in metrics if r.get("eval/kl")]
    assert logged == [(int(r["step"]), pytest.approx(float(r["kl"]))) for r in rows]


def test_frontier_callback_leaves_the_training_randomness_alone(tmp_path):
    plain = fit(tmp_path / "plain", [], max_epochs=2)
    evaluated = fit(tmp_path / "evaluated", [frontier(4, eval_every=1)], max_epochs=2)
    a, b = plain.policy.state_dict(), evaluated.policy.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    L.seed_everything(0)  # as fit() does: the weights both runs started from
    initial = p3o_stage().policy.state_dict()
    assert plain.skipped_steps == 0
    assert all(not torch.equal(a[k], initial[k]) for k in a)  # it did train


def test_frontier_callback_evaluates_under_the_trainers_precision(tmp_path, monkeypatch):
    import lit_p3o.evaluation as evaluation

    seen, real = [], evaluation.response_logprobs

    def spy(model, batch, temperature=1.0):
        seen.append(torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16)
        return real(model, batch, temperature)

    monkeypatch.setattr(evaluation, "response_logprobs", spy)
    fit(
        tmp_path,
        [frontier(4, eval_every=100)],
        max_epochs=1,
        precision="bf16-mixed",
    )
    assert seen and all(seen)  # policy and reference passes at the start and at the end


def test_a_resumed_run_appends_without_repeating_its_last_step(tmp_path):
    def run(max_epochs: int, ckpt_path: str | None = None) -> None:
        L.seed_everything(0)
        L.Trainer(
            accelerator="cpu",
            devices=1,
            max_epochs=max_epochs,
            logger=False,
            default_root_dir=tmp_path,
            enable_progress_bar=False,
            enable_model_summary=False,
            callbacks=[
                frontier(4, eval_every=1),
                ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True),
            ],
        ).fit(p3o_stage(), ckpt_path=ckpt_path)

    run(max_epochs=1)
    run(max_epochs=2, ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    assert [int(r["step"]) for r in read_rows(tmp_path / "frontier.csv")] == [0, 1, 2, 3, 4]


def test_model_checkpoint_monitoring_an_eval_metric_keeps_the_best_point(tmp_path):
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="eval/gold", mode="max", save_top_k=1)
    stage = fit(tmp_path, [frontier(8, eval_every=1), checkpoint], max_epochs=3)
    # 2 optimizer steps per rollout; ModelCheckpoint saves at each rollout's end (steps 2, 4, 6)
    rows = {int(r["step"]): float(r["gold"]) for r in read_rows(Path(stage.trainer.log_dir) / "frontier.csv")}
    assert sorted(rows) == list(range(7))
    best_step = max((2, 4, 6), key=lambda step: rows[step])
    assert checkpoint.best_model_score.item() == pytest.approx(rows[best_step])
    assert Path(checkpoint.best_model_path).is_file() and f"step={best_step}" in checkpoint.best_model_path
    assert stage.trainer.callback_metrics["eval/gold"].item() == pytest.approx(rows[6])


def test_early_stopping_can_watch_an_eval_metric(tmp_path):
    from lightning.pytorch.callbacks import EarlyStopping

    # kl is 0 at step 0 and grows: "min" with patience 0 stops after the first rollout's end
    stopper = EarlyStopping(monitor="eval/kl", mode="min", patience=0, check_on_train_epoch_end=True)
    stage = fit(tmp_path, [frontier(8, eval_every=1), stopper], max_epochs=5)
    assert stopper.stopped_epoch == 1 and stage.trainer.current_epoch == 2
    assert stage.trainer.global_step == 4


@pytest.mark.parametrize("field", ["predict_prompts", "predictions_file"])
def test_frontier_callback_refuses_the_predict_settings_it_would_ignore(field):
    with pytest.raises(ValueError, match=f"^EvaluationSpec.{field}: FrontierCallback never predicts") as raised:
        FrontierCallback(EvaluationSpec(**{field: "x.jsonl"}))
    frontier = {"class_path": "lit_p3o.FrontierCallback", "init_args": {"evaluation": {field: "x.jsonl"}}}
    located = locate(str(raised.value), {"trainer": {"callbacks": [frontier]}})
    assert located.startswith(f"trainer.callbacks[0].init_args.evaluation.{field}: FrontierCallback never predicts")


def test_frontier_callback_stops_at_the_rollouts_stop_strings_unless_told_its_own():
    rollout = RolloutSpec(sampling=SamplingSpec(stop_strings=["\n"]))
    assert FrontierCallback().sampling(rollout).stop_strings == ["\n"]
    own = FrontierCallback(EvaluationSpec(sampling=SamplingSpec(max_new_tokens=4, stop_strings=["."])))
    assert own.sampling(rollout) == SamplingSpec(max_new_tokens=4, stop_strings=["."])
    assert FrontierCallback().sampling(None) == SamplingSpec()  # not an RL stage's rollout: as given


# --------------------------------------------------------------------------- commands


def write_frontier(path: Path, rows: list[tuple[float, float, float | None]]) -> Path:
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(FRONTIER_COLUMNS)
        for step, (kl, score, gold) in enumerate(rows):
            writer.writerow([step, kl, score, "" if gold is None else gold, 5.0, 1.0])
    return path


def test_plot_frontier_draws_a_gold_panel_only_with_gold(tmp_path):
    with_gold = write_frontier(tmp_path / "a.csv", [(0.0, 0.1, -1.0), (0.5, 0.4, -0.6), (1.2, 0.9, -0.2)])
    no_gold = write_frontier(tmp_path / "b.csv", [(0.0, 0.2, None), (0.8, 0.5, None)])
    two = plot_frontier({"p3o-v1 beta=0.05 seed=0": with_gold, "ppo beta=0.05 seed=0": no_gold}, tmp_path / "two.png")
    one = plot_frontier({"ppo beta=0.05 seed=0": no_gold}, tmp_path / "one.png")
    assert two.stat().st_size > 0 and one.stat().st_size > 0
    assert png_width(two) == 2 * png_width(one)


def test_cli_dispatches_frontier(tmp_path, capsys):
    a = write_frontier(tmp_path / "a.csv", [(0.0, 0.1, -1.0), (0.4, 0.3, -0.5)])
    b = write_frontier(tmp_path / "b.csv", [(0.0, 0.1, -1.0), (0.9, 0.6, -0.4)])
    out = tmp_path / "plots" / "frontier.png"
    main(["frontier", f"p3o-v1 beta=0.05={a}", f"ppo beta=0.05={b}", "--out", str(out)])
    assert out.stat().st_size > 0
    out.unlink()
    with pytest.raises(SystemExit) as exit_info:
        main(["frontier", f"p3o={a}", f"p3o={b}", "--out", str(out)])
    assert exit_info.value.code == 2  # a usage error in one line (no usage text), not a crash
    assert capsys.readouterr().err == "lit-p3o frontier: error: duplicate labels: p3o\n"
    assert not out.exists()  # refused before plotting


def test_labels_may_contain_equals_signs(tmp_path):
    csv_path = write_frontier(tmp_path / "beta=0.1.csv", [(0.0, 0.0, None)])
    assert _label_and_path(f"p3o beta=0.1={csv_path}") == ("p3o beta=0.1", str(csv_path))
    assert _label_and_path("sft=gpt2") == ("sft", "gpt2")


def test_winrate_command_writes_complementary_matrices(tmp_path, capsys):
    tokenizer = load_tokenizer(SPEC)
    for seed in (0, 1):
        policy, _ = micro_policy(seed)
        save_pretrained(policy, tokenizer, tmp_path / f"policy{seed}")
    torch.manual_seed(2)
    save_pretrained(build_reward_model(SPEC, tokenizer), tokenizer, tmp_path / "rm")
    out_dir = tmp_path / "winrates"
    main(
        [
            "winrate",
            f"a={tmp_path / 'policy0'}",
            f"a again={tmp_path / 'policy0'}",
            f"b={tmp_path / 'policy1'}",
            "--judge",
            str(tmp_path / "rm"),
            "--num-prompts",
            "12",
            "--max-new-tokens",
            "8",
            "--out-dir",
            str(out_dir),
        ]
    )
    assert "win rate of row over column" in capsys.readouterr().out
    rows = read_rows(out_dir / "winrates.csv")
    table = {(r["judge"], r["policy_a"], r["policy_b"]): float(r["win_rate"]) for r in rows}
    assert {judge for judge, _, _ in table} == {"rm", "gold"}  # embedded prompts add the gold judge
    assert len(table) == 2 * 9
    for (judge, a, b), value in table.items():
        assert value + table[(judge, b, a)] == pytest.approx(1.0)
    for judge in ("rm", "gold"):
        assert table[(judge, "a", "a again")] == 0.5  # same weights and seed: identical samples
        assert (out_dir / f"winrates_{judge}.png").stat().st_size > 0


# --------------------------------------------------------------------------- validate / test / predict


def rl_stage(cls=P3OModule, evaluation: EvaluationSpec | None = None):
    L.seed_everything(0)
    rollout = RolloutSpec(
        prompt_pool=32,
        num_prompts=4,
        num_responses=2,
        update_epochs=1,
        minibatch_groups=2,
        max_prompt_tokens=16,
        sampling=SamplingSpec(max_new_tokens=8),
    )
    return cls(
        policy=SPEC,
        reward_model="embedded:reviews",
        rollout=rollout,
        evaluation=evaluation,
        optimizer=OptimizerSpec(learning_rate=1e-2),
    )


def quiet_trainer(tmp_path: Path, **kwargs) -> L.Trainer:
    options = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        default_root_dir=tmp_path,
    )
    return L.Trainer(**{**options, **kwargs})


EVAL = EvaluationSpec(
    num_prompts=12, batch_size=5, max_prompt_tokens=16, sampling=SamplingSpec(max_new_tokens=8), seed=3
)


def test_validate_reports_the_held_out_evaluation_batch_by_batch(tmp_path):
    stage = rl_stage(evaluation=EVAL)
    with torch.no_grad():  # move the policy away from the reference so KL is not trivially 0
        for p in stage.policy.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    [metrics] = quiet_trainer(tmp_path).validate(stage)
    # by hand: batches of 5, 5, 2 prompts, batch i seeded with seed + i, means over all 12
    prompts = TASK.prompts("test", 12)
    parts = []
    for i, start in enumerate(range(0, 12, 5)):
        with seeded(3 + i):
            parts.append(
                evaluate_examples(
                    stage.policy,
                    stage.reference,
                    stage.tokenizer,
                    stage.scorer,
                    prompts[start : start + 5],
                    EVAL.sampling,
                    16,
                    TASK,
                )
            )
    expected = {name: torch.cat([p[name] for p in parts]).mean().item() for name in parts[0]}
    assert set(metrics) == {f"val/{name}" for name in ("kl", "score", "gold", "response_length", "eos_rate")}
    for name, value in expected.items():
        assert metrics[f"val/{name}"] == pytest.approx(value, rel=1e-5, abs=1e-6)
    assert metrics["val/kl"] > 0.05


@pytest.mark.parametrize("cls", [P3OModule, PPOModule, OnlineDPOModule, RLOOModule])
def test_every_rl_stage_tests_with_kl_zero_before_training(tmp_path, cls):
    stage = rl_stage(
        cls, evaluation=EvaluationSpec(num_prompts=6, max_prompt_tokens=16, sampling=SamplingSpec(max_new_tokens=6))
    )
    [metrics] = quiet_trainer(tmp_path).test(stage)
    assert metrics["test/kl"] == pytest.approx(0.0, abs=1e-5)  # π_θ = π_ref before any update
    assert 1 <= metrics["test/response_length"] <= 6 and 0 <= metrics["test/eos_rate"] <= 1
    assert metrics["test/score"] == pytest.approx(metrics["test/gold"], abs=1e-5)  # the scorer is the gold reward


def test_validation_runs_in_fit_only_when_evaluation_is_set(tmp_path):
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="val/gold", mode="max", save_top_k=1)
    trainer = quiet_trainer(
        tmp_path, max_epochs=2, enable_checkpointing=True, callbacks=[checkpoint], num_sanity_val_steps=0
    )
    trainer.fit(rl_stage(evaluation=EVAL))
    assert Path(checkpoint.best_model_path).is_file()
    assert "val/gold" in trainer.callback_metrics  # the last rollout's validation
    assert checkpoint.best_model_score.item() >= trainer.callback_metrics["val/gold"].item() - 1e-6
    # validating the best checkpoint afterwards repeats its figure: same weights, same seeds
    [again] = quiet_trainer(tmp_path).validate(rl_stage(evaluation=EVAL), ckpt_path=checkpoint.best_model_path)
    assert again["val/gold"] == pytest.approx(checkpoint.best_model_score.item(), abs=1e-6)
    plain = quiet_trainer(tmp_path / "plain", max_epochs=1)
    plain.fit(rl_stage())
    assert not any(name.startswith("val/") for name in plain.callback_metrics)


def test_predict_writes_one_completion_per_prompt(tmp_path):
    out = tmp_path / "completions.jsonl"
    stage = rl_stage(
        evaluation=EvaluationSpec(
            num_prompts=7,
            batch_size=4,
            max_prompt_tokens=16,
            seed=1,
            sampling=SamplingSpec(max_new_tokens=8),
            predictions_file=str(out),
        )
    )
    predictions = quiet_trainer(tmp_path).predict(stage)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows == [row for batch in predictions for row in batch]
    prompts = TASK.prompts("test", 7)
    assert [r["prompt"] for r in rows] == prompts
    with seeded(1):
        first = sample_completions(stage.policy, stage.tokenizer, prompts[:4], SamplingSpec(max_new_tokens=8), 16)
    assert [r["response"] for r in rows[:4]] == first.responses
    assert [r["ended"] for r in rows[:4]] == first.ended


def micro_rl_config(tmp_path: Path, evaluation: dict) -> Path:
    config = {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu",
            "devices": 1,
            "logger": False,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "default_root_dir": str(tmp_path / "logs"),
        },
        "model": {
            "class_path": "lit_p3o.P3OModule",
            "init_args": {
                "policy": {"architecture": MICRO, "tokenizer": "embedded:reviews"},
                "reward_model": "embedded:reviews",
                "rollout": {"prompt_pool": 16, "num_prompts": 4, "max_prompt_tokens": 16},
                "evaluation": evaluation,
            },
        },
    }
    path = tmp_path / "p3o.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_cli_validate_and_predict(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("sys.argv", ["lit-p3o"])
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(
        "".join(json.dumps({"prompt": p}) + "\n" for p in ("write a review of the pizza :", "review the lamp :"))
    )
    evaluation = {
        "num_prompts": 8,
        "batch_size": 4,
        "max_prompt_tokens": 16,
        "sampling": {"max_new_tokens": 6},
        "predict_prompts": str(prompts),
        "predictions_file": str(tmp_path / "out.jsonl"),
    }
    config = micro_rl_config(tmp_path, evaluation)
    main(["validate", "--config", str(config)])
    printed = capsys.readouterr().out
    assert "val/gold" in printed and "val/kl" in printed
    main(["predict", "--config", str(config)])
    rows = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in rows] == ["write a review of the pizza :", "review the lamp :"]
    assert all(r["response"] for r in rows)


def test_report_prints_means_with_bootstrap_intervals_over_the_prompts(tmp_path, capsys):
    tokenizer = load_tokenizer(SPEC)
    for seed, name in ((0, "sft"), (1, "p3o"), (2, "p3o-nokl")):
        policy, _ = micro_policy(seed)
        save_pretrained(policy, tokenizer, tmp_path / name)
    main(
        [
            "report",
            "--reference",
            str(tmp_path / "sft"),
            "--policy",
            str(tmp_path / "p3o"),
            "--judge",
            "embedded:reviews",
            "--num-prompts",
            "16",
            "--max-new-tokens",
            "6",
            "--also",
            f"no KL control={tmp_path / 'p3o-nokl'}",
        ]
    )
    lines = capsys.readouterr().out.splitlines()
    header = next(i for i, line in enumerate(lines) if "proxy reward" in line and "gold reward" in line)
    assert [line.split()[0] for line in lines[header + 1 : header + 3]] == ["sft", "p3o"]
    assert lines[header + 3].startswith("no KL control")

    # the printed figures are the per-prompt means and their percentile-bootstrap intervals
    prompts = TASK.prompts("test", 16)
    sampling = SamplingSpec(max_new_tokens=6)
    trained, _ = micro_policy(1)
    reference, _ = micro_policy(0)
    with seeded(0):
        out = sample_completions(trained, tokenizer, prompts, sampling, 256)
    gold = np.array(TASK.gold_reward_batch(prompts, out.responses, out.ended))
    rng = np.random.default_rng(0)
    means = gold[rng.integers(0, 16, size=(2000, 16))].mean(axis=1)
    expected = f"{gold.mean():.3f} [{np.percentile(means, 2.5):.2f}, {np.percentile(means, 97.5):.2f}]"
    assert lines[header + 2].count(expected) == 2  # the proxy is the gold reward under this judge
    assert f"{0.0:.3f} [0.00, 0.00]" in lines[header + 1]  # the reference has no KL to itself
    with pytest.raises(UserError, match="--also trained=...: 'trained' names a built-in row"):
        report(
            tmp_path / "sft",
            tmp_path / "p3o",
            "embedded:reviews",
            None,
            tmp_path / "x.png",
            others={"trained": tmp_path / "p3o-nokl"},
        )

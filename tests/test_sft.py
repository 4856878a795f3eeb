"""SFT: the prompt-masked loss, SFTDataModule's sources and bad rows, save → reload."""

from __future__ import annotations

import logging

import pytest
import torch
from helpers import write_jsonl

from lit_p3o.data.encoding import collate, encode_example
from lit_p3o.data.issues import DataFormatError
from lit_p3o.data.sft import SFTDataModule
from lit_p3o.models import ModelSpec
from lit_p3o.stages.sft import SFTModule

ROWS = [
    {"prompt": "write a review of the pizza :", "completion": "the pizza is great ."},
    {"prompt": "rate the lamp :", "completion": "i would not buy the lamp again . it is flimsy ."},
    {"prompt": "review the tea for my blog :", "completion": "i had the tea today ."},
    {"prompt": "how do you like the bike ?", "completion": "i really love it ."},
    {"prompt": "review the soup :", "completion": "the soup is bland ."},
    {"prompt": "rate the desk :", "completion": "it is sturdy . i would recommend it ."},
    {"prompt": "review the cake :", "completion": "i hate the cake ."},
    {"prompt": "rate the mug :", "completion": "the mug is okay ."},
]


def data_module(tok, train, **kwargs):
    kwargs.setdefault("max_length", 48)
    kwargs.setdefault("batch_size", 4)
    return SFTDataModule(train=str(train), tokenizer=tok, **kwargs)


def ids(tok, text):
    vocab = tok.get_vocab()
    return [vocab[w] for w in text.split()]


# --------------------------------------------------------------------------- the loss


def test_sft_loss_is_cross_entropy_on_response_tokens_only(micro_spec):
    torch.manual_seed(0)
    module = SFTModule(model=micro_spec)
    tok = module.tokenizer
    examples = [encode_example(tok, r["prompt"], r["completion"], 48) for r in ROWS[:3]]
    batch = collate(examples, tok.pad_token_id)
    loss = module._loss(batch)

    with torch.no_grad():
        logits = module.policy(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids
        ).logits
    logp = torch.log_softmax(logits.double(), dim=-1)
    masked, unmasked = [], []
    for b, e in enumerate(examples):
        start = batch.prompt_width - len(e.prompt_ids)
        for t in range(start + 1, batch.prompt_width + len(e.response_ids)):
            nll = -logp[b, t - 1, batch.input_ids[b, t]].item()
            unmasked.append(nll)
            if t >= batch.prompt_width:
                masked.append(nll)
    assert len(masked) == sum(len(e.response_ids) for e in examples)
    expected = sum(masked) / len(masked)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert abs(loss.item() - sum(unmasked) / len(unmasked)) > 1e-3  # prompts are not learned
    loss.backward()
    assert module.policy.get_input_embeddings().weight.grad.abs().sum() > 0


def test_left_padding_does_not_change_the_loss(micro_spec):
    torch.manual_seed(0)
    module = SFTModule(model=micro_spec).eval()
    tok = module.tokenizer
    short = encode_example(tok, "rate the mug :", "the mug is okay .", 48)
    long = encode_example(tok, "how do you like the bike for my blog ?", "i really love it . it is great .", 48)
    alone = module._loss(collate([short], tok.pad_token_id)).item()
    # `short` is left- and right-padded next to `long`; its per-token loss must not move
    batch = collate([short, long], tok.pad_token_id)
    n_short, n_long = len(short.response_ids), len(long.response_ids)
    together = module._loss(batch).item() * (n_short + n_long)
    long_alone = module._loss(collate([long], tok.pad_token_id)).item() * n_long
    assert (together - long_alone) / n_short == pytest.approx(alone, rel=1e-4)


# --------------------------------------------------------------------------- data sources


def test_embedded_corpus_sizes_and_val_split(micro_tokenizer):
    tok = micro_tokenizer
    dm = SFTDataModule(
        train="embedded:reviews", embedded_size=40, val_fraction=0.1, max_length=48, batch_size=8, tokenizer=tok
    )
    dm.setup("fit")
    assert len(dm.train_examples) == 40 and len(dm.val_examples) == 4
    assert all(e.response_ids[-1] == tok.eos_token_id for e in dm.train_examples)
    assert dm.truncation.examples == 44 and dm.truncation.truncated_prompts == 0
    batch = next(iter(dm.train_dataloader()))
    assert batch.input_ids.shape[0] == 8
    assert len(dm.train_dataloader()) == 5 and len(dm.val_dataloader()) == 1
    # seeded: the same corpus twice
    again = SFTDataModule(train="embedded:reviews", embedded_size=40, val_fraction=0.1, max_length=48, tokenizer=tok)
    again.setup("fit")
    assert [e.response_ids for e in again.val_examples] == [e.response_ids for e in dm.val_examples]


def test_jsonl_prompt_completion(micro_tokenizer, tmp_path):
    tok = micro_tokenizer
    path = write_jsonl(tmp_path / "sft.jsonl", ROWS)
    dm = data_module(tok, path, val_fraction=0.25)
    dm.setup("fit")
    assert len(dm.train_examples) == 6 and len(dm.val_examples) == 2
    expected = {(tuple(ids(tok, r["prompt"])), tuple(ids(tok, r["completion"]) + [tok.eos_token_id])) for r in ROWS}
    got = {(tuple(e.prompt_ids), tuple(e.response_ids)) for e in dm.train_examples + dm.val_examples}
    assert got == expected
    # an explicit val file replaces the split
    val = write_jsonl(tmp_path / "val.jsonl", ROWS[:3])
    dm = data_module(tok, path, val=str(val))
    dm.setup("fit")
    assert len(dm.train_examples) == 8 and len(dm.val_examples) == 3


def test_no_validation_rows_means_no_validation(micro_tokenizer, tmp_path):
    dm = data_module(micro_tokenizer, write_jsonl(tmp_path / "sft.jsonl", ROWS), val_fraction=0.0)
    dm.setup("fit")
    assert len(dm.train_examples) == 8 and dm.val_examples == []
    assert len(dm.val_dataloader()) == 0  # Lightning then skips validation instead of failing


def test_messages_rows_use_the_chat_template(micro_tokenizer, tmp_path):
    tok = micro_tokenizer
    tok.chat_template = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
    try:
        rows = [
            {
                "messages": [
                    {"role": "user", "content": "review the pizza :"},
                    {"role": "assistant", "content": "it is great ."},
                ]
            },
            {
                "messages": [
                    {"role": "user", "content": "rate the lamp :"},
                    {"role": "assistant", "content": "it is okay ."},
                    {"role": "user", "content": "review the lamp ?"},
                    {"role": "assistant", "content": "i would buy it again ."},
                ]
            },
        ]
        dm = data_module(tok, write_jsonl(tmp_path / "chat.jsonl", rows), val_fraction=0.0)
        dm.setup("fit")
    finally:
        tok.chat_template = None
    got = sorted((e.prompt_ids, e.response_ids) for e in dm.train_examples)
    eos = tok.eos_token_id
    assert got == sorted(
        [
            (ids(tok, "review the pizza :"), ids(tok, "it is great .") + [eos]),
            (ids(tok, "rate the lamp : it is okay . review the lamp ?"), ids(tok, "i would buy it again .") + [eos]),
        ]
    )


def test_messages_rows_without_a_chat_template_fail_clearly(micro_tokenizer, tmp_path):
    rows = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "it ."}]}]
    dm = data_module(micro_tokenizer, write_jsonl(tmp_path / "chat.jsonl", rows))
    with pytest.raises(DataFormatError, match="chat template"):
        dm.setup("fit")


def test_saved_dataset_directory(micro_tokenizer, tmp_path):
    import datasets

    datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(ROWS[:6]), "test": datasets.Dataset.from_list(ROWS[6:])}
    ).save_to_disk(str(tmp_path / "ds"))
    dm = data_module(micro_tokenizer, tmp_path / "ds", val=str(tmp_path / "ds"))
    dm.setup("fit")
    assert len(dm.train_examples) == 6 and len(dm.val_examples) == 2
    assert sorted(e.prompt_ids for e in dm.val_examples) == sorted(ids(micro_tokenizer, r["prompt"]) for r in ROWS[6:])

    datasets.Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "single"))
    dm = data_module(micro_tokenizer, tmp_path / "single", val_fraction=0.25)
    dm.setup("fit")
    assert len(dm.train_examples) == 6 and len(dm.val_examples) == 2


# --------------------------------------------------------------------------- bad rows


def test_missing_column_names_file_and_column(micro_tokenizer, tmp_path):
    rows = [dict(r) for r in ROWS]
    del rows[3]["completion"]
    path = write_jsonl(tmp_path / "broken.jsonl", rows)
    with pytest.raises(DataFormatError, match=r"broken\.jsonl.*row 3.*completion.*missing"):
        data_module(micro_tokenizer, path).setup("fit")
    # the column missing from the whole file
    path = write_jsonl(tmp_path / "nocol.jsonl", [{"prompt": r["prompt"], "answer": r["completion"]} for r in ROWS])
    with pytest.raises(DataFormatError, match=r"(?s)nocol\.jsonl.*completion"):
        data_module(micro_tokenizer, path).setup("fit")


def test_empty_completion_strict_and_lenient(micro_tokenizer, tmp_path, caplog):
    rows = [dict(r) for r in ROWS]
    rows[2]["completion"] = "  "
    path = write_jsonl(tmp_path / "empty.jsonl", rows)
    with pytest.raises(DataFormatError, match=r"empty\.jsonl: row 2: field `completion`: empty"):
        data_module(micro_tokenizer, path).setup("fit")
    dm = data_module(micro_tokenizer, path, strict=False, val_fraction=0.0)
    with caplog.at_level(logging.WARNING, logger="lit_p3o"):
        dm.setup("fit")
    assert len(dm.train_examples) == 7
    assert "skipped 1 of 8 rows" in caplog.text and "completion: empty (rows 2)" in caplog.text


def test_overlong_prompt_is_cut_from_the_left_and_counted(micro_tokenizer, tmp_path, caplog):
    tok = micro_tokenizer
    rows = [{"prompt": "please write a review of the pizza for my friend :", "completion": "it is good ."}]
    dm = data_module(tok, write_jsonl(tmp_path / "long.jsonl", rows), max_length=9, val_fraction=0.0)
    with caplog.at_level(logging.WARNING, logger="lit_p3o"):
        dm.setup("fit")
    (example,) = dm.train_examples
    assert example.response_ids == ids(tok, "it is good .") + [tok.eos_token_id]
    assert example.prompt_ids == ids(tok, "for my friend :")  # 9 - 5 response tokens
    assert (dm.truncation.truncated_prompts, dm.truncation.removed_tokens) == (1, 11 - 4)
    assert "1 of 1 prompts truncated from the left (7 tokens removed)" in caplog.text


def test_overlong_completion_strict_and_lenient(micro_tokenizer, tmp_path, caplog):
    rows = [dict(r) for r in ROWS]
    rows[5]["completion"] = "it is great . " * 4  # 16 words + EOS
    path = write_jsonl(tmp_path / "long.jsonl", rows)
    # the row number is the file's, whatever the train/validation shuffle does
    with pytest.raises(DataFormatError, match=r"long\.jsonl.*row 5: field `completion`: response has 17 tokens"):
        data_module(micro_tokenizer, path, max_length=16, val_fraction=0.25, strict=True).setup("fit")
    for strict in (None, False):  # cut at its end (tests/test_knobs.py), neither skipped nor refused
        dm = data_module(micro_tokenizer, path, max_length=16, val_fraction=0.25, strict=strict)
        with caplog.at_level(logging.INFO, logger="lit_p3o"):
            dm.setup("fit")
        assert len(dm.train_examples) + len(dm.val_examples) == 8
        assert "1 of 8 responses truncated at the end" in caplog.text and "skipped" not in caplog.text


def test_invalid_arguments():
    with pytest.raises(ValueError, match="val_fraction"):
        SFTDataModule(val_fraction=1.0)
    with pytest.raises(ValueError, match="max_length"):
        SFTDataModule(max_length=1)


# --------------------------------------------------------------------------- end to end


def test_fit_saves_a_model_plain_transformers_reloads(micro_spec, tmp_path):
    import lightning as L
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lit_p3o.optim import OptimizerSpec

    L.seed_everything(0, verbose=False)
    module = SFTModule(model=micro_spec, optimizer=OptimizerSpec(learning_rate=1e-2), save_dir=str(tmp_path / "sft"))
    before = {k: v.clone() for k, v in module.policy.state_dict().items()}
    dm = SFTDataModule(embedded_size=24, val_fraction=0.1, max_length=48, batch_size=8)
    trainer = L.Trainer(
        max_steps=3,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=1,
        default_root_dir=str(tmp_path),
    )
    trainer.fit(module, datamodule=dm)
    assert trainer.global_step == 3
    assert any(not torch.equal(before[k], v) for k, v in module.policy.state_dict().items())  # it trained

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "sft").eval()
    tok = AutoTokenizer.from_pretrained(tmp_path / "sft")
    assert tok.get_vocab() == module.tokenizer.get_vocab()
    assert (tok.pad_token_id, tok.eos_token_id, tok.bos_token_id) == (0, 1, 3)
    text = "write a review of the pizza : the pizza is great ."
    assert tok(text)["input_ids"] == module.tokenizer(text)["input_ids"]
    batch = collate(
        [encode_example(tok, "write a review of the pizza :", "the pizza is great .", 48)], tok.pad_token_id
    )
    module.policy.eval()
    with torch.no_grad():
        expected = module.policy(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        got = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_module_accepts_a_plain_dict_spec():
    module = SFTModule(
        model={
            "architecture": {
                "model_type": "llama",
                "hidden_size": 16,
                "intermediate_size": 32,
                "num_hidden_layers": 1,
                "num_attention_heads": 2,
                "num_key_value_heads": 2,
            },
            "tokenizer": "embedded:reviews",
        }
    )
    assert isinstance(module.model_spec, ModelSpec)
    assert module.policy.config.vocab_size == len(module.tokenizer)


def test_optimizer_covers_trainable_parameters_with_warmup_then_cosine(micro_spec):
    from types import SimpleNamespace

    from lit_p3o.models import LoraSpec
    from lit_p3o.optim import OptimizerSpec, configure_adamw

    micro_spec.lora = LoraSpec(r=2, target_modules=["q_proj"])
    module = SFTModule(model=micro_spec)
    # all configure_adamw reads
    module._trainer = SimpleNamespace(estimated_stepping_batches=6, gradient_clip_val=None, precision_plugin=None)
    spec = OptimizerSpec(learning_rate=0.1, weight_decay=0.5, warmup_steps=2, schedule="cosine")
    config = configure_adamw(module, spec)
    optimizer, scheduler = config["optimizer"], config["lr_scheduler"]["scheduler"]
    (group,) = optimizer.param_groups
    assert len(group["params"]) == 2 and group["weight_decay"] == 0.5  # lora_A and lora_B only
    lrs = []
    for _ in range(7):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    # warm-up 0.5, 1.0; then 0.5 (1 + cos(pi * k / 4)) for k = 0..4
    expected = [0.05, 0.1, 0.1, 0.1 * 0.5 * (1 + 2**-0.5), 0.05, 0.1 * 0.5 * (1 - 2**-0.5), 0.0]
    assert lrs == pytest.approx(expected, abs=1e-9)
    with pytest.raises(ValueError, match="learning_rate"):
        OptimizerSpec(learning_rate=0.0)

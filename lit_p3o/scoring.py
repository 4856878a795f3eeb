"""Scoring (prompt, response) pairs: reward models, embedded gold rewards, Python reward
functions and weighted mixes of them, behind one ``score_examples`` method
(:class:`Scorer`); :func:`build_scorer` turns configuration into one.

A reward model here is an ``AutoModelForSequenceClassification`` with one label (optionally
LoRA-wrapped). Its scalar head is read where transformers reads it (see :func:`pooling_positions`),
so a model trained here scores the same under plain transformers, and a model trained with
transformers or TRL scores here as under its own forward.
"""

from __future__ import annotations

import copy
import importlib
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, Union

import torch
from torch import Tensor, nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from lit_p3o.data.encoding import (
    Batch,
    Encoded,
    collate,
    encode_example,
    encode_prompt,
    encode_response,
    fit_prompt,
)
from lit_p3o.errors import RewardFunctionError
from lit_p3o.models import ModelSpec, build_reward_model, disable_dropout, load_tokenizer
from lit_p3o.tasks import resolve_embedded


def _hf_model(model: nn.Module) -> PreTrainedModel:
    """The transformers model under an optional peft wrapper (LoRA layers stay injected)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def pooling_positions(input_ids: Tensor, attention_mask: Tensor, pad_token_id: int | None) -> Tensor:
    """Column of each row where the reward is read: transformers' rule on the unpadded row.

    That is the last attended token whose id is not the *model config's* ``pad_token_id``
    (so with pad = EOS a trailing EOS is skipped and the token before it is read; an EOS inside
    the prompt does not matter), the last attended token when the config has no pad token, and
    the row's first token when every token is the pad id. Padding is found from the attention
    mask, so left and right padding give the same positions as the unpadded row.
    """
    columns = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    attended = attention_mask.bool()
    first = attended.long().argmax(dim=1)
    readable = attended if pad_token_id is None else attended & (input_ids != pad_token_id)
    last = (readable * columns).argmax(dim=1)
    return torch.where(readable.any(dim=1), last, first)


def reward_scores(model: nn.Module, batch: Batch) -> Tensor:
    """Scalar reward per row, read at :func:`pooling_positions`; shape ``[B]``, float32."""
    hf = _hf_model(model)
    backbone = getattr(hf, hf.base_model_prefix)
    hidden = backbone(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        position_ids=batch.position_ids,
        use_cache=False,
    ).last_hidden_state
    last = pooling_positions(batch.input_ids, batch.attention_mask, hf.config.get_text_config().pad_token_id)
    pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    return hf.score(pooled).squeeze(-1).float()


class Scorer(Protocol):
    """Anything that scores tokenized (prompt, response) pairs (this module's classes): a
    reward model, a gold reward, a Python reward function or a weighted mix. ``prompts`` are
    the prompt texts, one per example, carrying their rows' other columns when loaded from a
    dataset (:class:`lit_p3o.data.prompts.Prompt`)."""

    def score_examples(
        self, examples: list[Encoded], ended: list[bool], prompts: list[str] | None = None
    ) -> Tensor: ...


class RewardScorer:
    """A frozen reward model plus its tokenizer, scoring text or token ids in batches.

    >>> scorer = RewardScorer.from_pretrained("outputs/demo/reward")
    >>> scorer.score(["review the pizza :"], ["the pizza is great ."])  # tensor([...])
    """

    def __init__(
        self, model: nn.Module, tokenizer: PreTrainedTokenizerBase, max_length: int = 1024, batch_size: int = 32
    ) -> None:
        """``model`` (with its ``tokenizer``) as :func:`lit_p3o.models.build_reward_model` makes
        a ready model: so a model given here scores as the same model loaded from its path."""
        self.tokenizer = load_tokenizer(model, tokenizer, "RewardScorer.model")
        self.model = disable_dropout(build_reward_model(model, self.tokenizer)).requires_grad_(False)
        self.max_length = max_length
        self.batch_size = batch_size
        self.source_tokenizer: PreTrainedTokenizerBase | None = None

    def accept_ids_from(self, tokenizer: PreTrainedTokenizerBase) -> None:
        """Score ids made by ``tokenizer`` (the policy's): used as they are when the vocabularies
        match, otherwise decoded and re-encoded with this scorer's tokenizer."""
        self.source_tokenizer = None if tokenizer.get_vocab() == self.tokenizer.get_vocab() else tokenizer

    @classmethod
    def from_pretrained(cls, path: str | Path, **kwargs) -> RewardScorer:
        """Load a reward model saved by :class:`lit_p3o.RewardModule` (or any 1-label model)."""
        spec = ModelSpec(name_or_path=str(path))
        tokenizer = load_tokenizer(spec)
        return cls(build_reward_model(spec, tokenizer), tokenizer, **kwargs)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def score_examples(
        self, examples: list[Encoded], ended: list[bool] | None = None, prompts: Sequence[str] | None = None
    ) -> Tensor:
        """Scores of tokenized pairs, in batches; ``[N]`` float32 on CPU.

        ``ended`` says which responses end with a generated EOS; it matters only when ids
        must be re-encoded for a reward model with another tokenizer.

        The forward runs with autocast off: a float32 reward model scores in float32 even inside
        a ``bf16-mixed`` trainer's rollout or evaluation (bf16 autocast moved scores by 0.02 on
        average, a bias every reward difference inherits). Under ``bf16-true`` the weights
        themselves are bf16 and so is the score.
        """
        if self.source_tokenizer is not None:
            examples = self._reencode(examples, ended or [True] * len(examples))
        out = []
        with torch.autocast(self.device.type, enabled=False):
            for start in range(0, len(examples), self.batch_size):
                batch = collate(examples[start : start + self.batch_size], self.tokenizer.pad_token_id)
                out.append(reward_scores(self.model, batch.to(self.device)).cpu())
        return torch.cat(out) if out else torch.empty(0)

    def _reencode(self, examples: list[Encoded], ended: list[bool]) -> list[Encoded]:
        src = self.source_tokenizer
        out = []
        for e, stop in zip(examples, ended):
            response = src.decode(e.response_ids, skip_special_tokens=True)
            prompt = src.decode(e.prompt_ids, skip_special_tokens=True)
            ids = encode_response(self.tokenizer, response, add_eos=stop)
            out.append(
                Encoded(
                    fit_prompt(
                        encode_prompt(self.tokenizer, prompt),
                        max(1, self.max_length - len(ids)),
                        self.tokenizer.bos_token_id,
                    ),
                    ids,
                )
            )
        return out

    def score(self, prompts: list[str], responses: list[str]) -> Tensor:
        """Scores of text pairs; responses get EOS appended as in training. ``[N]`` on CPU."""
        if len(prompts) != len(responses):
            raise ValueError(f"score: {len(prompts)} prompts but {len(responses)} responses")
        examples = [encode_example(self.tokenizer, p, r, self.max_length) for p, r in zip(prompts, responses)]
        return self.score_examples(examples)


class GoldScorer:
    """An embedded task's gold reward used as the RL reward (``reward_model: embedded:<task>``):
    no reward model to train, and the reward is the one evaluation reports."""

    def __init__(self, task, tokenizer: PreTrainedTokenizerBase) -> None:
        self.task = task
        self.tokenizer = tokenizer

    def score_examples(
        self, examples: list[Encoded], ended: list[bool] | None = None, prompts: Sequence[str] | None = None
    ) -> Tensor:
        ended = ended if ended is not None else [True] * len(examples)
        return torch.tensor(
            [
                self.task.gold_reward(
                    self.tokenizer.decode(e.prompt_ids, skip_special_tokens=True),
                    self.tokenizer.decode(e.response_ids, skip_special_tokens=True),
                    stop,
                )
                for e, stop in zip(examples, ended)
            ],
            dtype=torch.float32,
        )


_FUNCTION = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*")

RewardFunction = Callable[..., Sequence[Union[float, int, None]]]


class FunctionScorer:
    """A Python reward function, called like TRL's ``reward_funcs``:
    ``func(prompts=[...], completions=[...], **columns)`` with one entry per response and, as
    keyword lists, the other columns of each response's prompt row
    (:class:`lit_p3o.data.prompts.Prompt`); it returns one float, or None, per response.

    Plain prompts give text (special tokens removed); conversational prompts (message lists)
    give, as TRL does, each prompt's messages and each completion as
    ``[{"role": "assistant", "content": text}]``. None (the function does not apply to that
    response) becomes NaN: alone it is a non-finite reward, which the RL stages' guard turns
    into a skipped update; in a :class:`WeightedScorer` the term is left out of that sum."""

    def __init__(self, function: RewardFunction, tokenizer: PreTrainedTokenizerBase, name: str | None = None) -> None:
        if not callable(function):
            raise TypeError(f"reward function {name or function!r} is not callable")
        self.function = function
        self.tokenizer = tokenizer
        self.name = name or getattr(function, "__qualname__", repr(function))

    def score_examples(
        self, examples: list[Encoded], ended: list[bool] | None = None, prompts: Sequence[str] | None = None
    ) -> Tensor:
        return self.values(examples, ended, prompts)[0]

    def values(
        self, examples: list[Encoded], ended: list[bool] | None = None, prompts: Sequence[str] | None = None
    ) -> tuple[Tensor, Tensor]:
        """The function's values (None as NaN) and which of them were None, each ``[N]``."""
        texts = [self.tokenizer.decode(e.prompt_ids, skip_special_tokens=True) for e in examples]
        prompts = list(prompts) if prompts is not None else texts
        if len(prompts) != len(examples):
            raise ValueError(f"reward function {self.name}: {len(prompts)} prompts for {len(examples)} responses")
        completions = [self.tokenizer.decode(e.response_ids, skip_special_tokens=True) for e in examples]
        names = list(dict.fromkeys(k for p in prompts for k in getattr(p, "columns", {})))
        columns = {k: [getattr(p, "columns", {}).get(k) for p in prompts] for k in names}
        if prompts and all(getattr(p, "messages", None) is not None for p in prompts):  # TRL's conversational call
            given_prompts: list[Any] = [copy.deepcopy(p.messages) for p in prompts]
            given_completions: list[Any] = [[{"role": "assistant", "content": c}] for c in completions]
        else:
            given_prompts, given_completions = [str(p) for p in prompts], completions
        try:
            values = self.function(prompts=given_prompts, completions=given_completions, **columns)
        except Exception as err:  # the user's code: named, and its traceback kept under LIT_P3O_DEBUG=1
            raise RewardFunctionError(self.name, f"raised {_one_line(err)}") from err
        if isinstance(values, Tensor):
            values = values.tolist()
        if not isinstance(values, Sequence) or isinstance(values, str) or len(values) != len(examples):
            got = f"{len(values)} values" if isinstance(values, Sequence) else type(values).__name__
            raise RewardFunctionError(self.name, f"must return one value per completion ({len(examples)}), got {got}")
        out = []
        for i, v in enumerate(values):
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))):
                raise RewardFunctionError(self.name, f"value {i} is {v!r}; expected a float or None")
            out.append(math.nan if v is None else float(v))
        return torch.tensor(out, dtype=torch.float32), torch.tensor([v is None for v in values], dtype=torch.bool)


class WeightedScorer:
    """``Σ_i w_i · score_i`` over the terms that apply to each response: a reward function's
    None (it does not apply, as in TRL) leaves its term out of that response's sum, and a
    response no term applies to gets NaN (a non-finite reward: the guard skips the update). A
    NaN from a reward model or a function is not None: it makes the sum NaN."""

    def __init__(self, terms: list[tuple[Any, float]]) -> None:
        if not terms:
            raise ValueError("WeightedScorer: needs at least one reward")
        self.terms = terms
        self.names = _unique([term_name(s) for s, _ in terms])
        models = [s.model for s, _ in terms if isinstance(getattr(s, "model", None), nn.Module)]
        self.model = nn.ModuleList(models) if models else None  # so the stage moves them with itself

    def score_examples(
        self, examples: list[Encoded], ended: list[bool] | None = None, prompts: Sequence[str] | None = None
    ) -> Tensor:
        return self.weighted_sum(self.score_terms(examples, ended, prompts))

    def score_terms(
        self, examples: list[Encoded], ended: list[bool] | None = None, prompts: Sequence[str] | None = None
    ) -> dict[str, tuple[Tensor, Tensor]]:
        """Each term's own values, unweighted, and which of them are None, by :attr:`names`."""
        out = {}
        for name, (scorer, _) in zip(self.names, self.terms):
            if isinstance(scorer, FunctionScorer):
                out[name] = scorer.values(examples, ended, prompts)
            else:
                values = scorer.score_examples(examples, ended, prompts=prompts).float()
                out[name] = (values, torch.zeros(len(values), dtype=torch.bool))
        return out

    def weighted_sum(self, terms: dict[str, tuple[Tensor, Tensor]]) -> Tensor:
        """``Σ w_i · value_i`` over the terms that are not None; NaN where every term is None."""
        total, applied = torch.zeros(()), torch.zeros((), dtype=torch.bool)
        for name, (_, weight) in zip(self.names, self.terms):
            values, none = terms[name]
            total = total + torch.where(none, 0.0, weight * values)
            applied = applied | ~none
        return torch.where(applied, total, math.nan)


def term_name(scorer: Any) -> str:
    """A reward's short name in metrics (``rollout/reward/<name>/mean``): a function's name, an
    embedded task's name, a reward model's directory name."""
    if isinstance(scorer, FunctionScorer):
        return getattr(scorer.function, "__name__", scorer.name.rpartition(":")[2])
    if isinstance(scorer, GoldScorer):
        return scorer.task.name
    if isinstance(scorer, RewardScorer):
        return Path(_hf_model(scorer.model).config.name_or_path or "reward_model").name
    return type(scorer).__name__


def _unique(names: list[str]) -> list[str]:
    """``names`` with repeats numbered (``length``, ``length_2``), so each term keeps its metrics."""
    seen: dict[str, int] = {}
    out = []
    for name in names:
        seen[name] = seen.get(name, 0) + 1
        out.append(name if seen[name] == 1 else f"{name}_{seen[name]}")
    return out


def score_terms(
    scorer: Scorer, examples: list[Encoded], ended: list[bool], prompts: Sequence[str]
) -> tuple[Tensor, dict[str, Tensor]]:
    """The reward of each response and, by :func:`term_name`, each term's own values (None as
    NaN): a :class:`WeightedScorer`'s terms, or the one scorer's values under its name."""
    if isinstance(scorer, WeightedScorer):
        terms = scorer.score_terms(examples, ended, prompts)
        return scorer.weighted_sum(terms), {name: values for name, (values, _) in terms.items()}
    scores = scorer.score_examples(examples, ended, prompts=prompts).float()
    return scores, {term_name(scorer): scores}


def term_stats(terms: dict[str, Tensor]) -> dict[str, float]:
    """Per term: mean and std of the values given, and the fraction that were None (or NaN)."""
    stats = {}
    for name, values in terms.items():
        given = values[~values.isnan()]
        stats[f"reward/{name}/mean"] = given.mean().item() if given.numel() else math.nan
        stats[f"reward/{name}/std"] = given.std().item() if given.numel() > 1 else 0.0
        stats[f"reward/{name}/none_fraction"] = values.isnan().float().mean().item()
    return stats


@dataclass
class RewardSpec:
    """One term of a weighted reward: ``source`` is a reward model directory,
    ``"embedded:<task>"`` or a Python function ``"package.module:function"``."""

    source: str
    weight: float = 1.0

    def __post_init__(self) -> None:
        if not math.isfinite(self.weight):
            raise ValueError(f"RewardSpec.weight: must be finite, got {self.weight}")


RewardSource = Union[str, list[RewardSpec], RewardFunction, RewardScorer]
"""What ``reward_model`` of an RL stage accepts: one source, a list of weighted ones, or (from
Python) a reward function itself or a :class:`RewardScorer` (a reward model object and its
tokenizer)."""


def load_function(source: str) -> RewardFunction:
    """Import ``"package.module:function"``, with errors that name the source."""
    module_name, _, attribute = source.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise RewardFunctionError(
            source, f"cannot import module {module_name!r} ({err}; sys.path holds the working directory and PYTHONPATH)"
        ) from err
    except Exception as err:  # the module itself fails while it is imported
        raise RewardFunctionError(source, f"importing {module_name!r} raised {_one_line(err)}") from err
    function = getattr(module, attribute, None)
    if function is None:
        raise RewardFunctionError(source, f"module {module_name!r} has no attribute {attribute!r}")
    if not callable(function):
        raise RewardFunctionError(source, f"{attribute!r} is not callable")
    return function


def _one_line(err: Exception) -> str:
    """``KeyError: 'answer'``: the user's exception, its message on one line."""
    return f"{type(err).__name__}: {' '.join(str(err).split())}"


def is_function_source(source: str) -> bool:
    """``package.module:function`` that is not a local path."""
    return bool(_FUNCTION.fullmatch(source)) and not Path(source).exists()


def build_scorer(source: RewardSource | RewardSpec, policy_tokenizer: PreTrainedTokenizerBase):
    """``"embedded:<task>"`` → that task's gold reward; ``"package.module:function"`` → a
    :class:`FunctionScorer`, as is a Python callable itself; a :class:`RewardScorer` as it is
    (a bare model is refused: it needs its tokenizer); a list of :class:`RewardSpec` →
    their :class:`WeightedScorer`; otherwise a saved reward model's path."""
    if isinstance(source, (list, tuple)):
        specs = [s if isinstance(s, RewardSpec) else RewardSpec(**s) for s in source]
        return WeightedScorer([(build_scorer(s.source, policy_tokenizer), s.weight) for s in specs])
    if isinstance(source, RewardSpec):
        return build_scorer([source], policy_tokenizer)
    if isinstance(source, RewardScorer):
        source.accept_ids_from(policy_tokenizer)
        return source
    if isinstance(source, nn.Module):
        raise TypeError(
            f"reward_model: a {type(source).__name__} needs its tokenizer; "
            "pass RewardScorer(model, tokenizer) (lit_p3o.RewardScorer)"
        )
    if callable(source):
        return FunctionScorer(source, policy_tokenizer, name=getattr(source, "__qualname__", repr(source)))
    task = resolve_embedded(source)
    if task is not None:
        return GoldScorer(task, policy_tokenizer)
    if is_function_source(source):
        return FunctionScorer(load_function(source), policy_tokenizer, name=source)
    scorer = RewardScorer.from_pretrained(source)
    scorer.accept_ids_from(policy_tokenizer)
    return scorer

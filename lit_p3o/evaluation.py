"""Looking at what a policy writes: sample reports now, the KL–reward frontier later."""

from __future__ import annotations

from dataclasses import dataclass

import lightning as L
from lightning.pytorch.utilities import rank_zero_only
from transformers import PreTrainedTokenizerBase
from torch import nn

from lit_p3o.data.encoding import encode_prompt, fit_prompt
from lit_p3o.data.prompts import load_prompts
from lit_p3o.generation import SamplingSpec, decode, sample_responses
from lit_p3o.tasks import resolve_embedded


@dataclass
class Completions:
    """One sampled response per prompt, decoded."""

    prompts: list[str]
    responses: list[str]
    ended: list[bool]


def sample_completions(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    sampling: SamplingSpec,
    max_prompt_tokens: int,
    batch_size: int = 64,
) -> Completions:
    """Sample and decode one response per prompt, in batches."""
    responses: list[str] = []
    ended: list[bool] = []
    for start in range(0, len(prompts), batch_size):
        ids = [
            fit_prompt(encode_prompt(tokenizer, p), max_prompt_tokens, tokenizer.bos_token_id)
            for p in prompts[start : start + batch_size]
        ]
        sampled = sample_responses(model, tokenizer, ids, sampling)
        responses += [decode(tokenizer, e.response_ids) for e in sampled.examples]
        ended += sampled.ended
    return Completions(prompts, responses, ended)


class CompletionReport(L.Callback):
    """At the end of ``fit``, print sample completions on held-out prompts.

    For an embedded task it also prints the share of completions that are grammatical and
    end with EOS, the figure that says whether SFT has learned the task's language.
    """

    def __init__(
        self,
        prompts: str = "embedded:reviews",
        split: str = "test",
        num_prompts: int = 100,
        show: int = 5,
        max_new_tokens: int = 32,
        max_prompt_tokens: int = 64,
    ) -> None:
        self.prompts, self.split, self.num_prompts = prompts, split, num_prompts
        self.show, self.max_prompt_tokens = show, max_prompt_tokens
        self.sampling = SamplingSpec(max_new_tokens=max_new_tokens)
        self.pass_rate: float | None = None

    @rank_zero_only
    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        prompts = load_prompts(self.prompts, self.split, self.num_prompts, tokenizer=pl_module.tokenizer)
        out = sample_completions(pl_module.policy, pl_module.tokenizer, prompts, self.sampling, self.max_prompt_tokens)
        print(f"\n[lit-p3o] sample completions ({self.split} prompts):")
        for prompt, response, ended in list(zip(out.prompts, out.responses, out.ended))[: self.show]:
            print(f"  {prompt!r} -> {response!r}{'' if ended else '  [no EOS]'}")
        task = resolve_embedded(self.prompts)
        if task is not None:
            ok = [task.is_grammatical(r) and e for r, e in zip(out.responses, out.ended)]
            self.pass_rate = sum(ok) / len(ok)
            print(f"[lit-p3o] grammatical and ended with EOS: {self.pass_rate:.1%} of {len(ok)} completions")

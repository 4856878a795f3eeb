"""A word-level tokenizer over a fixed vocabulary: what the embedded tasks use (built locally)."""

from __future__ import annotations

from collections.abc import Sequence

from tokenizers import Tokenizer, decoders
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import WhitespaceSplit
from transformers import PreTrainedTokenizerFast

PAD, EOS, UNK, BOS = "<pad>", "<eos>", "<unk>", "<bos>"
SPECIAL_TOKENS = (PAD, EOS, UNK, BOS)  # ids 0, 1, 2, 3


def word_tokenizer(words: Sequence[str]) -> PreTrainedTokenizerFast:
    """Special ids ``<pad>`` 0, ``<eos>`` 1, ``<unk>`` 2, ``<bos>`` 3, then ``words``; nothing
    is added on encoding (the library decides about BOS); decoding joins words with spaces."""
    vocab = {token: i for i, token in enumerate((*SPECIAL_TOKENS, *words))}
    backend = Tokenizer(WordLevel(vocab, unk_token=UNK))
    backend.pre_tokenizer = WhitespaceSplit()
    backend.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # join with spaces, no cleanup
    backend.add_special_tokens(list(SPECIAL_TOKENS))
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=PAD,
        eos_token=EOS,
        unk_token=UNK,
        bos_token=BOS,
        clean_up_tokenization_spaces=False,
        model_input_names=["input_ids", "attention_mask"],
    )

"""The micro Llama (~17k parameters) every fast test builds on the embedded task's tokenizer."""

MICRO_ARCH = {
    "model_type": "llama",
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "num_key_value_heads": 2,
    "max_position_embeddings": 64,
}

# Two layers of width 64: the smallest Llama whose 4-bit layers hold a whole quantisation block
# (64 weights) per row, as real models do; the micro model's 32-wide rows do not.
WIDE_ARCH = {**MICRO_ARCH, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2}

"""Tiny random Hugging Face models built locally (never downloaded), for the oracle tests."""

from __future__ import annotations

import string
from pathlib import Path

VOCAB_SIZE = 128
TINY_VOCAB_SIZE = 8  # the `tiny` fixture's: the sampling tests enumerate whole distributions
SPECIALS = ["<unk>", "<s>", "</s>"]  # ids 0, 1, 2: unk, bos, eos
CHARS = string.ascii_letters + string.digits + string.punctuation + " \n"

# Shared shapes: small enough for a fast suite, with GQA (4 heads over 2 kv heads), sequences
# longer than the sliding window (16) and the llama3 RoPE original context (32).
BASE = dict(vocab_size=VOCAB_SIZE, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
            initializer_range=0.2, bos_token_id=1, eos_token_id=2)
FAMILIES = {
    "llama": dict(rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                "high_freq_factor": 4.0, "original_max_position_embeddings": 32}),
    "qwen2": dict(tie_word_embeddings=True),
    # Per-head q/k norms, and a head_dim that is not hidden_size / heads (4 x 32 = 128 != 64);
    # an epsilon large beside the mean squares (about 0.04 here), so reading another one shows.
    "qwen3": dict(head_dim=32, rms_norm_eps=0.01),
    "mistral": dict(sliding_window=16),
}
SLIDING_WINDOW = 16
ROPE_ORIGINAL_CONTEXT = 32


def build_tokenizer():
    """A character-level tokenizer (BPE without merges) over VOCAB_SIZE ids."""
    from tokenizers import Tokenizer, decoders, models, processors
    vocab = {tok: i for i, tok in enumerate(SPECIALS + list(CHARS))}
    for i in range(len(vocab), VOCAB_SIZE):
        vocab[f"<extra_{i}>"] = i
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.add_special_tokens(SPECIALS)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok.decoder = decoders.Fuse()
    return tok


def build_hf_model(directory: Path, family: str, seed: int = 0, dtype: str = "float32", **overrides) -> Path:
    """Saves a random `family` model (and the tokenizer) with save_pretrained into directory."""
    import torch
    import transformers
    classes = {"llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
               "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
               "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM),
               "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM)}
    config_cls, model_cls = classes[family]
    torch.manual_seed(seed)
    config = config_cls(**{**BASE, **FAMILIES[family], **overrides})
    model = model_cls(config).to(getattr(torch, dtype)).eval()
    # Norms start at ones and biases at zeros: random ones, so a swapped q/k norm or a bias left
    # out shows in the logits.
    with torch.no_grad():
        for name, weight in model.named_parameters():
            if name.endswith(("q_norm.weight", "k_norm.weight")):
                weight.uniform_(0.5, 1.5)
            elif name.endswith(".bias"):
                weight.uniform_(-0.5, 0.5)
    directory = Path(directory)
    model.save_pretrained(directory)
    build_tokenizer().save(str(directory / "tokenizer.json"))
    return directory


def load_hf_model(directory: Path):
    import transformers
    return transformers.AutoModelForCausalLM.from_pretrained(directory).eval()

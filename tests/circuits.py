"""A hand-built GPT-2 whose circuit is known exactly: a previous-token head (L0H0) feeding an
induction head (L1H0) by K-composition. Everything else is zero, so any other head that
the detector flags is a detector bug.

Residual stream layout (d_model = 3 * BLOCK): [token one-hot | position one-hot | previous token].
- L0H0 attends from position p to p - 1 (query = position p, key = position s + 1) and writes
  the source's token into the "previous token" block.
- L1H0 attends from a token to every position whose previous token equals it (query = token,
  key = previous token), i.e. to the position right after the token's earlier occurrence, and
  writes that position's token into the token block, which the tied unembedding reads out.
"""

from __future__ import annotations

import torch
from transformers import GPT2Config, GPT2LMHeadModel, GPT2TokenizerFast

BLOCK = 48  # vocabulary size = context length = head dimension
N_HEADS = 3
SHARPNESS = 12.0  # query gain: makes the two heads' attention close to one-hot
COPY_GAIN = 6.0  # how strongly the induction head writes the predicted token


def _tokenizer() -> GPT2TokenizerFast:
    eot = "<|endoftext|>"
    symbols = [chr(ord("A") + i) for i in range(26)] + [chr(ord("a") + i) for i in range(BLOCK - 27)]
    vocab = {eot: 0, **{s: i + 1 for i, s in enumerate(symbols)}}
    return GPT2TokenizerFast(vocab=vocab, merges=[], unk_token=eot, bos_token=eot, eos_token=eot)


def save_induction_circuit(directory) -> str:
    d = 3 * BLOCK
    tok, pos, prev = slice(0, BLOCK), slice(BLOCK, 2 * BLOCK), slice(2 * BLOCK, 3 * BLOCK)
    eye = torch.eye(BLOCK)
    shift = torch.diag(torch.ones(BLOCK - 1), 1)  # position s -> coordinate s + 1
    config = GPT2Config(vocab_size=BLOCK, n_positions=BLOCK, n_embd=d, n_layer=2, n_head=N_HEADS,
                        bos_token_id=0, eos_token_id=0, tie_word_embeddings=True)
    model = GPT2LMHeadModel(config)
    with torch.no_grad():
        for param in model.parameters():
            param.zero_()
        for name, param in model.named_parameters():
            if ".ln_" in name and name.endswith("weight"):
                param.fill_(1.0)
        t = model.transformer
        t.wte.weight[:, tok] = eye
        t.wpe.weight[:, pos] = eye
        # Conv1D weights are [in, out]; q, k, v are columns [0, d), [d, 2d), [2d, 3d); head 0 is the first BLOCK of each.
        layer0, layer1 = t.h[0].attn, t.h[1].attn
        layer0.c_attn.weight[pos, 0:BLOCK] = SHARPNESS * eye  # query: own position
        layer0.c_attn.weight[pos, d : d + BLOCK] = shift  # key: position + 1
        layer0.c_attn.weight[tok, 2 * d : 2 * d + BLOCK] = eye  # value: the source's token
        layer0.c_proj.weight[0:BLOCK, prev] = eye / 7.0  # -> previous-token block, about unit size
        layer1.c_attn.weight[tok, 0:BLOCK] = SHARPNESS * eye  # query: current token
        layer1.c_attn.weight[prev, d : d + BLOCK] = eye  # key: the source's previous token
        layer1.c_attn.weight[tok, 2 * d : 2 * d + BLOCK] = eye  # value: the source's token
        layer1.c_proj.weight[0:BLOCK, tok] = COPY_GAIN * eye / 7.0  # -> token block, read by the unembedding
    model.save_pretrained(directory)
    _tokenizer().save_pretrained(directory)
    return str(directory)

"""Train CircuitBreaker's demo model: a small GPT-2 on a synthetic corpus, deterministic by seed.

    python -m demo_model.train [--out demo_model/weights] [--steps N] [--seed 0] [--threads 1]

The corpus mixes IOI sentences (Wang et al. templates, both name orders), landmark facts
("The Eiffel Tower is located in the city of Paris.") and random words repeated twice (so
induction heads form). The tokenizer is word-level with GPT-2's byte-level pre-tokenizer, so
tokens look like GPT-2's (" Mary" with its leading space) and the app's examples work unchanged.
Prints the measured behaviour (see measure.py) at the end.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from demo_model import corpus

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
BOS, UNK = "<|endoftext|>", "<|unk|>"


@dataclass(frozen=True)
class TrainConfig:
    seed: int = 0
    n_layers: int = 5
    n_heads: int = 4
    d_model: int = 128
    n_ctx: int = 64  # longest sample: BOS + 2 x 24 repeated words
    steps: int = 3000
    batch: int = 64
    lr: float = 1e-3  # at 3e-3 the previous-token head decays before induction forms
    warmup: int = 100
    weight_decay: float = 0.01
    mix: tuple[float, float, float] = (0.25, 0.08, 0.67)  # IOI, facts, repeated random words
    repeat_len: tuple[int, int] = (4, 24)  # random words per copy
    threads: int = 1  # the committed weights were trained on 1 thread; another count rounds differently (see README)
    position_scale: float = 0.1  # size of the sinusoidal position initialisation
    # Random words before the first copy and between the copies: without them the copy can be
    # found by position alone and no induction head forms.
    repeat_prefix: int = 16  # up to this many random words before the first copy
    repeat_gap: int = 16  # up to this many random words between the copies
    # Head 0 of layer 1 starts as a previous-token head (so the induction heads form in layer 2), and
    # layer 0 is kept from attending to the previous position: a layer-0 previous-token head would
    # also carry S2's name to the next position, blurring the IOI patching picture at S2.
    previous_token_init: float = 6.0  # > 0: head 0 of `previous_token_layer` starts as a previous-token head this sharp
    previous_token_layer: int = 1
    layer0_previous_penalty: float = 1.0  # > 0: add this x layer 0's mean attention on the previous position (real tokens only) to the loss
    # Speed only (the loss is the same): rows sorted by length and run in groups of this many, each
    # group cut to its longest row, so no compute goes to padding.
    rows_per_group: int = 16


def build_tokenizer():
    """Word-level vocabulary of every word in the corpus and the examples, GPT-2-style pieces."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    pre = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    pieces = sorted({piece for text in corpus.vocabulary_texts() for piece, _ in pre.pre_tokenize_str(text)})
    vocab = {BOS: 0, UNK: 1, **{piece: i + 2 for i, piece in enumerate(pieces)}}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    backend.pre_tokenizer = pre
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=BOS, eos_token=BOS, unk_token=UNK, pad_token=BOS)


def _noise(rng: random.Random, word_ids: list[int], most: int) -> list[int]:
    """0 to `most` random words (none, and no random draws, when `most` <= 0)."""
    return [rng.choice(word_ids) for _ in range(rng.randint(0, most))] if most > 0 else []


def make_batch(rng: random.Random, tokenizer, config: TrainConfig, word_ids: list[int]):
    """Token ids [batch, n_ctx] (BOS first, padded) and a loss mask on real next tokens."""
    rows = []
    for _ in range(config.batch):
        kind = rng.choices(["ioi", "fact", "repeat"], weights=config.mix)[0]
        learn_from = 0  # index of the first token whose prediction is trained
        if kind == "repeat":
            half = [rng.choice(word_ids) for _ in range(rng.randint(*config.repeat_len))]
            room = config.n_ctx - 1 - 2 * len(half)
            prefix = _noise(rng, word_ids, min(config.repeat_prefix, room))
            gap = _noise(rng, word_ids, min(config.repeat_gap, room - len(prefix)))
            ids = prefix + half + gap + half
            learn_from = len(ids) - len(half)  # everything before the second copy is unpredictable: no loss
        else:
            text = corpus.sample_ioi(rng) if kind == "ioi" else corpus.sample_fact(rng)
            ids = tokenizer.encode(text, add_special_tokens=False)
        rows.append(([tokenizer.bos_token_id, *ids][: config.n_ctx], learn_from))
    tokens = torch.full((config.batch, config.n_ctx), tokenizer.bos_token_id)
    mask = torch.zeros(config.batch, config.n_ctx - 1)
    for i, (row, learn_from) in enumerate(rows):
        tokens[i, : len(row)] = torch.tensor(row)
        mask[i, learn_from : len(row) - 1] = 1.0  # mask[i, t] trains the prediction of token t + 1
    return tokens, mask


def sinusoidal_positions(n_ctx: int, d_model: int, scale: float) -> torch.Tensor:
    """Transformer-style sinusoidal position vectors: "attend to the previous position" is then an
    easy rotation to learn, which lets the previous-token heads (and so induction) form early."""
    position = torch.arange(n_ctx, dtype=torch.float32)[:, None]
    frequency = torch.exp(torch.arange(0, d_model, 2, dtype=torch.float32) * (-torch.log(torch.tensor(1e4)) / d_model))
    table = torch.zeros(n_ctx, d_model)
    table[:, 0::2] = torch.sin(position * frequency)
    table[:, 1::2] = torch.cos(position * frequency)
    return scale * table


def previous_token_head(model, scale: float, position_scale: float, layer: int = 0, head: int = 0) -> None:
    """Set one head's query and key weights so that it attends to the previous position.

    With sinusoidal positions, (sin(i w), cos(i w)) rotated by w is (sin((i+1) w), cos((i+1) w)), so a
    query reading position i's pairs and a key reading position j's pairs rotated by w score
    sum_w cos((i - j - 1) w): highest at j = i - 1. The head uses the fastest d_head / 2 frequencies.
    """
    d_model, d_head = model.config.n_embd, model.config.n_embd // model.config.n_head
    frequency = torch.exp(torch.arange(0, d_model, 2, dtype=torch.float32) * (-torch.log(torch.tensor(1e4)) / d_model))
    weight = model.transformer.h[layer].attn.c_attn.weight  # [d_model, 3 d_model]: x @ weight = q, k, v
    amplitude = scale / (position_scale / 0.0725)  # LayerNorm rescales the position vectors (rms ~ position_scale / sqrt 2)
    with torch.no_grad():
        q_cols = slice(head * d_head, (head + 1) * d_head)
        k_cols = slice(d_model + head * d_head, d_model + (head + 1) * d_head)
        weight[:, q_cols] = 0.0
        weight[:, k_cols] = 0.0
        for m in range(d_head // 2):
            w = float(frequency[m])
            c, s = torch.cos(torch.tensor(w)).item(), torch.sin(torch.tensor(w)).item()
            weight[2 * m, q_cols.start + 2 * m] = amplitude
            weight[2 * m + 1, q_cols.start + 2 * m + 1] = amplitude
            weight[2 * m, k_cols.start + 2 * m] = amplitude * c
            weight[2 * m + 1, k_cols.start + 2 * m] = amplitude * s
            weight[2 * m, k_cols.start + 2 * m + 1] = -amplitude * s
            weight[2 * m + 1, k_cols.start + 2 * m + 1] = amplitude * c


def induction_stripe(model, word_ids: list[int], seq_len: int = 20, batch: int = 16) -> float:
    """Progress signal: the best head's mean attention on the induction stripe (fixed eval batch)."""
    rng = random.Random(12345)
    half = torch.tensor([[rng.choice(word_ids) for _ in range(seq_len)] for _ in range(batch)])
    tokens = torch.cat([torch.full((batch, 1), model.config.bos_token_id), half, half], dim=1)
    with torch.no_grad():
        attentions = model(tokens, output_attentions=True).attentions  # per layer [batch, head, dest, src]
    stripes = [a.diagonal(offset=1 - seq_len, dim1=-2, dim2=-1)[..., 2:].mean((0, -1)) for a in attentions[1:]]
    return float(torch.stack(stripes).max())


def s2_probe(model, tokenizer, layer: int = 1) -> float:
    """Progress signal: patching the clean resid_pre at S2 into the corrupted seed IOI run, at `layer`,
    restores this fraction of the logit difference (1 = S2 still holds all of it)."""
    ids = [torch.tensor([[tokenizer.bos_token_id, *tokenizer.encode(t, add_special_tokens=False)]]) for t in (corpus.SEED_CLEAN, corpus.SEED_CORRUPTED)]
    s2 = int((ids[0] != ids[1]).nonzero()[0, 1])
    mary, john = (tokenizer.encode(t, add_special_tokens=False)[0] for t in (corpus.SEED_ANSWER, corpus.SEED_WRONG))
    was_training = model.training
    model.eval()
    with torch.no_grad():
        out = [model(t, output_hidden_states=True) for t in ids]
        diff = [float(o.logits[0, -1, mary] - o.logits[0, -1, john]) for o in out]
        saved = out[0].hidden_states[layer][0, s2].clone()

        def patch(module, args):
            hidden = args[0].clone()
            hidden[0, s2] = saved
            return (hidden, *args[1:])

        handle = model.transformer.h[layer].register_forward_pre_hook(patch)
        try:
            logits = model(ids[1]).logits
        finally:
            handle.remove()
    model.train(was_training)
    patched = float(logits[0, -1, mary] - logits[0, -1, john])
    return (patched - diff[1]) / (diff[0] - diff[1]) if diff[0] != diff[1] else float("nan")


def training_loss(model, tokens: torch.Tensor, mask: torch.Tensor, config: TrainConfig) -> torch.Tensor:
    """Mean next-token loss over the masked predictions, plus the layer-0 previous-position penalty
    (layer 0's mean attention on the previous position, over every head and every real position from
    2 on). Gradients are accumulated group by group (rows sorted by length, each group cut to its
    longest row), so padding costs nothing; the value and gradient are those of the whole batch."""
    positions = torch.arange(tokens.shape[1])
    lengths = ((tokens != tokens[:, :1]) * positions).max(1).values + 1  # tokens per row, BOS included (padding is BOS)
    order = torch.argsort(lengths, stable=True)
    n_predictions = mask.sum()
    penalised = (torch.clamp(lengths - 2, min=0) * config.n_heads).sum()  # (row, head, position >= 2) triples
    total = torch.zeros(())
    for group in order.split(config.rows_per_group):
        length = int(lengths[group].max())
        group_tokens, group_mask = tokens[group, :length], mask[group, : length - 1]
        output = model(group_tokens, output_attentions=config.layer0_previous_penalty > 0)
        logits = output.logits[:, :-1]
        losses = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), group_tokens[:, 1:].reshape(-1), reduction="none")
        loss = (losses * group_mask.reshape(-1)).sum() / n_predictions
        if config.layer0_previous_penalty > 0:
            previous = output.attentions[0].diagonal(offset=-1, dim1=-2, dim2=-1)[..., 1:]  # [row, head, dest - 2]
            real = torch.arange(length - 2)[None, None, :] < (lengths[group] - 2)[:, None, None]
            loss = loss + config.layer0_previous_penalty * (previous * real).sum() / penalised
        loss.backward()
        total = total + loss.detach()
    return total


def train(config: TrainConfig, out: Path, log=print) -> Path:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(config.seed)
    torch.set_num_threads(config.threads)
    rng = random.Random(config.seed)
    tokenizer = build_tokenizer()
    word_ids = sorted(i for i in tokenizer.get_vocab().values() if i not in tokenizer.all_special_ids)  # get_vocab()'s order varies between calls
    model_config = GPT2Config(
        vocab_size=len(tokenizer), n_positions=config.n_ctx, n_embd=config.d_model, n_layer=config.n_layers,
        n_head=config.n_heads, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.bos_token_id,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, attn_implementation="eager",
        activation_function="gelu_pytorch_tanh",  # GPT-2's gelu_new in one fused kernel (faster); saved as gelu_new
    )
    model = GPT2LMHeadModel(model_config).train()
    with torch.no_grad():
        model.transformer.wpe.weight.copy_(sinusoidal_positions(config.n_ctx, config.d_model, config.position_scale))
    if config.previous_token_init > 0:
        previous_token_head(model, config.previous_token_init, config.position_scale, config.previous_token_layer)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: min(1.0, (step + 1) / config.warmup) * 0.5 * (1 + torch.cos(torch.tensor(step / config.steps * torch.pi)).item()),
    )
    start = time.perf_counter()
    for step in range(config.steps):
        tokens, mask = make_batch(rng, tokenizer, config, word_ids)
        optimizer.zero_grad()
        loss = training_loss(model, tokens, mask, config)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if step % 250 == 0 or step == config.steps - 1:
            stripe, probe, seconds = induction_stripe(model, word_ids), s2_probe(model, tokenizer), time.perf_counter() - start
            log(f"step {step:5d}  loss {loss.item():.3f}  best induction stripe {stripe:.3f}  S2 patch at layer 1 {probe:.3f}  {seconds:.0f}s")
    model.eval()
    model.config.activation_function = "gelu_new"  # the same function; the name GPT-2 and TransformerLens use
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / "train_config.json").write_text(json.dumps(asdict(config), indent=2) + "\n")
    log(f"saved to {out} after {time.perf_counter() - start:.0f}s")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=WEIGHTS_DIR)
    parser.add_argument("--steps", type=int, default=TrainConfig.steps)
    parser.add_argument("--seed", type=int, default=TrainConfig.seed)
    parser.add_argument("--threads", type=int, default=TrainConfig.threads, help="CPU threads; another count gives another (equally valid) model")
    args = parser.parse_args()
    out = train(TrainConfig(steps=args.steps, seed=args.seed, threads=args.threads), args.out)
    from demo_model.measure import measure, report

    print(report(measure(str(out))))


if __name__ == "__main__":
    main()

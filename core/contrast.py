"""The contract every patching technique shares, defined once: a validated contrast pair, its metric,
and the table of sweeps. Exact patching (both engines, `core.patching`), attribution patching, the
results, the plots and DLA read it from here.

- `LogitDiff`: logit(answer) - logit(wrong) at the final position (logit(answer) alone when there is no
  wrong token). Read off the logits (hook-based code), or as an unembedding direction plus a bias on
  the final LayerNorm's output (the fast engine, DLA): the same number.
- `ContrastPair`: clean and corrupted prompts of one token length, answer and wrong answer as single,
  different tokens; built only through its checks, each failing with a sentence a person can act on.
- `SWEEPS`: what one patch replaces, with exactly the semantics of `transformer_lens.patching`
  (`Sweep.reference` names its function there).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from jaxtyping import Float, Int
from torch import Tensor

from core.config import DEFAULTS, LIMITS
from core.model import Model, single_token_id, str_tokens, to_tokens
from core.registry import Input
from examples import IOI_CLEAN, IOI_CORRUPTED

# --- the metric -------------------------------------------------------------------------


@dataclass(frozen=True)
class LogitDiff:
    """logit(answer) - logit(wrong) at the final position; logit(answer) alone when `wrong_id` is None."""

    answer_id: int
    wrong_id: int | None = None

    def of_logits(self, logits: Float[Tensor, "batch pos vocab"]) -> Float[Tensor, " batch"]:
        final = logits[:, -1]
        value = final[:, self.answer_id] if self.wrong_id is None else final[:, self.answer_id] - final[:, self.wrong_id]
        return value.double()

    def direction(self, W_U: Float[Tensor, "d_model vocab"], b_U: Float[Tensor, " vocab"]) -> tuple[Float[Tensor, " d_model"], Float[Tensor, ""]]:
        """(direction, bias): the metric is the final LayerNorm's output @ direction + bias."""
        if self.wrong_id is None:
            return W_U[:, self.answer_id], b_U[self.answer_id]
        return W_U[:, self.answer_id] - W_U[:, self.wrong_id], b_U[self.answer_id] - b_U[self.wrong_id]


# --- the sweeps -------------------------------------------------------------------------


@dataclass(frozen=True)
class Sweep:
    name: str  # the result's field and the JSON key
    hook: str  # hook name inside a block, e.g. "hook_resid_pre" -> blocks.{layer}.hook_resid_pre
    axis: Literal["pos", "head"]  # what one patch replaces: one position, or one head at all positions
    enters: Literal["pre", "mid", "post"]  # where in block `layer` the patched value reaches the residual stream
    replaces_stream: bool  # True: the patch sets the residual stream itself (resid_pre); False: it adds its change
    title: str  # a figure's short name
    detail: str  # what the figure's axes hold
    reference: str  # transformer_lens.patching's function with the same semantics

    def size(self, n_pos: int, n_heads: int) -> int:
        """Scores per layer."""
        return n_pos if self.axis == "pos" else n_heads


SWEEPS: dict[str, Sweep] = {
    sweep.name: sweep
    for sweep in (
        Sweep("resid_pre", "hook_resid_pre", "pos", "pre", True, "Residual stream", "resid_pre by layer and position", "get_act_patch_resid_pre"),
        Sweep("attn_out", "hook_attn_out", "pos", "mid", False, "Attention output", "attn_out by layer and position", "get_act_patch_attn_out"),
        Sweep("mlp_out", "hook_mlp_out", "pos", "post", False, "MLP output", "mlp_out by layer and position", "get_act_patch_mlp_out"),
        Sweep("head_out", "attn.hook_z", "head", "mid", False, "Head output", "each head at all positions", "get_act_patch_attn_head_out_all_pos"),
    )
}
SWEEP_HOOKS = tuple(sweep.hook for sweep in SWEEPS.values())  # every hook a sweep patches


# --- the pair ---------------------------------------------------------------------------


def _prompt_tokens(model: Model, prompt: str, role: str) -> Int[Tensor, "1 pos"]:
    return to_tokens(model, prompt, LIMITS.max_patching_tokens, f"The {role} prompt")


def _check_lengths(model: Model, clean_tokens: Tensor, corrupted_tokens: Tensor) -> None:
    """Same number of tokens (positions line up), and not the very same tokens (nothing to patch)."""
    if clean_tokens.shape != corrupted_tokens.shape:
        raise ValueError(
            "The clean and corrupted prompts must have the same number of tokens so positions line up: "
            f"clean has {clean_tokens.shape[-1]} (BOS, then {str_tokens(model, clean_tokens)[1:]}), "  # BOS unnamed: its '<' is no
            f"corrupted has {corrupted_tokens.shape[-1]} (BOS, then {str_tokens(model, corrupted_tokens)[1:]})."  # HTML entity in an API's message
        )
    if torch.equal(clean_tokens, corrupted_tokens):
        raise ValueError(
            "The clean and corrupted prompts are the same tokens, so they give the same logit difference and there "
            "is nothing for patching to restore: change the corrupted prompt (e.g. swap a name)."
        )


def _check_different(answer: str, answer_id: int, wrong_id: int) -> None:
    if answer_id == wrong_id:
        raise ValueError(f"The answer and the wrong answer are the same token ({answer!r}): pick two different tokens.")


@dataclass(frozen=True)
class ContrastPair:
    """A clean and a corrupted prompt of the same token length, and the metric that tells them apart."""

    clean_prompt: str
    corrupted_prompt: str
    answer: str
    wrong_answer: str
    clean_tokens: Int[Tensor, "1 pos"]
    corrupted_tokens: Int[Tensor, "1 pos"]
    metric: LogitDiff

    @classmethod
    def of(cls, model: Model, clean_prompt: str, corrupted_prompt: str, answer: str, wrong_answer: str) -> ContrastPair:
        """The pair, checked (prompts, then their lengths, then the two tokens): ValueError otherwise."""
        clean_tokens = _prompt_tokens(model, clean_prompt, "clean")
        corrupted_tokens = _prompt_tokens(model, corrupted_prompt, "corrupted")
        _check_lengths(model, clean_tokens, corrupted_tokens)
        answer_id = single_token_id(model, answer, "answer")
        wrong_id = single_token_id(model, wrong_answer, "wrong answer")
        _check_different(answer, answer_id, wrong_id)
        return cls(clean_prompt, corrupted_prompt, answer, wrong_answer, clean_tokens, corrupted_tokens, LogitDiff(answer_id, wrong_id))

    @property
    def first_difference(self) -> int:
        """The first position where the prompts' tokens differ (patching earlier positions changes nothing)."""
        return int((self.clean_tokens[0] != self.corrupted_tokens[0]).nonzero()[0])


def input_errors(model: Model, clean_prompt: str, corrupted_prompt: str, answer: str, wrong_answer: str) -> dict[str, str]:
    """What is wrong with each argument of a contrast pair, keyed by argument name, without running
    the model (the same checks and messages as ContrastPair.of): {} when all are fine."""
    errors: dict[str, str] = {}
    values = {}
    checks = {
        "clean_prompt": lambda: _prompt_tokens(model, clean_prompt, "clean"),
        "corrupted_prompt": lambda: _prompt_tokens(model, corrupted_prompt, "corrupted"),
        "answer": lambda: single_token_id(model, answer, "answer"),
        "wrong_answer": lambda: single_token_id(model, wrong_answer, "wrong answer"),
    }
    for name, check in checks.items():
        try:
            values[name] = check()
        except ValueError as err:
            errors[name] = str(err)
    pairs = {
        "corrupted_prompt": (("clean_prompt", "corrupted_prompt"), lambda: _check_lengths(model, values["clean_prompt"], values["corrupted_prompt"])),
        "wrong_answer": (("answer", "wrong_answer"), lambda: _check_different(answer, values["answer"], values["wrong_answer"])),
    }
    for name, (needs, check) in pairs.items():
        if all(n in values for n in needs):
            try:
                check()
            except ValueError as err:
                errors[name] = str(err)
    return errors


PAIR = (  # a contrast pair as a technique's inputs (core.registry)
    Input("clean_prompt", "prompt", "the prompt whose behaviour patching restores"),
    Input("corrupted_prompt", "prompt", "the same number of tokens, changed so the answer changes"),
    Input("answer", "token", "the clean prompt's answer, e.g. ' Mary'"),
    Input("wrong_answer", "token", "the answer the corruption favours, e.g. ' John'"),
)
PAIR_EXAMPLE = {"clean_prompt": IOI_CLEAN, "corrupted_prompt": IOI_CORRUPTED, "answer": " Mary", "wrong_answer": " John"}
ON_A_PAIR = dict(  # what every technique on a contrast pair declares alike: Technique(name=..., ..., **ON_A_PAIR)
    inputs=PAIR, lane="heavy", example=PAIR_EXAMPLE, input_errors=input_errors, tab="Contrast Pairs", progress=True
)


# --- scores -----------------------------------------------------------------------------


def check_swing(clean_value: float, corrupted_value: float) -> None:
    """Scores are normalised by clean - corrupted: refuse a pair where that is (near) zero."""
    if abs(clean_value - corrupted_value) < DEFAULTS.same_metric_tolerance:
        raise ValueError(
            f"The clean and corrupted prompts give the same logit difference ({clean_value:.4f}), "
            "so there is nothing for patching to restore: make the prompts differ in a way that "
            "changes the answer."
        )


def normalised(raw: Float[Tensor, "layer index"], clean_value: float, corrupted_value: float) -> np.ndarray:
    """(patched - corrupted) / (clean - corrupted): 0 = no effect, 1 = clean behaviour restored."""
    return ((raw - corrupted_value) / (clean_value - corrupted_value)).numpy()

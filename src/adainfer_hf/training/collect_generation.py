"""Feature collection for generation: one unit per generated token, recorded by the decode loop itself.

`collect_features` records the prompt's next token only. What a generation classifier meets is mostly single-token
decode steps, whose answers settle differently (a word's continuation, punctuation, a formula the prompt set up).
[`collect_generation_features`] greedy-generates `new_tokens` tokens per prompt with the dense model and records,
for every generated token, every layer's features through the same exit loop and the same [`RecordingPolicy`]: the
prompt forward for the first token, then one cached single-token step per further token (the decode path a live
classifier runs). The recording policy never exits, so the continuation is the dense model's own greedy one.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from .. import compat
from ..architectures.registry import spec_for
from ..policy.base import check_dtype_or_raise
from ..policy.features import FEATURES
from ..utils.distributed import is_main_process, shard_results
from ..utils.tokenizers import left_padding
from .collect import RecordingPolicy, check_feature_names
from .table import FeatureTable

__all__ = ["collect_generation_features"]


def collect_generation_features(
    model,
    tokenizer,
    prompts,
    new_tokens: int = 32,
    features: Sequence[str] = tuple(FEATURES),
    batch_size: int = 16,
    progress: bool = True,
    check_dtype: str | None = None,
    hidden_states: bool = False,
    first_layer: int = 1,
    distributed: bool = False,
) -> FeatureTable | None:
    """Per-layer exit features of the first `new_tokens` greedy tokens of each prompt's dense continuation.

    Args:
        model: an AdaInfer model (its exit classifier is ignored).
        tokenizer (`PreTrainedTokenizerBase`): its tokenizer; prompts are left-padded.
        prompts (`Sequence[data.Prompt]`): the prompts (e.g. chat-formatted questions); `answer` is not used.
        new_tokens (`int`, *optional*, defaults to 32): tokens generated (and recorded) per prompt, end-of-text
            included: the continuation runs `new_tokens` steps whatever it emits, as `min_new_tokens` would.
        features, batch_size, progress, check_dtype, hidden_states: as in `collect_features`.
        first_layer (`int`, *optional*, defaults to 1): record layers `first_layer..L-1` only. Every recorded
            layer computes the LM head for every row and step; a model whose logit lens never agrees with its
            last layer in its first half (Qwen2.5, Gemma-3) loses nothing with `first_layer = L // 2`, and the
            table then has no rows (so no exits) below it.
        distributed (`bool`, *optional*, defaults to `False`): share the batches of generations over the processes
            of an initialized `torch.distributed` group (as in `collect_features`); the main process merges them.

    Returns:
        [`FeatureTable`] with one unit ("prompt") per generated token, ordered by prompt then token; `sequence`
        is the prompt's index, `step` the token's (0 = the prompt forward's next token), `final_token` the dense
        model's token, `gold_token` -1; `meta["phase"] = "generation"`. None on the other processes with
        `distributed`.
    """
    features, prompts = tuple(features), list(prompts)
    _check_inputs(model, prompts, new_tokens, features, batch_size, check_dtype, first_layer)
    L, P, T = spec_for(model).num_layers(model), len(prompts), new_tokens
    hidden_size = int(model.config.hidden_size) if hidden_states else None
    kept = slice(first_layer - 1, L - 1)  # the recorded layers first_layer..L-1, 0-based
    batches = [np.arange(i, min(i + batch_size, P)) for i in range(0, P, batch_size)]

    def run(idx):  # [B, T, layers, ...] arrays of one batch (numpy: what another process sends)
        steps = _record_batch(model, tokenizer, [prompts[i].text for i in idx], T, features, check_dtype,
                              hidden_size, first_layer)
        stack = lambda values: np.stack([v.numpy()[:, kept] for v in values], axis=1)  # noqa: E731
        return (stack([p.feats for p, _ in steps]), stack([p.top_token for p, _ in steps]),
                np.stack([token for _, token in steps], axis=1),
                None if hidden_size is None else stack([p.hidden for p, _ in steps]))

    keeps = not distributed or is_main_process()  # the other processes only send their batches
    n = P if keeps else 0
    feats = np.zeros((n, T, L - first_layer, len(features)), dtype=np.float32)
    tops = np.zeros((n, T, L - first_layer), dtype=np.int64)
    final = np.zeros((n, T), dtype=np.int64)
    hidden = None if hidden_size is None else np.zeros((n, T, L - first_layer, hidden_size), dtype=np.float16)
    was_training = model.training
    try:
        with left_padding(tokenizer), torch.no_grad():
            model.eval()
            for b, (f, t, token, h) in shard_results(run, batches, distributed=distributed, progress=progress,
                                                     desc="recording generation"):
                idx = batches[b]
                feats[idx], tops[idx], final[idx] = f, t, token
                if hidden is not None:
                    hidden[idx] = h
    finally:
        model.train(was_training)
    if not keeps:
        return None
    return _generation_table(model, prompts, features, feats, tops, final, hidden, first_layer, check_dtype)


def _check_inputs(model, prompts, new_tokens, features, batch_size, check_dtype, first_layer) -> None:
    if not hasattr(model, "set_exit_classifier"):
        raise TypeError(f"collect_generation_features needs an AdaInfer model class; got {type(model).__name__} "
                        "(load it with load_adainfer_model).")
    for name, value in (("new_tokens", new_tokens), ("batch_size", batch_size)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be an int >= 1; got {value!r}.")
    check_dtype_or_raise(check_dtype)
    check_feature_names(features)
    if not prompts:
        raise ValueError("collect_generation_features got no prompts.")
    L = spec_for(model).num_layers(model)
    if not isinstance(first_layer, int) or isinstance(first_layer, bool) or not 1 <= first_layer <= L - 1:
        raise ValueError(f"first_layer must be an int in [1, {L - 1}] (the checkable layers); got {first_layer!r}.")


def _generation_table(model, prompts, features, feats, tops, final, hidden, first_layer,
                      check_dtype) -> FeatureTable:
    """The table of recorded arrays `[P, T, layers, ...]`: one unit per (prompt, generated token)."""
    L = spec_for(model).num_layers(model)
    P, T = final.shape
    n_layers = L - first_layer
    units = P * T
    per_unit = lambda values: np.repeat(np.asarray(values), T)  # noqa: E731 - one value per prompt, per token
    return FeatureTable(
        X=feats.reshape(-1, len(features)),
        feature_names=features,
        layer=np.tile(np.arange(first_layer, L, dtype=np.int64), units),
        prompt_id=np.repeat(np.arange(units, dtype=np.int64), n_layers),
        top_token=tops.reshape(-1),
        task=per_unit([p.task for p in prompts]),
        shots=per_unit([p.shots for p in prompts]),
        example_index=per_unit([p.index for p in prompts]),
        final_token=final.reshape(-1),
        gold_token=np.full(units, -1, dtype=np.int64),
        num_layers=np.full(units, L, dtype=np.int64),
        meta={"model": getattr(model.config, "_name_or_path", None) or None, "check_dtype": check_dtype,
              "phase": "generation", "new_tokens": T, "first_layer": first_layer},
        hidden=None if hidden is None else hidden.reshape(units * n_layers, -1),
        sequence=np.repeat(np.arange(P, dtype=np.int64), T),
        step=np.tile(np.arange(T, dtype=np.int64), P),
    )


def _record_batch(model, tokenizer, texts, new_tokens, features, check_dtype, hidden_size, first_layer):
    """Greedy dense generation of one left-padded batch, recording every layer of every step: a list of
    `(RecordingPolicy, next tokens as a numpy array)`, one per generated token."""
    L = spec_for(model).num_layers(model)
    device = next(model.parameters()).device
    enc = tokenizer(texts, return_tensors="pt", padding=True).to(device)
    mask = enc["attention_mask"]
    ids = enc["input_ids"]
    positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
    cache = None
    steps = []
    for _ in range(new_tokens):
        policy = RecordingPolicy(features, ids.shape[0], L, check_dtype=check_dtype, hidden_size=hidden_size,
                                 min_layer=first_layer)
        out = model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache,
                    use_cache=True, logits_to_keep=1, exit_policy=policy)
        if bool((policy.top_token[:, first_layer - 1:] < 0).any()):
            raise RuntimeError("The exit loop did not record every layer; is `record` called by runtime/exit_run.py?")
        token = out.logits[:, -1].argmax(-1)
        steps.append((policy, token.cpu().numpy()))
        cache = compat.output_cache(out)
        ids = token[:, None]
        positions = positions[:, -1:] + 1
        mask = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], dim=-1)
    return steps

"""Feature collection: run the model's own exit loop once per prompt batch and record every layer.

The features are computed by the decoder loop itself (`loop.ExitRun._check` → `features.compute_features`),
through a policy that checks every layer, never fires, and stores what it sees. Training data and live
decisions therefore share one code path: a classifier trained on a [`FeatureTable`] reads exactly the numbers
it will get at inference.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from ..architectures.registry import spec_for
from ..data.prompts import gold_first_token
from ..policy.base import ExitPolicy, check_dtype_or_raise
from ..policy.features import FEATURES
from ..utils.distributed import is_main_process, shard_results
from ..utils.tokenizers import left_padding
from .table import FeatureTable

__all__ = ["FeatureTable", "RecordingPolicy", "collect_features"]

class RecordingPolicy(ExitPolicy):
    """Checks every layer `1..L-1`, never exits, and stores each row's features and top-1 token per layer.

    It relies on the decoder loop's optional `record(layer, rows, feats, stats, logits)` hook, called after the
    features of a checked layer are computed; `decide` always answers "keep going".

    Args:
        features (`Sequence[str]`): feature names to compute, in column order.
        batch_size (`int`), num_layers (`int`): shape of the forward call about to run.
        check_dtype (`str`, *optional*): LM-head dtype of the checks (see `policy.CHECK_DTYPES`).
        hidden_size (`int`, *optional*): also store each row's last-token hidden state per layer (float16), what a
            gate is trained on; None stores none.
        min_layer (`int`, *optional*, defaults to 1): first layer recorded (the earlier ones run unchecked).
    """

    def __init__(self, features: Sequence[str], batch_size: int, num_layers: int, check_dtype: str | None = None,
                 hidden_size: int | None = None, min_layer: int = 1):
        self.features = tuple(features)
        self.min_layer = min_layer
        self.check_layers = None
        self.check_dtype = check_dtype
        self.feats = torch.full((batch_size, num_layers - 1, len(self.features)), float("nan"))
        self.top_token = torch.full((batch_size, num_layers - 1), -1, dtype=torch.long)
        self.hidden = None if hidden_size is None else torch.zeros((batch_size, num_layers - 1, hidden_size),
                                                                    dtype=torch.float16)

    def record_hidden(self, layer, rows, hidden) -> None:
        """Stores the last-token hidden states of `rows` after `layer` (when asked for at construction)."""
        if self.hidden is not None:
            self.hidden[rows.to("cpu"), layer - 1] = hidden.detach().to("cpu", torch.float16)

    def record(self, layer, rows, feats, stats, logits) -> None:
        """Stores the features and the logit lens' top-1 of `rows` after `layer` (1-based)."""
        r = rows.to("cpu")
        self.feats[r, layer - 1] = feats.detach().to("cpu", torch.float32)
        self.top_token[r, layer - 1] = stats.top_token.detach().to("cpu")

    def decide(self, features, layer, rows, state=None):
        """Never fires: every layer runs (see `ExitPolicy.decide`)."""
        return torch.zeros(features.shape[0], dtype=torch.bool, device=features.device)


def check_feature_names(features: tuple[str, ...]) -> None:
    """`ValueError` naming the unknown names when `features` is empty or holds a name not in `FEATURES`."""
    unknown = [f for f in features if f not in FEATURES]
    if unknown or not features:
        raise ValueError(f"Unknown feature(s) {unknown or features}; expected names from {sorted(FEATURES)}.")


def collect_features(
    model,
    tokenizer,
    prompts,
    features: Sequence[str] = tuple(FEATURES),
    batch_size: int = 8,
    progress: bool = True,
    check_dtype: str | None = None,
    hidden_states: bool = False,
    distributed: bool = False,
) -> FeatureTable | None:
    """Collects per-layer exit features for `prompts` with one forward per batch through the model's exit loop.

    Args:
        model (`AdaInferLlamaForCausalLM` or `AdaInferOPTForCausalLM`): the model (its exit classifier is ignored).
        tokenizer (`PreTrainedTokenizerBase`): its tokenizer; prompts are left-padded.
        prompts (`Sequence[data.Prompt]`): prompts, e.g. from `data.build_prompts`; `answer` may be empty (then
            `gold_token` is -1).
        features (`Sequence[str]`, *optional*, defaults to every name in `FEATURES`): what to record.
        batch_size (`int`, *optional*, defaults to 8): prompts per forward.
        progress (`bool`, *optional*, defaults to `True`): show a tqdm bar.
        check_dtype (`str`, *optional*): compute the logit lens with the LM head in this dtype ("bfloat16",
            "float16"), as a classifier with the same `check_dtype` will at run time; recorded in `meta`.
        hidden_states (`bool`, *optional*, defaults to `False`): also record each row's last-token hidden state
            (`FeatureTable.hidden`, float16), what `policy.gate.fit_linear_gate` trains on.
        distributed (`bool`, *optional*, defaults to `False`): under `accelerate launch` (an initialized
            `torch.distributed` group), share the work: every process calls this with the same prompts and runs
            its share of the batches (`utils.distributed.shard_results`); the main process merges them. The batches
            are the one-process run's, so the table is too, row for row. Without a group: one process.

    Returns:
        [`FeatureTable`]: rows ordered by prompt, then layer; None on the other processes with `distributed`.
    """
    if not hasattr(model, "set_exit_classifier"):
        raise TypeError(
            f"collect_features needs an AdaInfer model class; got {type(model).__name__} "
            "(load it with load_adainfer_model)."
        )
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1; got {batch_size!r}.")
    check_dtype_or_raise(check_dtype)
    features = tuple(features)
    check_feature_names(features)
    prompts = list(prompts)
    if not prompts:
        raise ValueError("collect_features got no prompts.")
    L = spec_for(model).num_layers(model)
    P, F = len(prompts), len(features)
    gold = np.array(
        [gold_first_token(tokenizer, p.text, p.answer) if p.answer.strip() else -1 for p in prompts],
        dtype=np.int64,
    )
    hidden_size = int(model.config.hidden_size) if hidden_states else None
    recorded = _record_layers(model, tokenizer, prompts, features, batch_size, progress, check_dtype, hidden_size,
                              distributed)
    if recorded is None:  # another process's table: the main process has it
        return None
    feats, tops, final, hidden = recorded

    layers = np.arange(1, L, dtype=np.int64)
    return FeatureTable(
        X=feats.reshape(-1, F),
        feature_names=features,
        layer=np.tile(layers, P),
        prompt_id=np.repeat(np.arange(P, dtype=np.int64), L - 1),
        top_token=tops.reshape(-1),
        task=[p.task for p in prompts],
        shots=[p.shots for p in prompts],
        example_index=[p.index for p in prompts],
        final_token=final,
        gold_token=gold,
        num_layers=np.full(P, L, dtype=np.int64),
        meta={"model": getattr(model.config, "_name_or_path", None) or None, "check_dtype": check_dtype},
        hidden=None if hidden is None else hidden.reshape(P * (L - 1), -1),
    )


def _record_layers(model, tokenizer, prompts, features, batch_size, progress, check_dtype, hidden_size=None,
                   distributed=False):
    """Runs every prompt through the exit loop with a [`RecordingPolicy`]: features `[P, L-1, F]`, top-1 tokens
    `[P, L-1]`, the dense top-1 `[P]` and (with `hidden_size`) hidden states `[P, L-1, H]` (else None), each
    prompt in its own slot. With `distributed`, this process runs its share of the batches and only the main
    process gets the arrays (None elsewhere)."""
    L, P = spec_for(model).num_layers(model), len(prompts)
    device = next(model.parameters()).device
    # Batches of similar length waste less compute on padding; results go back to each prompt's own slot.
    lengths = [len(tokenizer(p.text, add_special_tokens=True)["input_ids"]) for p in prompts]
    order = np.argsort(lengths, kind="stable")
    batches = [order[i : i + batch_size] for i in range(0, P, batch_size)]

    def run(idx):
        enc = tokenizer([prompts[i].text for i in idx], return_tensors="pt", padding=True)
        enc = {k: v.to(device) for k, v in enc.items()}
        policy = RecordingPolicy(features, len(idx), L, check_dtype=check_dtype, hidden_size=hidden_size)
        out = model(**enc, use_cache=False, logits_to_keep=1, exit_policy=policy)
        if bool((policy.top_token < 0).any()):
            raise RuntimeError("The exit loop did not record every layer; is `record` called by runtime/exit_run.py?")
        return (policy.feats.numpy(), policy.top_token.numpy(),
                None if policy.hidden is None else policy.hidden.numpy(), out.logits[:, -1].argmax(-1).cpu().numpy())

    keeps = not distributed or is_main_process()  # the other processes only send their batches
    n = P if keeps else 0
    feats = np.zeros((n, L - 1, len(features)), dtype=np.float32)
    hidden = None if hidden_size is None else np.zeros((n, L - 1, hidden_size), dtype=np.float16)
    tops = np.zeros((n, L - 1), dtype=np.int64)
    final = np.zeros(n, dtype=np.int64)
    was_training = model.training
    try:
        with left_padding(tokenizer), torch.no_grad():
            model.eval()
            for b, (f, t, h, top) in shard_results(run, batches, distributed=distributed, progress=progress,
                                                   desc="collecting features"):
                idx = batches[b]
                feats[idx], tops[idx], final[idx] = f, t, top
                if hidden is not None:
                    hidden[idx] = h
    finally:
        model.train(was_training)
    return (feats, tops, final, hidden) if keeps else None

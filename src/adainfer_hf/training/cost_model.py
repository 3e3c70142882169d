"""A cost model of lossless decoding, measured on the model itself (its dtype, its device, this machine's threads).

Lossless generation (`runtime.lossless`) runs three kinds of steps. A *draft* step feeds one token through the
layers up to the layer where its check fires (catching up, at each layer, the positions still owed below it); a
*verification* step runs every layer, catching every owed position up, and the final norm and LM head over all of
them at once; a *stock* step is the plain model's. What makes drafting pay is that a layer (and the head) on n
positions costs much less than n times one position. [`measure_cost_model`] times the parts (alternating them,
repeating, taking medians):

- one decoder layer on n = 1..`max_positions` new positions over a cache of `cache_length` positions;
- the final norm + the LM head on n positions (verification);
- one draft check at a layer: the lens on the full vocabulary and on shortlists of K ids (features and the
  decision's host copy included), and a linear gate;
- the loop's fixed per-step cost: a lossless decode step that runs every layer and checks once, minus its parts,
  and the stock `generate`'s decode step (both from the difference of two generation lengths, so the prompt
  forward cancels).

[`CostModel`] predicts from them the seconds of a draft step, a verification step with P owed positions and a
stock step; it is stored in a drafting artifact (`calibration["cost_model"]`) with the device, dtype and threads.
"""

from __future__ import annotations

import dataclasses
import platform
import statistics
import time
from collections.abc import Sequence

import torch

from .. import compat
from ..architectures.devices import execution_device
from ..architectures.head import head_of
from ..policy.base import ExitPolicy
from ..policy.features import compute_features

__all__ = ["CostModel", "measure_cost_model"]


@dataclasses.dataclass(frozen=True)
class CostModel:
    """Measured seconds of the parts of a decode step, and the step times they predict.

    Args:
        num_layers (`int`): the model's decoder layer count L.
        layer_seconds (`tuple[float, ...]`): one decoder layer on n new positions, n = 1, 2, ... (index n - 1).
        head_seconds (`tuple[float, ...]`): the final norm and the full LM head on n positions.
        lens_seconds (`dict[str, float]`): one check's lens on one position (head, features, host copy), keyed by
            the shortlist size as a string, `"full"` for the whole vocabulary.
        gate_seconds (`float`): a linear gate in front of one check (a dot product and a host copy).
        loop_fixed_seconds (`float`): the lossless loop's per-step cost beyond its layers, checks and head.
        stock_step_seconds (`float`): one decode step of the stock `generate`.
        device, dtype, threads, cache_length, repeats: where and how it was measured (informational).
    """

    num_layers: int
    layer_seconds: tuple[float, ...]
    head_seconds: tuple[float, ...]
    lens_seconds: dict
    gate_seconds: float
    loop_fixed_seconds: float
    stock_step_seconds: float
    device: str = "cpu"
    dtype: str = "float32"
    threads: int = 1
    cache_length: int = 0
    repeats: int = 0

    def __post_init__(self):
        if not self.layer_seconds or not self.head_seconds:
            raise ValueError("a CostModel needs layer_seconds and head_seconds for at least one position.")
        for name in ("layer_seconds", "head_seconds"):
            # n positions never cost less than n - 1 (a smaller median is timing noise): running maximum
            values, top = [], 0.0
            for s in getattr(self, name):
                top = max(top, float(s))
                values.append(top)
            object.__setattr__(self, name, tuple(values))
        if "full" not in self.lens_seconds:
            raise ValueError(f"lens_seconds must hold the full-vocabulary check ('full'); got {sorted(self.lens_seconds)}.")

    # ------------------------------------------------------------------ parts
    @staticmethod
    def _at(table: tuple[float, ...], n: int) -> float:
        """`table[n - 1]`, extrapolated linearly past its end (n >= 1)."""
        if n <= len(table):
            return table[n - 1]
        slope = table[-1] - table[-2] if len(table) > 1 else table[-1]
        return table[-1] + max(slope, 0.0) * (n - len(table))

    def layer(self, n: int) -> float:
        """One decoder layer on `n` positions."""
        return self._at(self.layer_seconds, n)

    def head(self, n: int) -> float:
        """The final norm and LM head on `n` positions."""
        return self._at(self.head_seconds, n)

    def check(self, vocabulary: int | None = None, gated: bool = False, passes: bool = True) -> float:
        """One check: the gate (if `gated`), then, where it `passes`, the lens over `vocabulary` ids (None: all)."""
        key = "full" if vocabulary is None else str(int(vocabulary))
        if key not in self.lens_seconds:
            raise ValueError(f"no measured check over {key} ids; measured: {sorted(self.lens_seconds)}.")
        return (self.gate_seconds if gated else 0.0) + (self.lens_seconds[key] if passes or not gated else 0.0)

    def _layers(self, depth: int, frontiers: Sequence[int]) -> float:
        """Layers 1..`depth` for the current position plus the owed positions whose frontier lies below each."""
        total = 0.0
        for j in range(1, depth + 1):
            total += self.layer(1 + sum(1 for f in frontiers if f < j))
        return total

    # ------------------------------------------------------------------ steps
    def draft_step_seconds(self, exit_layer: int, checks: int, frontiers: Sequence[int] = (),
                           vocabulary: int | None = None) -> float:
        """A step whose check fires after `exit_layer` (< L), having run `checks` checks, with owed positions at
        `frontiers` (the layer each has reached) caught up at the layers it runs."""
        if not 1 <= exit_layer < self.num_layers:
            raise ValueError(f"exit_layer must lie in [1, {self.num_layers - 1}]; got {exit_layer!r}.")
        return self.loop_fixed_seconds + self._layers(exit_layer, frontiers) + checks * self.check(vocabulary)

    def verify_step_seconds(self, frontiers: Sequence[int] = (), checks: int = 0,
                            vocabulary: int | None = None) -> float:
        """A step that runs every layer (its `checks` did not fire) with P = len(`frontiers`) owed positions: they
        are caught up and go through the final norm and LM head with it (P + 1 positions)."""
        return (self.loop_fixed_seconds + self._layers(self.num_layers, frontiers)
                + checks * self.check(vocabulary) + self.head(1 + len(frontiers)))

    def stock_step(self) -> float:
        """Seconds of one stock decode step (measured as a whole)."""
        return self.stock_step_seconds

    # ------------------------------------------------------------------ record
    def to_dict(self) -> dict:
        """JSON-safe form (stored as `calibration["cost_model"]`)."""
        out = dataclasses.asdict(self)
        out["layer_seconds"], out["head_seconds"] = list(self.layer_seconds), list(self.head_seconds)
        return out

    @classmethod
    def from_dict(cls, data: dict) -> CostModel:
        """The model a `to_dict` wrote; `ValueError` naming unknown keys."""
        known = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise ValueError(f"CostModel has no field(s) {unknown}; expected keys among {known}.")
        return cls(**data)


class _NeverExit(ExitPolicy):
    """A check after layer L - 1 that never fires: a lossless step through the checked loop at full depth."""

    features = ("gap", "top_prob")

    def __init__(self, num_layers: int):
        self.check_layers = (num_layers - 1,)
        self.min_layer = 1

    def decide(self, features, layer, rows, state=None):
        return torch.zeros(features.shape[0], dtype=torch.bool, device=features.device)


def _alternating_medians(fns: dict, repeats: int, device: torch.device) -> dict:
    """Median seconds of each callable, run once to warm up, then `repeats` rounds, one call of each per round
    (the order rotating, so drifts of the machine hit every callable alike)."""
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    names = list(fns)
    for name in names:
        fns[name]()
    times = {name: [] for name in names}
    for r in range(repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:
            sync()
            t0 = time.perf_counter()
            fns[name]()
            sync()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()})"


@torch.no_grad()
def measure_cost_model(model, cache_length: int = 128, max_positions: int = 9,
                       vocabularies: Sequence[int] = (), repeats: int = 9, decode_tokens: int = 16) -> CostModel:
    """Times the parts of lossless decoding on `model` (an AdaInfer model, in eval mode) and returns the
    [`CostModel`].

    Args:
        cache_length (`int`, *optional*, defaults to 128): positions already in the cache (and the prompt length
            of the timed generations).
        max_positions (`int`, *optional*, defaults to 9): time a layer and the head on 1..`max_positions` new
            positions (a draft cap plus one).
        vocabularies (`Sequence[int]`, *optional*): shortlist sizes whose check is timed besides the full one.
        repeats (`int`, *optional*, defaults to 9): alternating rounds per part (medians are reported).
        decode_tokens (`int`, *optional*, defaults to 16): extra tokens of the timed generations.
    """
    for name, value, low in (("cache_length", cache_length, 1), ("max_positions", max_positions, 1),
                             ("repeats", repeats, 1), ("decode_tokens", decode_tokens, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an int >= {low}; got {value!r}.")
    head = head_of(model)
    spec = head.spec
    L = spec.num_layers(model)
    layer = spec.decoder_layers(model)[0]
    device = execution_device(layer)
    dtype = next(layer.parameters()).dtype
    H = int(model.config.hidden_size)
    was_training = model.training
    model.eval()
    try:
        layer_fns = _layer_calls(model, spec, layer, device, dtype, H, cache_length, max_positions)
        hidden = torch.randn(max_positions, H, device=head.device, dtype=dtype)
        fns = {f"layer{n}": fn for n, fn in layer_fns.items()}
        fns.update({f"head{n}": (lambda n=n: head.logits(hidden[:n])) for n in range(1, max_positions + 1)})
        for size in (None, *vocabularies):
            index = None if size is None else head.vocabulary(tuple(range(int(size))))
            fns[f"lens{size or 'full'}"] = lambda index=index: compute_features(
                ("gap", "top_prob"), head.logits(hidden[:1], None, index))[0].to("cpu")
        w = torch.randn(H, device=head.device, dtype=dtype)
        fns["gate"] = lambda: ((hidden[:1] @ w) * torch.rsqrt(hidden[:1].pow(2).mean(-1)) >= 0).to("cpu")
        with head.session():
            parts = _alternating_medians(fns, repeats, device)
        steps = _decode_steps(model, L, cache_length, decode_tokens, max(3, repeats // 3), device)
    finally:
        model.train(was_training)
    layer_s = tuple(parts[f"layer{n}"] for n in range(1, max_positions + 1))
    head_s = tuple(parts[f"head{n}"] for n in range(1, max_positions + 1))
    lens = {("full" if size is None else str(int(size))): parts[f"lens{size or 'full'}"]
            for size in (None, *vocabularies)}
    fixed = steps["lossless"] - L * layer_s[0] - lens["full"] - head_s[0]
    return CostModel(num_layers=L, layer_seconds=layer_s, head_seconds=head_s, lens_seconds=lens,
                     gate_seconds=parts["gate"], loop_fixed_seconds=max(fixed, 0.0),
                     stock_step_seconds=steps["stock"], device=_device_name(device),
                     dtype=str(dtype).removeprefix("torch."), threads=torch.get_num_threads(),
                     cache_length=cache_length, repeats=repeats)


def _layer_calls(model, spec, layer, device, dtype, H, cache_length, max_positions) -> dict:
    """`{n: callable}`: decoder layer 0 on n new positions over a cache of `cache_length`, cropped back after."""
    cache = compat.DynamicCache()
    past = torch.randn(1, cache_length, H, device=device, dtype=dtype)
    kwargs = _layer_kwargs(model, spec, past, 0)
    layer(past, attention_mask=None, use_cache=True, **{compat.CACHE_ARG: cache}, **kwargs)
    calls = {}
    for n in range(1, max_positions + 1):
        new = torch.randn(1, n, H, device=device, dtype=dtype)
        kw = _layer_kwargs(model, spec, new, cache_length)

        def call(new=new, kw=kw, n=n):
            layer(new, attention_mask=None, use_cache=True, **{compat.CACHE_ARG: cache}, **kw)
            cache.crop(-n)  # back to the cache_length positions

        calls[n] = call
    return calls


def _layer_kwargs(model, spec, hidden, start: int) -> dict:
    positions = torch.arange(start, start + hidden.shape[1], device=hidden.device).unsqueeze(0)
    kwargs = {"position_ids": positions, "cache_position": positions[0]}
    pe = spec.position_embeddings(model, hidden, positions)
    if pe is not None:
        kwargs["position_embeddings"] = pe
    return kwargs


def _decode_steps(model, num_layers, cache_length, decode_tokens, repeats, device) -> dict:
    """Seconds per decode step of the stock `generate` and of a lossless `generate` whose one check (after layer
    L - 1) never fires, from generations of 2 and 2 + `decode_tokens` tokens (the prompt forward cancels)."""
    vocab = int(model.config.vocab_size)
    ids = torch.randint(3, max(4, vocab), (1, cache_length), generator=torch.Generator().manual_seed(0)).to(device)
    never = _NeverExit(num_layers)
    pad = model.generation_config.pad_token_id
    pad = 0 if pad is None else pad

    def generate(n, lossless):
        policy = {"exit_policy": never, "lossless": True} if lossless else {"exit_policy": None}
        model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                       do_sample=False, pad_token_id=pad, **policy)

    short, long = 2, 2 + decode_tokens
    fns = {f"{kind}{n}": (lambda n=n, kind=kind: generate(n, kind == "lossless"))
           for kind in ("stock", "lossless") for n in (short, long)}
    t = _alternating_medians(fns, repeats, device)
    return {kind: max(t[f"{kind}{long}"] - t[f"{kind}{short}"], 0.0) / decode_tokens for kind in ("stock", "lossless")}

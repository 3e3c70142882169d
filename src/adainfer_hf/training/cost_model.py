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
- the stock `generate`'s decode step and a lossless decode step that runs every layer and checks once (both
  from the difference of two generation lengths, so the prompt forward cancels): the loop's fixed per-step cost is
  the second minus the first and its check. The layer table is scaled so that L layers and the head on one
  position make the stock step (on SmolLM2 a layer timed alone is 7-13% slower than in the model's loop), and
  the parts must agree with the whole before any scaling (`CONSISTENT_PARTS`; else it is measured again).

[`CostModel`] predicts from them the seconds of a draft step, a verification step with P owed positions and a
stock step; it is stored in a drafting artifact (`calibration["cost_model"]`) with the device, dtype and threads.
"""

from __future__ import annotations

import dataclasses
import platform
import statistics
import time
import warnings
from collections.abc import Sequence

import torch

from .. import compat
from ..architectures import few_rows
from ..architectures.devices import execution_device
from ..architectures.head import head_of
from ..policy.base import ExitPolicy
from ..policy.features import compute_features
from ..utils.timing import alternating_medians

__all__ = ["CONSISTENT_PARTS", "CostModel", "measure_cost_model", "nondecreasing_fit"]

# A stock decode step is L layers on one position, the head on one, and what neither covers (embedding, final
# norm, generate's own work): the parts come to 0.98x the whole on Gemma-3-270M, on a quiet CPU. Measured
# under load they came to 0.45x and 3.5x (another process's threads stall multi-threaded kernels, not the
# matrix-vector ones); outside these bounds the measurement is repeated, then reported as inconsistent.
CONSISTENT_PARTS = (0.5, 1.15)


def nondecreasing_fit(values: Sequence[float]) -> list[float]:
    """The non-decreasing sequence closest to `values` in squared error (pool adjacent violators): a median
    below its predecessor is averaged with it, instead of raising every later value to a noisy maximum."""
    blocks: list[list[float]] = []  # [mean, count]
    for v in values:
        blocks.append([float(v), 1])
        while len(blocks) > 1 and blocks[-2][0] > blocks[-1][0]:
            (m2, c2), (m1, c1) = blocks.pop(), blocks.pop()
            blocks.append([(m1 * c1 + m2 * c2) / (c1 + c2), c1 + c2])
    return [m for m, c in blocks for _ in range(c)]


@dataclasses.dataclass(frozen=True)
class CostModel:
    """Measured seconds of the parts of a decode step, and the step times they predict.

    Args:
        num_layers (`int`): the model's decoder layer count L.
        layer_seconds (`tuple[float, ...]`): one decoder layer on n new positions, n = 1, 2, ... (index n - 1),
            scaled so that L of them on one position and the head make the measured stock step.
        head_seconds (`tuple[float, ...]`): the final norm and the full LM head on n positions.
        lens_seconds (`dict[str, float]`): one check's lens on one position (head, features, host copy), keyed by
            the shortlist size as a string, `"full"` for the whole vocabulary.
        gate_seconds (`float`): a linear gate in front of one check (a dot product and a host copy).
        loop_fixed_seconds (`float`): the lossless loop's per-step cost beyond its layers, checks and head.
        stock_step_seconds (`float`): one decode step of the stock `generate`.
        device, dtype, threads, cache_length, repeats: where and how it was measured (informational).
        parts_over_stock (`float`, *optional*): the consistency of the parts with the whole, `(L layer(1) +
            head(1)) / stock_step_seconds` (see [`measure_cost_model`]); `attempts`: the measurements it took.
        kernels (`dict`, *optional*): which few-rows forms the timings ran (`architectures.few_rows`):
            `{"setting": few_rows.KERNEL, "chosen": {"<out>x<in> <dtype> rows<n>[ bias] threads<t>": "product" or
            "linear"}}` for the model's linear layers the `"auto"` setting timed; another CPU may choose others.
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
    parts_over_stock: float | None = None
    attempts: int = 1
    kernels: dict = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        if not self.layer_seconds or not self.head_seconds:
            raise ValueError("a CostModel needs layer_seconds and head_seconds for at least one position.")
        for name in ("layer_seconds", "head_seconds"):
            # n >= 2 positions never cost less than n - 1 (a smaller median is timing noise): the closest
            # non-decreasing fit. One position stands alone: it runs another kernel (matrix-vector), which may
            # cost more than two (the LM head on the CPU, see `ExitHead.final_rows`).
            values = [float(s) for s in getattr(self, name)]
            object.__setattr__(self, name, tuple(values[:1] + nondecreasing_fit(values[1:])))
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

    @property
    def consistent(self) -> bool:
        """Whether the parts agree with the whole stock step (`CONSISTENT_PARTS`); unknown (None) counts as yes."""
        low, high = CONSISTENT_PARTS
        return self.parts_over_stock is None or low <= self.parts_over_stock <= high

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


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()})"


@torch.no_grad()
def measure_cost_model(model, cache_length: int = 128, max_positions: int = 9,
                       vocabularies: Sequence[int] = (), repeats: int = 9, decode_tokens: int = 16,
                       attempts: int = 3) -> CostModel:
    """Times the parts of lossless decoding on `model` (an AdaInfer model, in eval mode) and returns the
    [`CostModel`].

    The parts are checked against the whole: L layers and the head on one position must come to
    `CONSISTENT_PARTS` of the measured stock step. Otherwise (a busy machine: other processes' threads stall the
    multi-threaded kernels) the measurement is repeated, up to `attempts` times; the last one is kept with a
    warning, and the model records the ratio (`parts_over_stock`, `consistent`).

    Args:
        cache_length (`int`, *optional*, defaults to 128): positions already in the cache (and the prompt length
            of the timed generations).
        max_positions (`int`, *optional*, defaults to 9): time a layer and the head on 1..`max_positions` new
            positions (a draft cap plus one).
        vocabularies (`Sequence[int]`, *optional*): shortlist sizes whose check is timed besides the full one.
        repeats (`int`, *optional*, defaults to 9): alternating rounds per part (medians are reported).
        decode_tokens (`int`, *optional*, defaults to 16): extra tokens of the timed generations.
        attempts (`int`, *optional*, defaults to 3): measurements tried until the parts agree with the whole.
    """
    for name, value, low in (("cache_length", cache_length, 1), ("max_positions", max_positions, 1),
                             ("repeats", repeats, 1), ("decode_tokens", decode_tokens, 1), ("attempts", attempts, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an int >= {low}; got {value!r}.")
    for attempt in range(1, attempts + 1):
        cost = _measure_once(model, cache_length, max_positions, vocabularies, repeats, decode_tokens, attempt)
        if cost.consistent:
            return cost
    warnings.warn(f"the cost model's parts disagree with the whole after {attempts} measurement(s): L layers and "
                  f"the head on one position come to {cost.parts_over_stock:.2f}x the measured stock step "
                  f"(expected {CONSISTENT_PARTS[0]}-{CONSISTENT_PARTS[1]}); is another process busy? Predictions "
                  "from it are unreliable; measure on a quiet machine.", stacklevel=2)
    return cost


def _measure_once(model, cache_length, max_positions, vocabularies, repeats, decode_tokens, attempt) -> CostModel:
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
        layer_fns, crops = _layer_calls(model, spec, layer, device, dtype, H, cache_length, max_positions)
        hidden = torch.randn(max_positions, H, device=head.device, dtype=dtype)
        fns = {f"layer{n}": fn for n, fn in layer_fns.items()}
        # the head as verification runs it: the final norm and the LM head on n positions of one row
        fns.update({f"head{n}": (lambda n=n: head.final_rows(head.norm(hidden[None, :n])))
                    for n in range(1, max_positions + 1)})
        for size in (None, *vocabularies):
            index = None if size is None else head.vocabulary(tuple(range(int(size))))
            fns[f"lens{size or 'full'}"] = lambda index=index: compute_features(
                ("gap", "top_prob"), head.logits(hidden[:1], None, index))[0].to("cpu")
        w = torch.randn(H, device=head.device, dtype=dtype)
        fns["gate"] = lambda: ((hidden[:1] @ w) * torch.rsqrt(hidden[:1].pow(2).mean(-1)) >= 0).to("cpu")
        with head.session():
            parts = alternating_medians(fns, repeats, device, min_seconds=0.004)
        steps = _decode_steps(model, L, cache_length, decode_tokens, max(3, repeats // 3), device)
    finally:
        model.train(was_training)
    layer_s = tuple(max(parts[f"layer{n}"] - statistics.median(crops[n]), 0.0) for n in range(1, max_positions + 1))
    head_s = tuple(parts[f"head{n}"] for n in range(1, max_positions + 1))
    lens = {("full" if size is None else str(int(size))): parts[f"lens{size or 'full'}"]
            for size in (None, *vocabularies)}
    # The parts against the whole: a layer timed alone comes out 7-13% slower than in the model's own loop
    # (SmolLM2: 30 layers and the head add up to 1.07-1.13x the stock step). The layer table is scaled so that the
    # stock step is L layers and the head on one position, which makes the predicted stock step the measured one
    # (the layers absorb the stock step's small remainder: embedding, final norm, generate's own work); the loop's
    # fixed cost is what a lossless step that never exits adds to it beyond its check.
    whole = L * layer_s[0] + head_s[0]
    if steps["stock"] > head_s[0] and layer_s[0] > 0:
        scale = (steps["stock"] - head_s[0]) / (L * layer_s[0])
        layer_s = tuple(x * scale for x in layer_s)
    fixed = steps["lossless"] - steps["stock"] - lens["full"]
    return CostModel(num_layers=L, layer_seconds=layer_s, head_seconds=head_s, lens_seconds=lens,
                     gate_seconds=parts["gate"], loop_fixed_seconds=max(fixed, 0.0),
                     stock_step_seconds=steps["stock"], device=_device_name(device),
                     dtype=str(dtype).removeprefix("torch."), threads=torch.get_num_threads(),
                     cache_length=cache_length, repeats=repeats, attempts=attempt, kernels=_kernel_record(model),
                     parts_over_stock=round(whole / steps["stock"], 4) if steps["stock"] > 0 else None)


def _kernel_record(model) -> dict:
    """The few-rows setting and the forms chosen for `model`'s linear weights, JSON-safe (`CostModel.kernels`)."""
    shapes = {tuple(m.weight.shape) for m in model.modules() if isinstance(m, torch.nn.Linear)}
    chosen = {}
    for (shape, dtype, rows, bias, threads), form in sorted(few_rows.kernel_choices().items(), key=str):
        if shape in shapes:
            name = f"{'x'.join(map(str, shape))} {str(dtype).removeprefix('torch.')} rows{rows}"
            chosen[f"{name}{' bias' if bias else ''} threads{threads}"] = form
    return {"setting": few_rows.KERNEL, "chosen": chosen}


def _layer_calls(model, spec, layer, device, dtype, H, cache_length, max_positions) -> tuple[dict, dict]:
    """`({n: callable}, {n: [seconds]})`: decoder layer 0 on n new positions over a cache of `cache_length`, cropped
    back after; the second dict collects the crops' own durations (bookkeeping of the measurement, not of
    decoding), to subtract."""
    cache = compat.DynamicCache()
    past = torch.randn(1, cache_length, H, device=device, dtype=dtype)
    kwargs = _layer_kwargs(model, spec, past, 0)
    layer(past, attention_mask=None, use_cache=True, **{compat.CACHE_ARG: cache}, **kwargs)
    calls, crops = {}, {}
    for n in range(1, max_positions + 1):
        new = torch.randn(1, n, H, device=device, dtype=dtype)
        kw = _layer_kwargs(model, spec, new, cache_length)
        crops[n] = []

        def call(new=new, kw=kw, n=n):
            # as verification runs it: several positions through the few-rows product on the CPU
            with few_rows.few_rows_linear(layer, enabled=device.type == "cpu" and n > 1):
                layer(new, attention_mask=None, use_cache=True, **{compat.CACHE_ARG: cache}, **kw)
            t0 = time.perf_counter()
            cache.crop(-n)  # back to the cache_length positions
            crops[n].append(time.perf_counter() - t0)

        calls[n] = call
    return calls, crops


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
    t = alternating_medians(fns, repeats, device)
    return {kind: max(t[f"{kind}{long}"] - t[f"{kind}{short}"], 0.0) / decode_tokens for kind in ("stock", "lossless")}

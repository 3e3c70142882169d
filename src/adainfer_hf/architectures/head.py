"""`ExitHead`: the model's exit head (final norm [+ projection] + LM head [+ softcap]), i.e. the logit lens.

One object per AdaInfer model (`model.exit_head`, built in its setup) owns everything the checks and the output
read from the head: the final modules, the LM head (a PEFT LoRA adapter on it included), its copy in a check dtype,
the gathered rows of each check vocabulary and their index tensors, the LM-head fingerprint and the family's
softcap. The copies follow the rule of `architectures.copies` (identity on every use, a sampled content check once
per call; `refresh()` for what a sample cannot see).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch
from torch import nn

from .base import ArchitectureSpec
from .copies import WeightCopies, identity_key, same_bits, sample_positions, weight_call
from .devices import execution_device, materialized_weight
from .few_rows import few_rows_linear
from .registry import spec_for

__all__ = ["ExitHead", "fingerprints_match", "head_of"]

MAX_HEAD_ROWS = 16  # verification's positions (the LM head's product stays ahead of MKL's linear up to here)
_MAX_VOCABULARIES = 4  # check vocabularies whose gathered rows are kept at once (least recently used dropped)


def head_of(model: nn.Module) -> ExitHead:
    """`model.exit_head` of an AdaInfer model; a fresh (uncached) `ExitHead` of any other supported model."""
    head = getattr(model, "exit_head", None)  # (through a PEFT wrapper's attribute forwarding too)
    return head if isinstance(head, ExitHead) else ExitHead(model)


class _Vocabulary:
    """A check vocabulary: its ids (and equal tuples seen), the index tensor, its gathered rows' copies."""

    __slots__ = ("ids", "aliases", "index", "copies")

    def __init__(self, ids: tuple, index: torch.Tensor):
        self.ids, self.aliases, self.index, self.copies = ids, [ids], index, WeightCopies()


class _Lora:
    """The active LoRA terms of a PEFT `lora.Linear` LM head, as its forward applies them: `sign * scaling *
    B[rows] @ A @ x` (+ `B.bias[rows]`) per adapter."""

    def __init__(self, head: nn.Module):
        name = f"{type(head).__module__}.{type(head).__qualname__}"
        if getattr(head, "fan_in_fan_out", False) or type(head.get_base_layer()) is not nn.Linear:
            raise ValueError(f"the exit checks cannot apply an LM head of type {name} over a "
                             f"{type(head.get_base_layer()).__name__} (fan_in_fan_out="
                             f"{getattr(head, 'fan_in_fan_out', False)}); use check_vocabulary=None and "
                             "check_dtype=None, or merge the adapter (merge_and_unload()).")
        if head.disable_adapters:  # PEFT's forward unmerges, then runs the base layer
            adapters, sign = list(head.merged_adapters), -1.0
        elif head.merged:  # the deltas are in the base weight already
            adapters, sign = [], 1.0
        else:
            adapters, sign = [a for a in head.active_adapters if a in head.lora_A.keys()], 1.0
        for a in adapters:
            variant = getattr(head, "lora_variant", {}).get(a)
            if variant is not None:
                raise ValueError(f"the exit checks cannot apply the LoRA variant {type(variant).__name__} "
                                 f"(adapter {a!r}) of an LM head of type {name}; use check_vocabulary=None and "
                                 "check_dtype=None, or merge the adapter (merge_and_unload()).")
        self.terms = [(head.lora_A[a], head.lora_B[a], sign * head.scaling[a]) for a in adapters]

    def __call__(self, normed: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor | None:
        out = None
        for lora_a, lora_b, scaling in self.terms:
            low = lora_a(normed.to(lora_a.weight.dtype))
            b_w, b_b = lora_b.weight, lora_b.bias
            if rows is not None:
                b_w = b_w.index_select(0, rows.to(b_w.device))
                b_b = None if b_b is None else b_b.index_select(0, rows.to(b_b.device))
            term = nn.functional.linear(low, b_w, b_b) * scaling
            out = term if out is None else out + term
        return out


def _is_peft_lora(head: nn.Module) -> bool:
    return type(head).__module__.startswith("peft.tuners.lora") and hasattr(head, "lora_A")


class ExitHead:
    """The exit head of one model: the logit lens of intermediate hidden states, and the output head.

    Args:
        model (`PreTrainedModel`): a causal LM of a supported family (see `architectures.SUPPORTED_MODEL_TYPES`).
        spec (`ArchitectureSpec`, *optional*): its family's spec (default: looked up once, here).

    The copies it keeps (the LM head in a check dtype, the rows of each check vocabulary) are not parameters or
    buffers and are not pickled; they are rebuilt when the head's weight changes (see `architectures.copies`; call
    `refresh()` after an edit the rule does not see).
    """

    def __init__(self, model: nn.Module, spec: ArchitectureSpec | None = None):
        self.model = model
        self.spec = spec if spec is not None else spec_for(model)
        self._copies = WeightCopies()
        self._vocabularies: list[_Vocabulary] = []

    def __getstate__(self):
        return {"model": self.model, "spec": self.spec}

    def __setstate__(self, state):
        self.__init__(state["model"], state["spec"])

    def refresh(self) -> None:
        """Drops every cached copy (the next check rebuilds what it needs)."""
        self._copies.drop()
        self._vocabularies.clear()

    session = staticmethod(weight_call)  # `with head.session():` one call: each copy is verified once inside

    # ------------------------------------------------------------------ what the head is
    @property
    def module(self) -> nn.Module:
        """The LM head module (`get_output_embeddings()`; a PEFT wrapper when one is installed)."""
        return self.model.get_output_embeddings()

    @property
    def weight(self) -> torch.Tensor:
        """The LM head's (base) weight, read from accelerate's offload map when offloaded."""
        module = self.module
        return materialized_weight(module.get_base_layer() if _is_peft_lora(module) else module)

    @property
    def width(self) -> int:
        """Number of logits the LM head produces (its output rows; may exceed `tokenizer.vocab_size`)."""
        return int(self.weight.shape[0])

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the LM head computes in."""
        return self.weight.dtype

    @property
    def device(self) -> torch.device:
        """Where the exit head runs: where the final norm lives (the LM head is next to it)."""
        return self.spec.exit_head_device(self.model)

    # ------------------------------------------------------------------ the lens
    def norm(self, hidden: torch.Tensor) -> torch.Tensor:
        """What the model applies after its last decoder layer, before the LM head (final norm [+ projection]),
        to `hidden` moved to the exit head's device."""
        return self.spec.exit_norm(self.model, hidden.to(self.device))

    def final(self, normed: torch.Tensor) -> torch.Tensor:
        """The stock head on final-normed hidden states: the LM head module, then the family's softcap."""
        return self.spec.finalize_logits(self.model, self.module(normed))

    def final_rows(self, normed: torch.Tensor) -> torch.Tensor:
        """[`final`] on several final-normed positions at once (`normed` [..., hidden_size]), as lossless
        verification runs it: the LM head's module call, in which a plain fp32 CPU `nn.Linear` head (a PEFT
        LoRA's base layer included) computes 2-`MAX_HEAD_ROWS` rows in the faster of MKL's `linear` and
        `few_rows.linear_few_rows` on this CPU (`few_rows.KERNEL`: on one CPU MKL's `linear` on 2-3 rows of a
        49k-262k-row head cost 2-3 times one row and the product 0.4x-0.9x, on another the reverse). The same fp32
        sums in another order (the last bits); hooks run as in any call; one row, another device or dtype, or a
        forward replaced by accelerate's dispatch keep the stock kernel."""
        module = self.module
        with few_rows_linear(module, enabled=normed.device.type == "cpu", max_rows=MAX_HEAD_ROWS):
            return self.final(normed)

    def logits(self, hidden: torch.Tensor, dtype: torch.dtype | None = None,
               vocabulary: torch.Tensor | None = None) -> torch.Tensor:
        """The logit lens of intermediate hidden states `hidden` [..., hidden_size], on the LM head's device.

        Args:
            dtype (`torch.dtype`, *optional*): run the LM head in this dtype (a kept copy of its weight).
            vocabulary (`torch.LongTensor`, *optional*): an index from `vocabulary(ids)`: only those tokens'
                logits are computed ([..., K], in that order), from the kept rows of the head weight.

        A PEFT LoRA adapter on the LM head is applied as its forward applies it (active, disabled or merged);
        another wrapper is refused by name (`ValueError`) when a dtype or a vocabulary needs the head's weight.
        """
        module = self.module
        normed = self.norm(hidden).to(execution_device(module))
        if vocabulary is None and (dtype is None or dtype == self.dtype):
            return self.final(normed)
        if type(module) is nn.Linear:
            base, lora = module, None
        elif _is_peft_lora(module):
            base, lora = module.get_base_layer(), _Lora(module)
        else:
            raise ValueError(f"the exit checks cannot read the weight of an LM head of type "
                             f"{type(module).__module__}.{type(module).__qualname__} (check_dtype={dtype}, "
                             f"check_vocabulary {'set' if vocabulary is not None else 'None'}); expected an "
                             "nn.Linear or a PEFT LoRA Linear. Use check_vocabulary=None and check_dtype=None.")
        weight = materialized_weight(base)
        dtype = dtype or weight.dtype
        if vocabulary is None:
            w, b = self.weight_as(dtype, base)
        else:
            w, b = self.rows(vocabulary, dtype, base)
        logits = nn.functional.linear(normed.to(dtype), w, b)
        if lora is not None:
            extra = lora(normed, vocabulary)
            if extra is not None:
                logits = logits + extra.to(logits.dtype)
        return self.spec.finalize_logits(self.model, logits)

    # ------------------------------------------------------------------ kept copies
    def weight_as(self, dtype: torch.dtype, base: nn.Module | None = None):
        """(weight, bias) of the LM head in `dtype`, converted once and kept until the head changes."""
        base = base if base is not None else self._base()
        weight, bias = materialized_weight(base), getattr(base, "bias", None)

        def build():
            return weight.detach().to(dtype), None if bias is None else bias.detach().to(dtype)

        def matches(copy, column):
            rows, col = sample_positions(copy[0].shape[0], copy[0].shape[1], column, copy[0].device)
            return (same_bits(copy[0][rows, col], weight[rows.to(weight.device), col].to(dtype))
                    and (bias is None or same_bits(copy[1], bias.detach().to(dtype))))

        key = identity_key((weight, bias), (self.module,))
        return self._copies.get(("as", dtype), key, build, matches)

    def rows(self, vocabulary: torch.Tensor, dtype: torch.dtype, base: nn.Module | None = None):
        """(rows, bias rows) of the LM head for `vocabulary` (an index from `vocabulary(ids)`) in `dtype`,
        gathered once and kept until the head changes."""
        base = base if base is not None else self._base()
        weight, bias = materialized_weight(base), getattr(base, "bias", None)
        entry = next((v for v in self._vocabularies if v.index is vocabulary), None)
        copies = entry.copies if entry is not None else WeightCopies()  # (an index of another head: not kept)

        def build():
            index = vocabulary.to(weight.device)
            rows = weight.detach().index_select(0, index).to(dtype).contiguous()
            return rows, None if bias is None else bias.detach().index_select(0, index).to(dtype)

        def matches(copy, column):
            index = vocabulary.to(weight.device)
            rows, col = sample_positions(copy[0].shape[0], copy[0].shape[1], column, copy[0].device)
            return (same_bits(copy[0][rows, col], weight[index[rows.to(index.device)], col].to(dtype))
                    and (bias is None or same_bits(copy[1], bias.detach().index_select(0, index).to(dtype))))

        key = identity_key((weight, bias), (self.module,))
        return copies.get(dtype, key, build, matches)

    def _base(self) -> nn.Module:
        module = self.module
        return module.get_base_layer() if _is_peft_lora(module) else module

    # ------------------------------------------------------------------ check vocabularies
    def vocabulary(self, ids: Sequence[int] | None) -> torch.Tensor | None:
        """`ids` (a check vocabulary: sorted token ids) as a LongTensor on the exit head's device, the same tensor
        for equal ids while kept (so policies with the same shortlist share the gathered rows). None for None.

        `ValueError` when an id falls outside the LM head's `width` outputs."""
        if ids is None:
            return None
        device, width = self.device, self.width
        for i, entry in enumerate(self._vocabularies):
            if any(a is ids for a in entry.aliases) or entry.ids == tuple(ids):
                if not any(a is ids for a in entry.aliases):
                    entry.aliases.append(ids)
                if entry.index.device != device:
                    break  # the model moved: build it again
                if i:
                    self._vocabularies.insert(0, self._vocabularies.pop(i))
                self._check_width(entry.ids, width)
                return entry.index
        ids_tuple = tuple(ids)
        self._check_width(ids_tuple, width)
        self._vocabularies = [v for v in self._vocabularies if v.ids != ids_tuple]
        entry = _Vocabulary(ids_tuple, torch.tensor(ids_tuple, dtype=torch.long, device=device))
        if ids_tuple is not ids:
            entry.aliases.append(ids)
        self._vocabularies.insert(0, entry)
        del self._vocabularies[_MAX_VOCABULARIES:]
        return entry.index

    @staticmethod
    def _check_width(ids: tuple, width: int) -> None:
        top = max(ids)
        if top >= width:
            raise ValueError(f"check_vocabulary holds token id {top}, but the model's LM head has {width} outputs; "
                             f"expected ids in [0, {width}).")

    def over_head(self, logits: torch.Tensor, vocabulary: torch.Tensor) -> torch.Tensor:
        """Logits over a check vocabulary [n, K] as the head's [n, width]: every other token gets -inf."""
        full = logits.new_full((logits.shape[0], self.width), float("-inf"))
        return full.index_copy_(1, vocabulary.to(logits.device), logits)

    # ------------------------------------------------------------------ identity
    def fingerprint(self, n_samples: int = 256) -> dict:
        """A dtype-robust fingerprint of the LM head: its shape and a fixed sample of its weights.

        The sample (every k-th element of the flattened weight, as float32 rounded to 4 decimals) lets
        `fingerprints_match` compare an fp32 and a bf16 load of the same checkpoint with a tolerance, while a
        different head (another model, another fine-tune) fails. `sha256` hashes the sample for display.
        """
        weight = self.weight
        flat = weight.detach().reshape(-1)
        step = max(1, flat.numel() // n_samples)
        idx = torch.arange(0, step * n_samples, step, device=flat.device)[:n_samples].clamp_max(flat.numel() - 1)
        sample = [round(float(v), 4) for v in flat[idx].float().cpu()]
        digest = hashlib.sha256(repr((list(weight.shape), sample)).encode()).hexdigest()[:16]
        return {"shape": list(weight.shape), "sample": sample, "sha256": digest}


def fingerprints_match(a: dict, b: dict, rtol: float = 2e-2, atol: float = 2e-3) -> bool:
    """True when two `ExitHead.fingerprint`s describe the same head, up to half-precision rounding."""
    if list(a.get("shape", [])) != list(b.get("shape", [])):
        return False
    sa = torch.tensor(a.get("sample", []), dtype=torch.float64)
    sb = torch.tensor(b.get("sample", []), dtype=torch.float64)
    return sa.shape == sb.shape and bool(torch.allclose(sa, sb, rtol=rtol, atol=atol))

"""The early-exit behaviour shared by every AdaInfer causal-LM class (one module per family beside this one).

The family classes (`llama.py`, `opt.py`, `qwen2.py`, `qwen3.py`, `mistral.py`, `gemma3.py`) subclass the stock
transformers class and this mixin: they load stock checkpoints unchanged (same `state_dict` keys) and behave
exactly like the stock classes until a row exits. The decoder layers are swapped for subclasses that accept an
`adainfer_run` argument; everything else (embeddings, masks, rotary embeddings, norms, head) is transformers' own.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch
from transformers.modeling_outputs import CausalLMOutputWithPast

from .. import compat
from ..architectures.copies import weight_call
from ..architectures.head import ExitHead
from ..architectures.kv_fill import KVFill
from ..architectures.registry import spec_for
from ..artifact.io import commit_artifact, save_beside_weights
from ..cache.base import check_cache_consistent, strategy_for
from ..cache.exact import CACHE_MODES, ExactExitCache
from ..cache.propagate import PropagateExitCache
from ..policy.base import ExitPolicy
from ..policy.classifier import ExitClassifier
from ..runtime.exit_run import ExitRun, is_decode_step
from ..runtime.lossless import lossless_generate, resolve_lossless, resolve_max_draft_tokens
from ..runtime.output import output_logits
from ..runtime.recording import ExitRecorder, ExitStatistics
from .beside import find_classifier_beside
from .generate_options import never_checks, refuse_generate_options

__all__ = ["AdaInferCausalLMOutput", "AdaInferMixin", "ExitLayerMixin"]

_AUTO = object()  # from_pretrained's "look for an exit classifier beside the checkpoint"


class _CheckedPolicy:
    """A per-call `exit_policy` that `generate` already checked: its steps' forwards skip the check."""

    __slots__ = ("policy",)

    def __init__(self, policy):
        self.policy = policy


class _NoChecks(ExitPolicy):
    """Runs every layer through the exit loop without checking (to catch up the exact cache's owed positions)."""

    check_layers = ()

    def decide(self, features, layer, rows, state=None):
        return torch.zeros(features.shape[0], dtype=torch.bool, device=features.device)


@dataclass
class AdaInferCausalLMOutput(CausalLMOutputWithPast):
    """`CausalLMOutputWithPast` plus the exit layer of each row.

    Args:
        exit_layers (`torch.LongTensor` of shape `(batch_size,)`):
            Decoder layers actually run for each row's last token (1..L; L = no early exit).
    """

    exit_layers: torch.LongTensor | None = None


class ExitLayerMixin:
    """Decoder-layer behaviour: hand the call to the forward's `ExitRun` when one is given."""

    def forward(self, hidden_states, *args, adainfer_run: ExitRun | None = None, **kwargs):
        if adainfer_run is None:
            return super().forward(hidden_states, *args, **kwargs)
        return adainfer_run.layer_forward(self, super().forward, hidden_states, args, kwargs)


class AdaInferMixin:
    """Early-exit behaviour shared by every family's class (architecture specifics live in `architectures`).

    A family class sets `_adainfer_layer_class` (its decoder layer with `ExitLayerMixin`) and calls
    `_adainfer_setup()` at the end of `__init__`.
    """

    _adainfer_layer_class: type = None

    def _adainfer_setup(self) -> None:
        spec = spec_for(self)  # the family, looked up once: the head and the K/V fill hold it
        for layer in spec.decoder_layers(self):
            # Same parameters, same keys: only the class (and so `forward`) changes.
            layer.__class__ = self._adainfer_layer_class
        self._exit_classifier = None
        # Plain objects (not submodules: no state-dict keys); their kept copies are not pickled.
        self.exit_head = ExitHead(self, spec)
        self.kv_fill = KVFill(self, spec)

    # ------------------------------------------------------------------ the classifier
    @property
    def exit_classifier(self) -> ExitPolicy | None:
        """The exit policy (`ExitClassifier`, `ScriptedExit`, ...), or None to never exit."""
        return self._exit_classifier

    @exit_classifier.setter
    def exit_classifier(self, value: ExitPolicy | None) -> None:
        self.set_exit_classifier(value)

    def set_exit_classifier(self, value: ExitPolicy | None, ignore_mismatch: bool = False) -> None:
        """Sets the exit policy after checking it was made for this model.

        Args:
            value (`ExitPolicy` or `None`): the policy; None disables early exit.
            ignore_mismatch (`bool`, *optional*, defaults to `False`): warn instead of raising when the artifact's
                layer count or LM-head fingerprint differ from this model's.
        """
        if value is not None:
            self._adainfer_check_policy(value, "exit_classifier", ignore_mismatch=ignore_mismatch)
            # An unbound classifier is bound to the first model it meets, so `save_pretrained` always writes an
            # artifact that refuses another model (fills only what is unset; a mismatch was refused above).
            value.bind(self)
        self._exit_classifier = value

    def _adainfer_check_policy(self, value, name: str, ignore_mismatch: bool = False) -> None:
        """TypeError unless `value` is an `ExitPolicy`; its `validate_for` (ValueError on a mismatch) otherwise."""
        if not isinstance(value, ExitPolicy):
            raise TypeError(f"{name} must be an ExitClassifier/ExitPolicy or None; got {type(value).__name__} "
                            f"({value!r}).")
        value.validate_for(self, ignore_mismatch=ignore_mismatch)

    def _adainfer_policy(self, exit_policy) -> ExitPolicy | None:
        """The policy of one call: the model's classifier, or a per-call `exit_policy` checked as the setter
        checks (once per policy object: generate's steps reuse the check). In training mode, see `forward`."""
        if exit_policy is _AUTO:
            return None if self.training else self._exit_classifier
        if exit_policy is not None and self.training and getattr(self, "is_activation_checkpointing", False):
            raise ValueError(
                f"exit_policy={exit_policy!r} was passed to a model in training mode with gradient checkpointing "
                "enabled: early exit is an inference feature and checkpointing cannot recompute an exit. Pass no "
                "exit_policy (training computes every layer) or call model.eval() first.")
        if isinstance(exit_policy, _CheckedPolicy):
            return exit_policy.policy  # checked once by `generate` for all its steps
        if exit_policy is None or exit_policy is self._exit_classifier:
            return exit_policy
        self._adainfer_check_policy(exit_policy, "exit_policy")  # (no memo on the model: no per-call state)
        return exit_policy

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values=None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        exit_policy: ExitPolicy | None | object = _AUTO,
        exit_recorder: ExitRecorder | None = None,
        cache=None,
        **kwargs,
    ) -> AdaInferCausalLMOutput:
        """The stock causal-LM forward, with early exit.

        Args are the stock class's (the KV cache as `cache` or `past_key_values`, on every supported transformers
        release), plus:
            exit_policy (`ExitPolicy` or `None`, *optional*): overrides `self.exit_classifier` for this call only
                (None = run full depth).
            exit_recorder (`ExitRecorder`, *optional*): collects this call's exit layers (`generate` passes one).

        `attn_implementation="flex_attention"` with an active exit policy raises `ValueError` before anything runs.
        With `output_attentions=True` every layer's attention weights are full-batch tensors; a row that exited
        before layer l has zeros in `attentions[l - 1][row]` (it did not run that layer).

        Returns:
            `AdaInferCausalLMOutput`: the stock output plus `exit_layers` (with `return_dict=False` its
            `to_tuple()`, `exit_layers` last; with no policy the stock tuple).

        A per-call `exit_policy` is checked as `set_exit_classifier` checks (TypeError for a non-policy,
        ValueError when it was made for another model).

        Early exit is an inference feature; training computes every layer: `model.train()` ignores `exit_classifier`
        (stock forward and gradients); an explicit `exit_policy` there with gradient checkpointing is a ValueError.
        """
        past_key_values = compat.pop_cache_arg(kwargs, past_key_values=past_key_values, cache=cache)
        ref = input_ids if input_ids is not None else inputs_embeds
        policy = self._adainfer_step_policy(self._adainfer_policy(exit_policy), past_key_values, ref.shape[1])
        common = dict(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                      inputs_embeds=inputs_embeds, use_cache=use_cache, **{compat.CACHE_ARG: past_key_values})
        if policy is None:
            out = super().forward(labels=labels, logits_to_keep=logits_to_keep, **common, **kwargs)
            full = torch.full((ref.shape[0],), self.exit_head.spec.num_layers(self), dtype=torch.long)
            self._adainfer_record(full, exit_recorder)
            if not isinstance(out, dict):
                return out  # return_dict=False: the stock tuple
            return AdaInferCausalLMOutput(**out, exit_layers=full)
        return_dict = kwargs.pop("return_dict", None)
        if return_dict is None:
            return_dict = getattr(self.config, "return_dict", True)  # (`use_return_dict` is deprecated on 5.x)
        if self.config._attn_implementation == "flex_attention":
            # Layer calls on row subsets would need the block mask sliced to the running rows.
            raise ValueError("attn_implementation='flex_attention' is not supported with an exit policy; load the "
                             "model with attn_implementation='sdpa' or 'eager', or pass exit_policy=None.")
        if use_cache is None:
            use_cache = self.config.use_cache
        if use_cache and past_key_values is None:
            past_key_values = PropagateExitCache(config=self.config)
        common.update(use_cache=use_cache, **{compat.CACHE_ARG: past_key_values})
        with weight_call():  # one call: each kept weight copy is verified at most once (`architectures.copies`)
            run = ExitRun(self, policy, batch_size=ref.shape[0], query_length=ref.shape[1],
                          attention_mask=attention_mask, past_key_values=past_key_values, position_ids=position_ids)
            try:
                outputs = self.exit_head.spec.base_decoder(self)(**common, adainfer_run=run, **kwargs)
            finally:
                run.close()
            run.cache_strategy.finish_step(run)
            self._adainfer_record(run.exit_layers, exit_recorder)
            result = self._adainfer_output(outputs, run, labels, logits_to_keep, kwargs)
        return result if return_dict else result.to_tuple()

    def _adainfer_step_policy(self, policy, cache, query_length: int):
        """The policy this step runs with: None (the stock path) when its schedule for this phase is empty,
        `_NoChecks` while an exact cache owes positions (the loop catches them up even without checks)."""
        owed = strategy_for(cache).owes_positions
        if policy is not None and not owed:
            past = cache.get_seq_length(0) if cache is not None else 0
            if not policy.layers_to_check(self.exit_head.spec.num_layers(self), decode=is_decode_step(query_length, past)):
                policy = None
        return _NoChecks() if policy is None and owed else policy

    def _adainfer_output(self, outputs, run: ExitRun, labels, logits_to_keep, kwargs) -> AdaInferCausalLMOutput:
        """The output of a forward through the exit loop: logits (reusing the checks'), loss, the guarded cache."""
        # A check vocabulary gives -inf outside it: the loss reads the full head over the exit states instead (the
        # stock model cut at each row's exit layer, from the same head call), so every label the stock class takes
        # has a loss.
        logits = scored = output_logits(self, outputs.last_hidden_state, logits_to_keep, run,
                                        unchecked_too=labels is not None and run.vocabulary is not None)
        if isinstance(logits, tuple):
            logits, scored = logits
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=scored, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        out_cache = compat.output_cache(outputs)
        if out_cache is not None:
            check_cache_consistent(out_cache, run)
        return AdaInferCausalLMOutput(
            loss=loss, logits=logits, hidden_states=outputs.hidden_states,
            attentions=run.full_batch_attentions(outputs.attentions),
            exit_layers=run.exit_layers, **{compat.OUTPUT_CACHE_FIELD: out_cache},
        )

    def _adainfer_record(self, exit_layers: torch.Tensor, recorder: ExitRecorder | None) -> None:
        self.exit_stats.update(exit_layers)
        if recorder is not None:
            recorder.append(exit_layers)

    # ------------------------------------------------------------------ generation
    def generate(self, *args, exit_cache: str | None = None, lossless: bool | None = None,
                 max_draft_tokens: int | None = None, **kwargs):
        """`GenerationMixin.generate` with early exit at every step, the prompt's step included.

        Args:
            exit_cache (`str`, *optional*): how layers a token skipped get its K/V (default `"propagate"`;
                `"exact"` with `lossless`).
                `"propagate"`: computed from the exit hidden state (CALM's state propagation; costs the K/V
                projections only, and only for layers a later token runs, see `PropagateExitCache`; later tokens
                see an approximation of the skipped layers). `"exact"`: the skipped
                layers run for that token later, batched with the next token that goes deeper, so the cache
                equals the dense model's (costs the skipped compute when, and only when, a later token needs it;
                the batch runs to its deepest row each step).
            lossless (`bool`, *optional*): exits become drafts the deeper layers verify: the output is the stock
                model's (`runtime.lossless`). Default: the policy's `drafting`, unless `exit_cache` is given.
            max_draft_tokens (`int`, *optional*): with `lossless`, drafts in a row before a step runs every layer
                (and verifies them). Default: the cap a drafting artifact chose (`calibration["drafting"]`), else 8.
            kwargs: everything `generate` takes, plus `exit_policy` to override the classifier for this call.

        With `return_dict_in_generate=True` the output carries `exit_layers` [batch (x beams), new tokens]: the
        layers run for each generated token (beam rows in the order of each step, not re-sorted by beam).
        With `lossless` it also carries `draft_tokens` and `accepted_tokens` per row (zeros: nothing drafted).

        With no policy (no classifier, or `exit_policy=None`) this is the stock `generate` for every option
        (the output only gains `exit_layers`, all full depth). With a policy, assisted decoding
        (`assistant_model`, `prompt_lookup_num_tokens`) and a `cache_implementation` other than `"dynamic"` are
        refused with a `ValueError` naming the option. A policy whose prefill and decode schedules are both empty
        (as `adainfer train` leaves a classifier when no check pays) never checks: the call is then the stock
        `generate` too, with the stock cache (unless a passed cache still owes positions), after the same
        refusals.
        """
        if exit_cache is not None and exit_cache not in CACHE_MODES:
            raise ValueError(f"exit_cache must be one of {CACHE_MODES}; got {exit_cache!r}.")
        policy = self._adainfer_policy(kwargs.get("exit_policy", _AUTO))
        lossless = resolve_lossless(policy, lossless, exit_cache, max_draft_tokens)
        exit_cache = exit_cache or ("exact" if lossless else "propagate")
        cache = compat.pop_cache_arg(kwargs)  # either name, on every supported release
        if policy is not None:
            refuse_generate_options(self, policy, cache, exit_cache, kwargs)
            if never_checks(self, policy, cache):
                # Decided once for the whole call: no step can check, so every step is the stock forward with the
                # stock cache `generate` makes (an exit cache, a recorder and per-step policy resolution would
                # only cost time). The output is the same: every token runs every layer.
                kwargs["exit_policy"] = policy = None
        if policy is None:
            # No policy: the stock generate, every option included (the forward runs the stock path).
            if cache is not None:
                kwargs[compat.CACHE_ARG] = cache
            out = super().generate(*args, **kwargs)
            if not isinstance(out, torch.Tensor):
                out["exit_layers"] = self._adainfer_full_depth(out, args, kwargs)
                if lossless:  # a lossless call whose policy never checks: the same fields, nothing drafted
                    out["draft_tokens"] = torch.zeros(out["sequences"].shape[0], dtype=torch.long)
                    out["accepted_tokens"] = torch.zeros_like(out["draft_tokens"])
            return out
        kwargs.pop("cache_implementation", None)
        if lossless:  # exits as drafts the deeper layers verify (refuses, by name, what it cannot run)
            with weight_call():
                cap = resolve_max_draft_tokens(policy, max_draft_tokens)
                return lossless_generate(self, super().generate, _CheckedPolicy(policy), cache, cap, args, kwargs)
        use_cache = kwargs.get("use_cache")
        if use_cache is None:
            use_cache = (kwargs.get("generation_config") or self.generation_config).use_cache
        if cache is None and use_cache:  # use_cache=False: no cache, whichever option (as stock generate)
            # propagate: skipped layers' K/V are computed when a later token needs them (same values as at exit)
            cache = ExactExitCache(config=self.config) if exit_cache == "exact" else PropagateExitCache(
                config=self.config)
        if cache is not None:
            kwargs[compat.CACHE_ARG] = cache
        if "exit_policy" in kwargs:
            kwargs["exit_policy"] = _CheckedPolicy(policy)  # checked above, once for every step
        recorder = ExitRecorder()
        with weight_call():  # the whole generate is one call for the kept weight copies
            out = super().generate(*args, exit_recorder=recorder, **kwargs)
        if not isinstance(out, torch.Tensor):
            out["exit_layers"] = recorder.stacked()
        return out

    def _adainfer_full_depth(self, out, args, kwargs) -> torch.Tensor:
        """`exit_layers` of a generate output without a policy: every generated token ran every layer."""
        sequences = out["sequences"]
        prompt = args[0] if args else kwargs.get("input_ids", kwargs.get("inputs"))
        prompt_len = prompt.shape[1] if isinstance(prompt, torch.Tensor) and prompt.dim() == 2 else 0
        steps = max(sequences.shape[1] - prompt_len, 0)
        return torch.full((sequences.shape[0], steps), self.exit_head.spec.num_layers(self), dtype=torch.long)

    @property
    def exit_stats(self) -> ExitStatistics:
        """Running totals of exit layers over every forward since creation or the last `exit_stats.reset()`."""
        stats = self.__dict__.get("_exit_stats")
        if stats is None:
            stats = ExitStatistics(self.exit_head.spec.num_layers(self))
            self.__dict__["_exit_stats"] = stats
        return stats

    # ------------------------------------------------------------------ loading and saving
    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, exit_classifier=_AUTO,
                        trust_remote_classifier: bool = False, ignore_classifier_mismatch: bool = False,
                        **kwargs):
        """Loads a stock checkpoint (local dir or Hub id) and, optionally, an exit classifier.

        Args:
            exit_classifier (`str`, `os.PathLike`, `ExitPolicy` or `None`, *optional*): a directory or Hub id of an
                `ExitClassifier`, an instance, or None (never exit). By default the artifact saved beside the
                checkpoint (by `save_pretrained`) is picked up when present.
            trust_remote_classifier (`bool`, *optional*, defaults to `False`): allow unpickling a joblib artifact
                that was not named as `exit_classifier`: one in a Hub repo, or one found beside the checkpoint
                (a local model directory may be a download). Safe-format artifacts never need it.
            ignore_classifier_mismatch (`bool`, *optional*, defaults to `False`): warn instead of raising when the
                artifact was made for another model (layer count or LM-head fingerprint).
            kwargs: everything `PreTrainedModel.from_pretrained` takes (`dtype`, `device_map`, `revision`, ...).
        """
        model = super().from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)
        hub_kwargs = {k: kwargs[k] for k in ("revision", "cache_dir", "token", "local_files_only") if k in kwargs}
        if exit_classifier is _AUTO:
            exit_classifier = find_classifier_beside(
                pretrained_model_name_or_path, trust_remote_classifier=trust_remote_classifier, **hub_kwargs)
        elif isinstance(exit_classifier, (str, os.PathLike)):
            hub_kwargs.pop("revision", None)
            exit_classifier = ExitClassifier.from_pretrained(
                exit_classifier, trust_remote_classifier=trust_remote_classifier, **hub_kwargs)
        model.set_exit_classifier(exit_classifier, ignore_mismatch=ignore_classifier_mismatch)
        return model

    def save_pretrained(self, save_directory, *args, **kwargs):
        """`PreTrainedModel.save_pretrained`, plus the exit classifier's files beside the weights.

        The classifier's files are encoded before the weights are written (a classifier that cannot be saved fails
        with nothing written) and written after them as one unit (see `ExitClassifier.save_pretrained`). If
        writing them fails, this raises after the weights are saved, naming the directory and saying whether it
        still holds its previous (complete) artifact or none; it never holds a mix. `push_to_hub` saves through
        this method, so the artifact is uploaded with the weights.
        """
        clf = self._exit_classifier
        save = getattr(clf, "save_pretrained", None)  # a policy of another kind may save itself, or not at all
        if isinstance(clf, ExitClassifier):
            save = functools.partial(commit_artifact, clf._artifact_files())
        result = super().save_pretrained(save_directory, *args, **kwargs)
        if save is not None:
            save_beside_weights(save, save_directory)
        return result

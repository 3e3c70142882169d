"""What `AdaInferMixin.generate` decides before it generates: the options it refuses with an exit policy, and
whether a policy can check at all (an empty schedule makes the call the stock `generate`)."""

from __future__ import annotations

from ..cache.base import strategy_for
from ..cache.exact import CACHE_MODES
from ..policy.base import ExitPolicy

__all__ = ["never_checks", "refuse_generate_options"]


def refuse_generate_options(model, policy: ExitPolicy, cache, exit_cache: str, kwargs) -> None:
    """ValueError naming a `generate` option that cannot run with an exit policy (refused whatever its
    schedule, so a classifier's errors do not depend on what calibration left in it)."""
    gen_config = kwargs.get("generation_config") or model.generation_config
    for option in ("assistant_model", "prompt_lookup_num_tokens", "assistant_early_exit"):
        value = kwargs.get(option, getattr(gen_config, option, None))
        if value is not None:
            shown = f"<{type(value).__name__}>" if option == "assistant_model" else repr(value)  # (not a model repr)
            raise ValueError(f"generate({option}={shown}) "
                             "(assisted decoding with another drafter) cannot combine with early exits: the exits "
                             "are the drafter. Pass lossless=True for exits verified by the deeper layers, or "
                             "exit_policy=None for the stock assisted decoding.")
    impl = kwargs.get("cache_implementation", getattr(gen_config, "cache_implementation", None))
    if impl not in (None, "dynamic"):
        raise ValueError(f"generate(cache_implementation={impl!r}) is not supported with an exit policy; the "
                         f"exit loop uses its own dynamic cache (exit_cache={CACHE_MODES}). Pass "
                         "exit_policy=None for the stock behaviour.")
    if exit_cache == "exact" and cache is not None and strategy_for(cache).name != "exact":
        raise ValueError("exit_cache='exact' needs no cache argument or an ExactExitCache; "
                         f"got {type(cache).__name__}.")


def never_checks(model, policy: ExitPolicy, cache) -> bool:
    """Whether no step of a `generate` call with `policy` can check: its prefill and decode schedules are both
    empty (as `adainfer train` leaves them when no check pays for itself) and `cache` owes no positions."""
    num_layers = model.exit_head.spec.num_layers(model)
    return (not policy.layers_to_check(num_layers) and not policy.layers_to_check(num_layers, decode=True)
            and not strategy_for(cache).owes_positions)

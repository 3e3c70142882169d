"""The lossless part of `adainfer demo`: the stock text and the lossless text (a drafting artifact's exits, verified
by the deeper layers) side by side, compared token for token, with the time ratio and the acceptance."""

from __future__ import annotations

import statistics
import time

import torch

from ..data.text_prompts import default_drafting_prompts
from ..models.default_model import shipped_drafting_dir
from ..policy.classifier import ExitClassifier
from ..training.config import DraftingConfig, GenerationCalibrationConfig, TrainingConfig
from ..training.train import train_and_calibrate

__all__ = ["DEMO_PROMPTS", "drafting_classifier", "lossless_demo"]

DEMO_PROMPTS = ("Q: What is the boiling point of water at sea level?\nA:",
                "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n")


def drafting_classifier(model, tok, source, is_default: bool, seed: int, quiet: bool):
    """`(classifier, where it came from)`: the artifact at `source`, the shipped drafting artifact of the default
    model, or one trained now on the shipped drafting prompts (small settings: a demo, not a shipped artifact)."""
    source = source or (shipped_drafting_dir() if is_default else None)
    if source is not None:
        return ExitClassifier.from_pretrained(source), str(source)
    config = TrainingConfig(method="logistic", seed=seed, generation=GenerationCalibrationConfig(generation_tokens=16),
                            drafting=DraftingConfig(max_draft_tokens=(1, 2, 4), cost_repeats=3, cost_cache_length=32))
    prompts = default_drafting_prompts()[::3]  # a third of the shipped set, every kind: a demo's minute, not an artifact
    clf, _, _ = train_and_calibrate(model, tok, prompts, config, progress=not quiet)
    return clf, f"trained now on {len(prompts)} of the shipped drafting prompts (no drafting artifact for this model)"


def _first_difference(a: list[int], b: list[int]) -> int | None:
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


@torch.no_grad()
def lossless_demo(model, tok, clf, where: str, new_tokens: int, repeats: int) -> bool:
    """Prints, per demo prompt, the stock and the lossless greedy text, whether they are identical (else the first
    differing token), the median time ratio over `repeats` alternating runs, and the drafts' acceptance. Returns
    whether every text was identical."""
    record = (clf.calibration or {}).get("drafting", {})
    print(f"\nlossless generate (drafting classifier: {where})")
    if record:
        rule, held = record["rule"], record["holdout"]
        print(f"rule: check layers {clf.decode_check_layers or 'none'}, shortlist {rule['vocabulary_size'] or 'full'}, "
              f"draft cap {record['max_draft_tokens']}; predicted on held-out prompts: {held['predicted_speed']:.2f}x "
              f"stock, acceptance {held['acceptance']:.2f}. {record['why']}")
    same_everywhere = True
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    for text in DEMO_PROMPTS:
        enc = tok([text], return_tensors="pt")
        args = dict(**enc, max_new_tokens=new_tokens, do_sample=False, pad_token_id=pad)
        runs = {"stock": dict(args, exit_policy=None),
                "lossless": dict(args, exit_policy=clf, return_dict_in_generate=True)}
        times = {"stock": [], "lossless": []}
        outs = {}
        for r in range(repeats):  # alternating, the order swapped every round
            for name in (("stock", "lossless") if r % 2 == 0 else ("lossless", "stock")):
                t0 = time.perf_counter()
                outs[name] = model.generate(**runs[name])
                times[name].append(time.perf_counter() - t0)
        n = enc["input_ids"].shape[1]
        ours = outs["lossless"]
        a, b = outs["stock"][0, n:].tolist(), ours.sequences[0, n:].tolist()
        diff = _first_difference(a, b)
        same_everywhere &= diff is None
        print(f"\nprompt: {text!r}")
        print(f"  stock:    {tok.decode(a)!r}")
        print(f"  lossless: {tok.decode(b)!r}")
        verdict = "identical" if diff is None else (f"DIFFERENT from token {diff}: stock {tok.decode(a[diff:diff + 1])!r}"
                                                    f", lossless {tok.decode(b[diff:diff + 1])!r}")
        drafted = int(ours["draft_tokens"].sum()) if "draft_tokens" in ours else 0
        accepted = int(ours["accepted_tokens"].sum()) if "accepted_tokens" in ours else 0
        ratio = statistics.median(times["stock"]) / statistics.median(times["lossless"])
        acceptance = f"{accepted}/{drafted} drafts accepted" if drafted else "no drafts (the stock path)"
        print(f"  {verdict} ({len(b)} tokens); speed {ratio:.2f}x stock (median of {repeats} alternating runs); "
              f"{acceptance}")
    return same_everywhere

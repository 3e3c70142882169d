"""Where the time of a decode step goes, stock and with early exit: the per-step view behind decode_gain.py.

1. Stock `generate` (64 greedy tokens, batch 1): the share of the time spent in the decoder layers, in the final
   norm + LM head, and in the rest (embedding, sampling, cache bookkeeping), timed with forward hooks; the head in
   decoder layers of the same run.
2. Early exit with a saved classifier: every decode step timed (a stopping criterion stamps each step), grouped by
   what the step did: exited (`exit`), ran every layer (`full`), or ran every layer and caught up layers an
   earlier token skipped (`full+catch-up`, exact cache). The median of each group against the stock median says
   what an exit saves and what catching up costs.

    python -m benchmarks.cost.decode_steps KEY --classifier DIR [--cache exact] [--repeats 3]

Medians over `--repeats` alternating runs on the first held-out prompt of decode_gain.py. Prints two lines and
writes docs/results/<key>/decode_steps/<date>[-variant].json (stamped; the classifier by its config).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import AutoTokenizer, StoppingCriteria, StoppingCriteriaList

from adainfer_hf import AutoAdaInferForCausalLM, ExitClassifier
from adainfer_hf.architectures import core as arch
from benchmarks.common.prompts import held_out_texts
from benchmarks.common.real_models import model_dir
from benchmarks.common.results import add_result_arguments, classifier_configs, save_result, settings_of


class _Stamps(StoppingCriteria):
    """Records the time of every call (once per generated token); never stops."""

    def __init__(self):
        self.times = []

    def __call__(self, input_ids, scores, **kwargs):
        self.times.append(time.perf_counter())
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def _hooks(model, acc):
    """Forward hooks adding the time of the decoder stack and of final norm + head to `acc`."""
    layers, marks = arch.spec_of(model).decoder_layers(model), {}
    norm = arch.spec_for(model).final_modules(model)[0]
    layers[0].register_forward_pre_hook(lambda m, a: marks.__setitem__("layers", time.perf_counter()))
    layers[-1].register_forward_hook(lambda m, a, o: acc.__setitem__(
        "layers", acc["layers"] + time.perf_counter() - marks["layers"]))
    norm.register_forward_pre_hook(lambda m, a: marks.__setitem__("head", time.perf_counter()))
    model.get_output_embeddings().register_forward_hook(lambda m, a, o: acc.__setitem__(
        "head", acc["head"] + time.perf_counter() - marks["head"]))


def _groups(step_times, layers, L):
    """Decode step durations grouped by what the step did (its token's exit layer, the previous token's)."""
    out = {}
    for j, seconds in enumerate(step_times):
        mine, previous = layers[j + 1], layers[j]
        kind = "exit" if mine < L else "full+catch-up" if previous < L else "full"
        out.setdefault(kind, []).append(seconds)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("key", help="a key of benchmarks/common/real_models.py")
    p.add_argument("--classifier", required=True, metavar="DIR")
    p.add_argument("--cache", default="exact", choices=("exact", "propagate"))
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    add_result_arguments(p)
    args = p.parse_args(argv)
    torch.set_num_threads(2)
    path = model_dir(args.key)
    tok = AutoTokenizer.from_pretrained(path)
    ada = AutoAdaInferForCausalLM.from_pretrained(path, exit_classifier=None).eval()
    clf = ExitClassifier.from_pretrained(args.classifier).bind(ada)
    L = ada.config.num_hidden_layers
    acc = {"layers": 0.0, "head": 0.0}
    _hooks(ada, acc)
    enc = tok([held_out_texts(tok, 1, 1, 0)[0][0]], return_tensors="pt")
    gen = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False,
               pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id,
               return_dict_in_generate=True)
    stock, split, exits = [], [], []
    with torch.no_grad():
        ada.generate(**enc, **{**gen, "max_new_tokens": 4, "min_new_tokens": 4}, exit_policy=None)
        for _ in range(args.repeats):
            acc.update(layers=0.0, head=0.0)
            stamps, t0 = _Stamps(), time.perf_counter()
            ada.generate(**enc, **gen, exit_policy=None, stopping_criteria=StoppingCriteriaList([stamps]))
            total = time.perf_counter() - t0
            split.append((total, acc["layers"], acc["head"]))
            stock += [b - a for a, b in zip(stamps.times, stamps.times[1:], strict=False)]
            stamps = _Stamps()
            out = ada.generate(**enc, **gen, exit_policy=clf, exit_cache=args.cache,
                               stopping_criteria=StoppingCriteriaList([stamps]))
            steps = [b - a for a, b in zip(stamps.times, stamps.times[1:], strict=False)]
            exits.append((steps, out.exit_layers.reshape(-1).tolist()))
    total, lay, head = (statistics.median(r[i] for r in split) for i in range(3))
    print(f"{args.key} stock: {total / args.new_tokens * 1e3:.1f} ms per token; layers {lay / total:.1%} "
          f"({lay / args.new_tokens / L * 1e3:.2f} ms a layer), final norm + head {head / total:.1%} (= "
          f"{head / (lay / L):.1f} layers), rest {1 - (lay + head) / total:.1%}")
    groups = {}
    for steps, layers in exits:
        for kind, ts in _groups(steps, layers, L).items():
            groups.setdefault(kind, []).extend(ts)
    base = statistics.median(stock)
    mean_layers = statistics.mean(x for _, layers in exits for x in layers[1:])
    print(f"{args.key} {args.cache}: decode step median stock {base * 1e3:.2f} ms; " + "; ".join(
        f"{kind} {len(ts) // args.repeats} of {args.new_tokens - 1}: {statistics.median(ts) * 1e3:.2f} ms "
        f"({statistics.median(ts) / base:.2f}x)" for kind, ts in sorted(groups.items()))
        + f"; {mean_layers:.2f} of {L} layers per decode token")
    payload = {"benchmark": "decode_steps", "num_layers": L, "new_tokens": args.new_tokens, "cache": args.cache,
               "repeats": args.repeats, "args": settings_of(args),
               "stock": {"seconds_per_token": total / args.new_tokens, "layers_share": lay / total,
                         "head_share": head / total, "rest_share": 1 - (lay + head) / total,
                         "head_in_layers": head / (lay / L), "step_median_s": base},
               "steps": {kind: {"count_per_run": len(ts) // args.repeats, "median_s": statistics.median(ts),
                                "vs_stock": statistics.median(ts) / base} for kind, ts in sorted(groups.items())},
               "mean_layers_per_decode_token": mean_layers}
    save_result(args, args.key, "decode_steps", payload, argv,
                classifiers=classifier_configs([args.classifier], [clf]))


if __name__ == "__main__":
    main()

"""Early exit inside `generate` on the real SmolLM2-135M-Instruct: agreement with dense greedy decoding, layers
per token and wall-clock, for each KV-cache option, with scripted exits and with a trained classifier.

    python -m benchmarks.quality.generation_smollm2 --new-tokens 64 --prompts 20 --exit-layers 24 28

Dense and each early-exit configuration run on the same prompt batches in one process, alternating batch by
batch; seconds are summed over batches and the ratio is dense / early exit (> 1 = faster).
Writes docs/results/smollm2/generation_sweep/<date>.json (stamped) and prints a markdown table.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from transformers import AutoTokenizer, LlamaForCausalLM

from adainfer_hf import AdaInferLlamaForCausalLM, ExitClassifier, ScriptedExit
from adainfer_hf.models.default_model import default_model_dir
from benchmarks.common.results import add_result_arguments, classifier_configs, save_result, settings_of

PROMPTS = [
    "Explain why the sky is blue.", "Write a short poem about the sea.", "What is photosynthesis?",
    "Give three tips for learning a new language.", "Describe a cat to someone who has never seen one.",
    "What causes the seasons on Earth?", "Write a haiku about autumn leaves.", "How does a bicycle stay upright?",
    "Summarize the story of Little Red Riding Hood.", "What is the difference between weather and climate?",
    "List some healthy breakfast ideas.", "Why do we need sleep?", "Explain what a computer program is.",
    "Write a friendly email inviting a colleague to lunch.", "What are the planets of the solar system?",
    "How do bees make honey?", "Describe your ideal weekend.", "What is the water cycle?",
    "Give advice to a student starting university.", "Explain how a rainbow forms.",
    "What makes a good friend?", "How does the internet work, in simple terms?",
]


def agreement(ref: torch.Tensor, got: torch.Tensor) -> tuple[float, float]:
    """Position-wise token agreement and mean length of the common prefix (in tokens)."""
    same = ref == got
    prefix = torch.where(same.all(1), same.shape[1], (~same).float().argmax(1)).float()
    return float(same.float().mean()), float(prefix.mean())


@torch.no_grad()
def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="Llama checkpoint dir (default: the embedded SmolLM2)")
    p.add_argument("--exit-classifier", default=None, help="classifier dir (default: the one shipped for SmolLM2)")
    p.add_argument("--prompts", type=int, default=20)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--exit-layers", type=int, nargs="*", default=[24, 28], help="scripted exits to measure")
    add_result_arguments(p)
    args = p.parse_args(argv)
    path = args.model or default_model_dir()
    tok = AutoTokenizer.from_pretrained(path, padding_side="left")
    dense = LlamaForCausalLM.from_pretrained(path).eval()
    ada = AdaInferLlamaForCausalLM.from_pretrained(path, exit_classifier=None).eval()
    L = dense.config.num_hidden_layers
    policies = {f"exit@{k}": ScriptedExit(k) for k in args.exit_layers}
    clf_dir = args.exit_classifier
    if clf_dir is None:
        from adainfer_hf.models.default_model import shipped_classifier_dir

        clf_dir = shipped_classifier_dir()
    if clf_dir is not None:
        clf = ExitClassifier.from_pretrained(clf_dir)
        clf.validate_for(ada)
        policies["classifier"] = clf
    texts = [tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
             for q in PROMPTS[: args.prompts]]
    batches = [texts[i: i + args.batch_size] for i in range(0, len(texts), args.batch_size)]
    gen = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False,
               pad_token_id=tok.pad_token_id)
    configs = [(name, mode) for name in policies for mode in ("propagate", "exact")]
    seconds = {c: 0.0 for c in configs}
    dense_seconds = {c: 0.0 for c in configs}
    outs = {c: [] for c in configs}
    layers = {c: [] for c in configs}
    refs = []
    warm = tok(texts[:1], return_tensors="pt")
    dense.generate(**warm, **gen)  # warm-up: first calls pay one-time costs
    for name, mode in configs:
        ada.generate(**warm, **gen, exit_policy=policies[name], exit_cache=mode)
    for texts_b in batches:
        enc = tok(texts_b, return_tensors="pt", padding=True)
        n = enc.input_ids.shape[1]
        t0 = time.perf_counter()
        ref = dense.generate(**enc, **gen)[:, n:]
        t_dense = time.perf_counter() - t0
        refs.append(ref)
        for name, mode in configs:
            t0 = time.perf_counter()
            out = ada.generate(**enc, **gen, exit_policy=policies[name], exit_cache=mode,
                               return_dict_in_generate=True)
            seconds[(name, mode)] += time.perf_counter() - t0
            t0 = time.perf_counter()  # dense again, right after, so drift hits both alike
            dense.generate(**enc, **gen)
            dense_seconds[(name, mode)] += time.perf_counter() - t0 + t_dense
            outs[(name, mode)].append(out.sequences[:, n:])
            layers[(name, mode)].append(out.exit_layers.float())
    ref_all = torch.cat(refs)
    rows = []
    print(f"SmolLM2-135M-Instruct, L={L}, {len(texts)} prompts, {args.new_tokens} new tokens, greedy, "
          f"batch {args.batch_size}, threads={torch.get_num_threads()}")
    print("| exits | KV cache | token agreement | common prefix (tokens) | mean layers / token | dense s | "
          "early-exit s | speedup |")
    print("|---|---|---|---|---|---|---|---|")
    for c in configs:
        agree, prefix = agreement(ref_all, torch.cat(outs[c]))
        mean_layers = float(torch.cat(layers[c]).mean())
        d = dense_seconds[c] / 2  # dense ran twice per batch for this config
        row = {"exits": c[0], "cache": c[1], "agreement": agree, "prefix": prefix, "mean_layers": mean_layers,
               "dense_seconds": d, "seconds": seconds[c], "speedup": d / seconds[c]}
        rows.append(row)
        print(f"| {c[0]} | {c[1]} | {agree:.3f} | {prefix:.1f} | {mean_layers:.2f} / {L} | {d:.1f} | "
              f"{seconds[c]:.1f} | {d / seconds[c]:.2f}x |")
    payload = {"benchmark": "generation_smollm2", "num_layers": L, "prompts": len(texts),
               "new_tokens": args.new_tokens, "batch_size": args.batch_size, "threads": torch.get_num_threads(),
               "args": settings_of(args), "rows": rows}
    configs = classifier_configs([str(clf_dir)], [policies["classifier"]]) if "classifier" in policies else None
    save_result(args, Path(args.model).name if args.model else "smollm2", "generation_sweep", payload, argv,
                classifiers=configs)
    return rows


if __name__ == "__main__":
    main()

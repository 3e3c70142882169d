"""Never slower than stock: the real SmolLM2-135M-Instruct with a calibrated classifier on real prompts.

    python -m benchmarks.speed.real_overhead --exit-classifier DIR --task-file ../shared/data/function_vectors/abstractive/antonym.json

Stock `LlamaForCausalLM` and `AdaInferLlamaForCausalLM` (same weights) run the same 5-shot prompts, alternating call
by call: a scoring forward of each prompt batch (first-token prediction, the paper's setting) and a 16-token greedy
generation. Prints median seconds and the ratio early-exit / stock (< 1.02 is the target) with the mean layers run,
and writes docs/results/smollm2/overhead/<date>[-variant].json (stamped; the classifier by its config).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from transformers import AutoTokenizer, LlamaForCausalLM

from adainfer_hf import AdaInferLlamaForCausalLM, ExitClassifier
from adainfer_hf.data.prompts import build_prompts, load_task
from adainfer_hf.models.default_model import default_model_dir
from benchmarks.common.results import add_result_arguments, classifier_configs, save_result, settings_of


@torch.no_grad()
def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="Llama checkpoint dir (default: the embedded SmolLM2)")
    p.add_argument("--exit-classifier", default=None, help="classifier dir (default: the one shipped)")
    p.add_argument("--task-file", action="append", required=True)
    p.add_argument("--shots", type=int, default=5)
    p.add_argument("--limit", type=int, default=16, help="prompts per task")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--new-tokens", type=int, default=16)
    add_result_arguments(p)
    args = p.parse_args(argv)
    path = args.model or default_model_dir()
    tok = AutoTokenizer.from_pretrained(path, padding_side="left")
    stock = LlamaForCausalLM.from_pretrained(path).eval()
    clf_dir = args.exit_classifier
    if clf_dir is None:
        from adainfer_hf.models.default_model import shipped_classifier_dir

        clf_dir = shipped_classifier_dir()
    ada = AdaInferLlamaForCausalLM.from_pretrained(path, exit_classifier=ExitClassifier.from_pretrained(clf_dir))
    ada.eval()
    prompts = [pr.text for f in args.task_file for pr in build_prompts(load_task(f), args.shots, args.limit, seed=0)]
    batches = [tok(prompts[i:i + args.batch_size], return_tensors="pt", padding=True)
               for i in range(0, len(prompts), args.batch_size)]
    gen = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False,
               pad_token_id=tok.pad_token_id)
    jobs = {
        "score": (lambda m, b: m(**b, use_cache=False, logits_to_keep=1)),
        "generate": (lambda m, b: m.generate(**b, **gen)),
    }
    schedule = ada.exit_classifier.layers_to_check(ada.config.num_hidden_layers)
    print(f"classifier {clf_dir}: checks after layers {schedule or 'none (calibrated to never exit)'}")
    jobs_out = {}
    for name, job in jobs.items():
        times = {"stock": [], "adainfer": []}
        job(stock, batches[0])
        job(ada, batches[0])
        ada.exit_stats.reset()
        for _ in range(args.repeats):
            for label, model in (("stock", stock), ("adainfer", ada)):
                t0 = time.perf_counter()
                for b in batches:
                    job(model, b)
                times[label].append(time.perf_counter() - t0)
        s, a = statistics.median(times["stock"]), statistics.median(times["adainfer"])
        print(f"{name:9} stock {s:.3f}s  adainfer {a:.3f}s  ratio {a / s:.3f}  "
              f"mean layers {ada.exit_stats.mean_layers:.2f}/{ada.config.num_hidden_layers}")
        jobs_out[name] = {"stock_s": s, "adainfer_s": a, "ratio": a / s, "mean_layers": ada.exit_stats.mean_layers,
                          "seconds": times}
    payload = {"benchmark": "real_overhead", "num_layers": ada.config.num_hidden_layers, "prompts": len(prompts),
               "schedule": list(schedule), "args": settings_of(args), "jobs": jobs_out}
    save_result(args, Path(args.model).name if args.model else "smollm2", "overhead", payload, argv,
                classifiers=classifier_configs([str(clf_dir)], [ada.exit_classifier]))


if __name__ == "__main__":
    main()

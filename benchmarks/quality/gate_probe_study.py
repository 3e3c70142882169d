"""How well a linear gate on the hidden state predicts "the logit lens already agrees with the final layer".

Stock model only (no AdaInfer class needed): 5-shot prompts (`Q: {x}\\nA: {y}\\n\\n`) from training tasks and from
other, held-out tasks; for every layer l < L the last token's hidden state and whether the lens top-1 at l equals
the final top-1. A `LinearGate` is fitted on the training tasks at recall 0.99 and evaluated on the held-out ones:
per layer, the fraction of rows it passes (the rows whose check computes the full LM head) and the recall of rows
that agree. The expected number of full-head evaluations per token is what a gated check costs beyond the gates.

    python -m benchmarks.quality.gate_probe_study --model qwen2.5-0.5b --limit 40

Writes docs/results/<model>/gate_probe/<date>.json (stamped).
"""

from __future__ import annotations

import argparse
import json
import random
import time

import numpy as np
import torch

from adainfer_hf.policy.gate import fit_linear_gate
from benchmarks.common.prompts import FV
from benchmarks.common.real_models import load
from benchmarks.common.results import add_result_arguments, save_result

TRAIN_TASKS = ("present-past", "singular-plural", "english-french", "landmark-country", "person-sport")
TEST_TASKS = ("sentiment", "antonym", "country-capital", "capitalize", "ag_news")


def _task(name: str) -> list[dict]:
    for sub in ("abstractive", "extractive"):
        path = FV / sub / f"{name}.json"
        if path.is_file():
            return json.loads(path.read_text())
    raise FileNotFoundError(f"no function-vectors task {name!r} under {FV}")


def prompts(tasks, limit: int, shots: int, seed: int) -> list[str]:
    """`limit` k-shot prompts per task, demonstrations drawn from the task's other examples."""
    rng = random.Random(seed)
    out = []
    for name in tasks:
        data = _task(name)
        for i in rng.sample(range(len(data)), min(limit, len(data))):
            demos = rng.sample([j for j in range(len(data)) if j != i], shots)
            text = "".join(f"Q: {data[j]['input']}\nA: {data[j]['output']}\n\n" for j in demos)
            out.append(text + f"Q: {data[i]['input']}\nA:")
    return out


@torch.no_grad()
def rows(model, tokenizer, texts, batch_size: int = 4):
    """(hidden [n*(L-1), H] float16, layer [n*(L-1)], agrees [n*(L-1)]) for the last token of each prompt."""
    base = model.model
    head = model.get_output_embeddings()
    softcap = getattr(model.config, "final_logit_softcapping", None)
    hs, layers, labels = [], [], []
    for start in range(0, len(texts), batch_size):
        enc = tokenizer(texts[start:start + batch_size], return_tensors="pt", padding=True)
        out = model(**enc, output_hidden_states=True)
        final = out.logits[:, -1].argmax(-1)
        L = len(out.hidden_states) - 1
        for layer in range(1, L):
            h = out.hidden_states[layer][:, -1]
            logits = head(base.norm(h))
            if softcap:
                logits = torch.tanh(logits / softcap) * softcap
            hs.append(h.half().numpy())
            layers.append(np.full(h.shape[0], layer))
            labels.append((logits.argmax(-1) == final).numpy())
    return np.concatenate(hs), np.concatenate(layers), np.concatenate(labels)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="qwen2.5-0.5b", help="benchmarks/common/real_models.py key.")
    p.add_argument("--limit", type=int, default=40, help="Prompts per task.")
    p.add_argument("--shots", type=int, default=5, help="Demonstrations per prompt.")
    p.add_argument("--recall", type=float, default=0.99, help="Gate recall on the training tasks.")
    p.add_argument("--seed", type=int, default=0, help="Sampling seed.")
    add_result_arguments(p)
    args = p.parse_args(argv)
    torch.set_num_threads(2)
    model, tok = load(args.model)
    t0 = time.perf_counter()
    train = rows(model, tok, prompts(TRAIN_TASKS, args.limit, args.shots, args.seed))
    test = rows(model, tok, prompts(TEST_TASKS, args.limit, args.shots, args.seed + 1))
    gate = fit_linear_gate(*train, recall=args.recall)
    passed = gate.passes_table(test[0], test[1])
    L = int(test[1].max()) + 1
    per_layer = []
    for k in range(1, L):
        at = test[1] == k
        pos = test[2][at]
        per_layer.append({"layer": k, "agree": float(pos.mean()), "pass_rate": float(passed[at].mean()),
                          "recall": float(passed[at][pos].mean()) if pos.any() else None})
    n_prompts = int((test[1] == 1).sum())
    result = {"model": args.model, "num_layers": L, "train_rows": int(train[1].size), "test_prompts": n_prompts,
              "recall_target": args.recall, "per_layer": per_layer,
              "head_evaluations_per_token_ungated": L - 1,
              "head_evaluations_per_token_gated": float(passed.sum() / n_prompts),
              "overall_recall": float(passed[test[2]].mean()), "seconds": time.perf_counter() - t0}
    print(f"{args.model}: {L} layers, test prompts {n_prompts} (held-out tasks {', '.join(TEST_TASKS)})")
    print("layer  agree  pass  recall")
    for r in per_layer:
        rec = "  -  " if r["recall"] is None else f"{r['recall']:.3f}"
        print(f"{r['layer']:5d}  {r['agree']:.3f}  {r['pass_rate']:.3f}  {rec}")
    print(f"full-head evaluations per token if every layer is checked: {L - 1} ungated, "
          f"{result['head_evaluations_per_token_gated']:.2f} gated; recall of agreeing rows "
          f"{result['overall_recall']:.3f}")
    save_result(args, args.model, "gate_probe", result, argv)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

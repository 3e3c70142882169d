"""Lossless early exit in `generate` on a real checkpoint, beside the stock model and its peers (issue 27, item 5).

Question: does `generate(lossless=True)` give the stock model's text faster than stock `generate`, and how does it
compare with the drafting methods transformers ships for an ordinary checkpoint?

Setup (all runs in one process, on the same inputs, greedy, exactly `--new-tokens` tokens):

* prompts: `--prompts` held-out prompts of mixed kinds (prose, code, Q&A), taken round-robin by kind from
  `benchmarks/data/heldout_prompts.jsonl`; the run refuses to start when one of them is also a prompt of the
  package's drafting prompt set (`adainfer_hf/data/drafting_prompts.jsonl`; the check is skipped with a note when
  that file does not exist);
* batch 1 and batch 4 (`--batches`; left padded); `--repeats` repeats, the order of the runs rotated by one per
  (repeat, group), so no run always follows the same one; the ratio of a run is the stock time of the same group
  and repeat divided by its time; medians with quartiles over every (repeat, group);
* runs: `stock` (the stock class, `AutoModelForCausalLM`); `lossless:<rule>` (the AdaInfer class, same weight
  tensors, `generate(lossless=True)`) for each `--classifier DIR` and for the drafting rules built here
  (`--rules`: `AlwaysExit` at one check layer with a shortlist, as `LAYER:SHORTLIST:CAP`; LAYER < 0 counts from
  the last layer; swept on `--sweep-prompts` prompts, the best one on the full set); `lossy:0.95` (`--lossy DIR`,
  an artifact calibrated at 0.95, `lossless=False`, for reference; skipped with a note when not given); the peers,
  on the stock model and at batch 1 only (transformers' assisted decoding takes one row):
  `assistant_early_exit=k` (`--early-exit`, swept on the sweep prompts, the best k on the full set) and
  prompt-lookup decoding (`--lookup`, `prompt_lookup_num_tokens`).

Reported per run: identical rows and tokens against stock (for every row that differs, the first differing
position and the stock logits' top-1/top-2 margin there: only a floating-point near-tie may differ), the
wall-clock ratio against stock (median, quartiles, ratio of summed times), and for lossless runs the drafts,
acceptance rate, mean drafts per verification and layers computed per generated token (every fed position runs
all L layers, a draft's deep layers in the next verification, so this is L x fed positions / tokens).

Usage: `python -m benchmarks.speed.lossless KEY [--prompts 16] [--new-tokens 64] [--repeats 3] [--batches 1 4]
[--threads 1] [--rules -2:8192:4,...] [--classifier [NAME=]DIR] [--lossy DIR] [--early-exit 4,8,...] [--lookup 3,10]
[--peer-prompts N]`.
`KEY` is a key of `benchmarks.common.real_models` (`source /work/models/env.sh` first on the shared machine) or, with
`--model-dir DIR`, any name for the checkpoint in DIR. Writes `docs/results/<KEY>/lossless/<date>.json` with the
stamping writer (`--out-root` to write elsewhere, `--variant NAME` beside the day's file) and prints a Markdown
table.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import adainfer_hf
from adainfer_hf import AlwaysExit, AutoAdaInferForCausalLM, ExitClassifier, GapThresholdRule
from adainfer_hf.utils.results import write_result
from benchmarks.common.results import add_result_arguments
from benchmarks.common.timing import quartiles

HELD_OUT = Path(__file__).resolve().parents[1] / "data" / "heldout_prompts.jsonl"
DRAFTING_PROMPTS = Path(adainfer_hf.__file__).resolve().parent / "data" / "drafting_prompts.jsonl"
DEFAULT_RULES = "-2:8192:4,-3:8192:6,-4:8192:4"
QUESTION = "lossless"


# ---------------------------------------------------------------------------------------------------- inputs
def read_prompts(path: Path) -> list[dict]:
    """The JSONL prompts of `path` (`{"text": ..., "kind": ...}` per line); plain lines count as prose."""
    rows = []
    for i, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines()):
        if not line.strip():
            continue
        row = json.loads(line) if line.lstrip().startswith("{") else {"text": line}
        if not isinstance(row.get("text"), str) or not row["text"].strip():
            raise ValueError(f"{path}:{i + 1} has no non-empty 'text': {line[:80]!r}")
        rows.append({"kind": row.get("kind", "prose"), "text": row["text"]})
    return rows


def mixed(prompts: list[dict], n: int) -> list[dict]:
    """`n` prompts taken round-robin by kind (so any prefix mixes the kinds)."""
    if n > len(prompts):
        raise ValueError(f"--prompts {n} asks for more prompts than the file has ({len(prompts)}).")
    kinds: dict[str, list[dict]] = {}
    for p in prompts:
        kinds.setdefault(p["kind"], []).append(p)
    out, queues = [], list(kinds.values())
    while len(out) < n:
        for q in queues:
            if q and len(out) < n:
                out.append(q.pop(0))
    return out


def check_held_out(prompts: list[dict], drafting: Path = DRAFTING_PROMPTS) -> str:
    """A note on the held-out check; `ValueError` when a prompt is also a drafting (training) prompt."""
    if not Path(drafting).is_file():
        return f"not checked: the package has no drafting prompt set ({Path(drafting).name} absent)"
    seen = {p["text"].strip() for p in read_prompts(drafting)}
    clash = [p["text"] for p in prompts if p["text"].strip() in seen]
    if clash:
        raise ValueError(f"{len(clash)} held-out prompt(s) are drafting prompts the classifier may be trained on: "
                         f"{[c[:60] for c in clash]}")
    return f"checked: no prompt is in the drafting prompt set ({len(seen)} prompts)"


def parse_rules(text: str, num_layers: int) -> list[tuple[int, int, int, float | None]]:
    """`LAYER:SHORTLIST:CAP[:GAP],...` -> `[(layer, shortlist, cap, gap)]`; LAYER < 0 counts from L, SHORTLIST 0 =
    the whole vocabulary, GAP (optional) the top-1 minus top-2 probability above which the check drafts."""
    rules = []
    for item in filter(None, (s.strip() for s in text.split(","))):
        parts = item.split(":")
        try:
            if len(parts) not in (3, 4):
                raise ValueError
            layer, size, cap = (int(v) for v in parts[:3])
            gap = float(parts[3]) if len(parts) == 4 else None
        except ValueError:
            raise ValueError(f"--rules item {item!r} is not LAYER:SHORTLIST:CAP[:GAP] (three integers and an "
                             "optional number).") from None
        layer = num_layers + layer if layer < 0 else layer
        if not 1 <= layer < num_layers or size < 0 or cap < 1 or (gap is not None and not 0 <= gap < 1):
            raise ValueError(f"--rules item {item!r}: expected 1 <= layer < {num_layers} (or -{num_layers - 1} "
                             f"<= layer <= -1), shortlist >= 0, cap >= 1 and 0 <= gap < 1.")
        rules.append((layer, size, cap, gap))
    return rules


def drafting_rule(model, layer: int, shortlist: int, gap: float | None = None) -> ExitClassifier:
    """A check at `layer` only (prefill and decode) that drafts always (`AlwaysExit`) or where the top-1 minus
    top-2 probability exceeds `gap` (`GapThresholdRule`), scoring the `shortlist` lowest token ids (0: all): the
    lowest ids of a BPE or SentencePiece vocabulary are its earliest, most frequent merges; no data is needed, so
    the rule can never have seen the held-out prompts."""
    width = model.get_output_embeddings().weight.shape[0]
    vocabulary = None if shortlist in (0, None) or shortlist >= width else list(range(shortlist))
    rule = AlwaysExit() if gap is None else GapThresholdRule(feature_index=0, threshold=gap)
    clf = ExitClassifier(rule.fit(np.zeros((1, 2))), check_layers=[layer], decode_check_layers=[layer],
                         min_layer=layer, check_vocabulary=vocabulary)
    return clf.bind(model)


# ---------------------------------------------------------------------------------------------------- models
def load_pair(path, dtype=torch.float32):
    """`(stock, ada, tokenizer)`: the stock class from `path` and the AdaInfer class over the same weight tensors
    (built on the meta device, its parameters and buffers assigned from the stock model: one copy in memory)."""
    stock = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
    cls = AutoAdaInferForCausalLM.class_for(stock.config)
    with torch.device("meta"):
        ada = cls._from_config(stock.config, attn_implementation=stock.config._attn_implementation)
    ada.load_state_dict(stock.state_dict(), assign=True, strict=True)
    for name, buf in stock.named_buffers():
        owner, _, leaf = name.rpartition(".")
        ada.get_submodule(owner)._buffers[leaf] = buf
    left = [n for n, t in [*ada.named_parameters(), *ada.named_buffers()] if t.is_meta]
    if left:
        raise RuntimeError(f"the AdaInfer copy still has meta tensors: {left[:5]}")
    ada.generation_config = stock.generation_config
    tok = AutoTokenizer.from_pretrained(path, padding_side="left")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return stock, ada.eval(), tok


def num_layers(model) -> int:
    return model.exit_head.spec.num_layers(model)


# ---------------------------------------------------------------------------------------------------- runs
@dataclasses.dataclass
class Run:
    """One way to generate: `call(enc, gen) -> (sequences, info)`; `info` has per-row draft counts or None."""

    name: str
    kind: str  # "stock", "lossless", "lossy" or "peer"
    call: object
    batch_one_only: bool = False
    setting: dict = dataclasses.field(default_factory=dict)


def make_runs(stock, ada, rules, classifiers, lossy, early_exit, lookup) -> list[Run]:
    def stock_call(enc, gen, **extra):
        return stock.generate(**enc, **gen, **extra), None

    def lossless_call(clf, cap):
        def call(enc, gen):
            cap_arg = {} if cap is None else {"max_draft_tokens": cap}  # None: generate's (the artifact's) own
            out = ada.generate(**enc, **gen, exit_policy=clf, lossless=True, return_dict_in_generate=True,
                               **cap_arg)
            return out.sequences, {"draft": out.draft_tokens.tolist(), "accepted": out.accepted_tokens.tolist()}
        return call

    def lossy_call(clf):
        def call(enc, gen):
            out = ada.generate(**enc, **gen, exit_policy=clf, lossless=False, return_dict_in_generate=True)
            return out.sequences, {"layers": out.exit_layers.float().mean().item()}
        return call

    runs = [Run("stock", "stock", stock_call)]
    for name, (clf, cap, setting) in {**rules, **classifiers}.items():
        runs.append(Run(f"lossless:{name}", "lossless", lossless_call(clf, cap), setting=setting))
    if lossy is not None:
        runs.append(Run("lossy:0.95", "lossy", lossy_call(lossy[0]), setting=lossy[1]))
    for k in early_exit:
        runs.append(Run(f"early_exit:{k}", "peer", lambda e, g, k=k: stock_call(e, g, assistant_early_exit=k),
                        batch_one_only=True, setting={"assistant_early_exit": k}))
    for n in lookup:
        runs.append(Run(f"lookup:{n}", "peer", lambda e, g, n=n: stock_call(e, g, prompt_lookup_num_tokens=n),
                        batch_one_only=True, setting={"prompt_lookup_num_tokens": n}))
    return runs


def timed(runs: list[Run], tok, texts: list[str], batch: int, new_tokens: int, repeats: int) -> dict:
    """`{run: {"seconds": [repeats][groups], "sequences": [...], "info": [...]}}` (sequences and info from the first
    repeat, new tokens only, one list per row)."""
    runs = [r for r in runs if batch == 1 or not r.batch_one_only]
    gen = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
    groups = [texts[i:i + batch] for i in range(0, len(texts) - batch + 1, batch)]
    out = {r.name: {"seconds": np.zeros((repeats, len(groups))), "sequences": [], "info": []} for r in runs}
    with torch.no_grad():
        warm = tok(groups[0], return_tensors="pt", padding=True)
        for r in runs:
            r.call(warm, {**gen, "max_new_tokens": 4, "min_new_tokens": 4})
        for rep in range(repeats):
            for g, group in enumerate(groups):
                enc = tok(group, return_tensors="pt", padding=True)
                n = enc.input_ids.shape[1]
                shift = (rep * len(groups) + g) % len(runs)
                for r in runs[shift:] + runs[:shift]:
                    t0 = time.perf_counter()
                    seq, info = r.call(enc, gen)
                    out[r.name]["seconds"][rep, g] = time.perf_counter() - t0
                    if rep == 0:
                        out[r.name]["sequences"] += seq[:, n:].tolist()
                        out[r.name]["info"].append(info)
    return out


def stock_margins(stock, tok, texts, batch, new_tokens, rows_positions) -> dict:
    """`{(row, position): top-1 minus top-2 logit}` of the stock model at the asked positions (its batched run)."""
    gen = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
    margins = {}
    with torch.no_grad():
        for g in sorted({row // batch for row, _ in rows_positions}):
            enc = tok(texts[g * batch:(g + 1) * batch], return_tensors="pt", padding=True)
            out = stock.generate(**enc, **gen, return_dict_in_generate=True, output_logits=True)
            for row, pos in rows_positions:
                if row // batch == g:
                    top2 = out.logits[pos][row - g * batch].float().topk(2).values
                    margins[(row, pos)] = float(top2[0] - top2[1])
    return margins


def summarize(out: dict, runs: list[Run], L: int, new_tokens: int) -> dict:
    """Per run: ratio statistics against stock, identity with the stock tokens, drafting figures."""
    ref = out["stock"]
    rows = {}
    for r in runs:
        if r.name not in out:
            continue
        res = out[r.name]
        ratios = (ref["seconds"] / res["seconds"]).reshape(-1)
        same = [np.array(a) == np.array(b) for a, b in zip(ref["sequences"], res["sequences"], strict=True)]
        mismatches = [{"row": i, "position": int(np.argmin(s))} for i, s in enumerate(same) if not s.all()]
        row = {"kind": r.kind, "setting": r.setting, "ratio": quartiles(ratios),
               "ratio_sum": float(ref["seconds"].sum() / res["seconds"].sum()),
               "seconds_median": float(np.median(res["seconds"])),
               "rows": len(same), "rows_identical": int(sum(s.all() for s in same)),
               "tokens_identical": int(sum(s.cumprod().sum() for s in same)),
               "tokens": int(sum(len(s) for s in same)), "mismatches": mismatches}
        if r.kind == "lossless":
            drafted = sum(sum(i["draft"]) for i in res["info"])
            accepted = sum(sum(i["accepted"]) for i in res["info"])
            decode = len(same) * (new_tokens - 1)  # tokens after the prefill's
            verifications = decode - accepted  # each verification emits its accepted drafts plus one token
            row.update(draft_tokens=drafted, accepted_tokens=accepted,
                       acceptance=accepted / drafted if drafted else None,
                       drafts_per_verification=drafted / verifications if verifications else None,
                       layers_per_token=L * (drafted + verifications) / decode if decode else None)
        elif r.kind == "lossy":
            row["layers_per_token"] = float(np.mean([i["layers"] for i in res["info"]]))
        elif r.kind == "stock":
            row["layers_per_token"] = float(L)
        rows[r.name] = row
    return rows


def add_margins(rows: dict, stock, tok, texts, batch, new_tokens) -> None:
    asked = sorted({(m["row"], m["position"]) for row in rows.values() for m in row["mismatches"]
                    if row["kind"] == "lossless"})
    if not asked:
        return
    margins = stock_margins(stock, tok, texts, batch, new_tokens, asked)
    for row in rows.values():
        if row["kind"] == "lossless":
            for m in row["mismatches"]:
                m["stock_top2_margin"] = margins[(m["row"], m["position"])]


def best(rows: dict, kind: str, prefix: str) -> str | None:
    """The run of `kind` named `prefix...` with the highest median ratio (lossless: among those identical)."""
    names = [n for n, r in rows.items() if r["kind"] == kind and n.startswith(prefix)
             and (kind != "lossless" or r["rows_identical"] == r["rows"])]
    names = names or [n for n, r in rows.items() if r["kind"] == kind and n.startswith(prefix)]
    return max(names, key=lambda n: rows[n]["ratio"]["median"]) if names else None


# ---------------------------------------------------------------------------------------------------- main
def table(results: dict) -> str:
    lines = ["| batch | run | ratio median [q1, q3] | sum ratio | identical rows | identical tokens | acceptance | "
             "drafts/verify | layers/token |", "|---|---|---|---|---|---|---|---|---|"]
    for batch, rows in results.items():
        for name, r in rows.items():
            if r["kind"] == "stock":
                continue
            q = r["ratio"]
            fmt = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
            lines.append(f"| {batch} | {name} | {q['median']:.3f} [{q['q1']:.3f}, {q['q3']:.3f}] | "
                         f"{r['ratio_sum']:.3f} | {r['rows_identical']}/{r['rows']} | "
                         f"{r['tokens_identical']}/{r['tokens']} | {fmt(r.get('acceptance'))} | "
                         f"{fmt(r.get('drafts_per_verification'))} | {fmt(r.get('layers_per_token'))} |")
    return "\n".join(lines)


def load_classifier(path, model) -> tuple[ExitClassifier, dict]:
    clf = ExitClassifier.from_pretrained(path).bind(model)
    config = dataclasses.asdict(clf.config)
    config.pop("check_vocabulary", None)  # long; its size is kept
    config["check_vocabulary_size"] = None if clf.check_vocabulary is None else len(clf.check_vocabulary)
    return clf, config


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m benchmarks.speed.lossless", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("key", help="a benchmarks.common.real_models key, or a name for --model-dir")
    p.add_argument("--model-dir", default=None, help="load this checkpoint instead of real_models.model_dir(KEY)")
    p.add_argument("--prompts-file", default=str(HELD_OUT))
    p.add_argument("--drafting-prompts", default=str(DRAFTING_PROMPTS),
                   help="the training prompt set the held-out prompts must not overlap")
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 4])
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1: the machine is shared)")
    p.add_argument("--rules", default=DEFAULT_RULES, help="drafting rules LAYER:SHORTLIST:CAP,... ('' for none)")
    p.add_argument("--classifier", action="append", default=[],
                   help="a drafting artifact, DIR or NAME=DIR (repeatable; the run is named lossless:NAME)")
    p.add_argument("--max-draft-tokens", type=int, default=None,
                   help="the draft cap of --classifier runs (default: none passed, so the artifact's own)")
    p.add_argument("--lossy", default=None, help="an artifact calibrated at 0.95, run with lossless=False")
    p.add_argument("--early-exit", default="", help="assistant_early_exit values to sweep, e.g. 6,12 (L/4, L/2)")
    p.add_argument("--lookup", default="3,10", help="prompt_lookup_num_tokens values")
    p.add_argument("--sweep-prompts", type=int, default=4, help="prompts of the rule and early-exit sweeps")
    p.add_argument("--sweep-repeats", type=int, default=1)
    p.add_argument("--peer-prompts", type=int, default=None,
                   help="run the peers on the first N prompts only (default: all), against stock on those prompts")
    add_result_arguments(p)
    return p.parse_args(argv)


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    prompts = mixed(read_prompts(Path(args.prompts_file)), args.prompts)
    held_out_note = check_held_out(prompts, Path(args.drafting_prompts))
    if args.model_dir is None:
        from benchmarks.common.real_models import model_dir
        path = model_dir(args.key)
    else:
        path = args.model_dir
    stock, ada, tok = load_pair(path)
    L = num_layers(ada)
    texts = [p["text"] for p in prompts]
    rules = {f"{layer}/{L}:{size or 'all'}:{cap}" + ("" if gap is None else f":{gap}"): (
        drafting_rule(ada, layer, size, gap), cap,
        {"rule": "AlwaysExit" if gap is None else "GapThresholdRule", "layer": layer, "shortlist": size,
         "max_draft_tokens": cap, "gap": gap}) for layer, size, cap, gap in parse_rules(args.rules, L)}
    classifiers, configs = {}, {}
    for i, spec in enumerate(args.classifier):
        name, sep, d = spec.partition("=")
        name, d = (name, d) if sep else (f"classifier{i}", spec)
        if not name or not d:
            raise SystemExit(f"--classifier expects DIR or NAME=DIR; got {spec!r}.")
        clf, config = load_classifier(d, ada)
        decode = config.get("decode_check_layers")  # None: the prefill schedule; None there: every layer
        empty = (config.get("check_layers") if decode is None else decode) == []
        classifiers[name] = (clf, args.max_draft_tokens, {"classifier": i, "max_draft_tokens": args.max_draft_tokens,
                                                          "drafting": config.get("drafting"),
                                                          "empty_schedule": empty})
        configs[d] = config
    lossy = None
    notes = {"held_out": held_out_note, "contention": f"torch threads {args.threads}; runs alternate with rotated "
             f"order; load average (1 min) at the start {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs"}
    if args.lossy:
        clf, config = load_classifier(args.lossy, ada)
        lossy, configs[args.lossy] = (clf, config), config
    else:
        notes["lossy"] = "skipped: no artifact calibrated at 0.95 given (--lossy DIR)"
    early_exit, lookup = _ints(args.early_exit), _ints(args.lookup)

    # the sweeps (batch 1, the first prompts): the best rule and the best early-exit layer go to the full set
    sweep = {}
    sweep_texts = texts[:args.sweep_prompts]
    if len(rules) > 1 or len(early_exit) > 1:  # a choice to make
        runs = make_runs(stock, ada, rules, {}, None, early_exit, [])
        out = timed(runs, tok, sweep_texts, 1, args.new_tokens, args.sweep_repeats)
        sweep = summarize(out, runs, L, args.new_tokens)
        print(f"sweep ({len(sweep_texts)} prompts, {args.sweep_repeats} repeat(s)):\n{table({1: sweep})}",
              flush=True)
        keep = best(sweep, "lossless", "lossless:")
        rules = {k: v for k, v in rules.items() if f"lossless:{k}" == keep} if keep else rules
        keep_k = best(sweep, "peer", "early_exit:")
        early_exit = [int(keep_k.split(":")[1])] if keep_k else early_exit
    results = {}
    peer_prompts = len(texts) if args.peer_prompts is None else min(args.peer_prompts, len(texts))
    if peer_prompts < len(texts):
        notes["peers"] = (f"the peers ran on the first {peer_prompts} prompts (batch 1), each timed against stock "
                          "on those prompts in their own alternating runs")
    for batch in args.batches:
        split = batch == 1 and peer_prompts < len(texts)
        runs = make_runs(stock, ada, rules, classifiers, lossy, [] if split else early_exit, [] if split else lookup)
        out = timed(runs, tok, texts, batch, args.new_tokens, args.repeats)
        rows = summarize(out, runs, L, args.new_tokens)
        add_margins(rows, stock, tok, texts, batch, args.new_tokens)
        if split and (early_exit or lookup):
            peers = make_runs(stock, ada, {}, {}, None, early_exit, lookup)
            peer_rows = summarize(timed(peers, tok, texts[:peer_prompts], 1, args.new_tokens, args.repeats), peers, L,
                                  args.new_tokens)
            rows.update({name: {**row, "prompts": peer_prompts} for name, row in peer_rows.items()
                         if row["kind"] == "peer"})
        results[batch] = rows
        print(f"batch {batch}:\n{table({batch: rows})}", flush=True)
        payload = {"model": args.key, "num_layers": L, "dtype": "float32", "new_tokens": args.new_tokens,
                   "prompts": len(texts), "prompt_kinds": [p["kind"] for p in prompts], "repeats": args.repeats,
                   "sweep": {"prompts": len(sweep_texts), "repeats": args.sweep_repeats, "rows": sweep},
                   "batches": {str(b): rows for b, rows in results.items()}, "notes": notes,
                   "complete": len(results) == len(args.batches)}
        if not args.no_write:  # after every batch: a run cut short keeps what it measured
            written = write_result(args.key, QUESTION, payload, [sys.argv[0], *argv], classifiers=configs,
                                   root=args.out_root, variant=args.variant)
            print(f"wrote {written}", flush=True)
    lossless_rows = [r for rows in results.values() for r in rows.values() if r["kind"] == "lossless"]
    return 0 if all(r["rows_identical"] == r["rows"] or all(
        abs(m.get("stock_top2_margin", 0.0)) < 1e-3 for m in r["mismatches"]) for r in lossless_rows) else 1


if __name__ == "__main__":
    sys.exit(main())

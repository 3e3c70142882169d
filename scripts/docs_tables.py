"""Writes the tables the documentation takes from the result files (never by hand): the README's status table,
the paper-protocol tables of docs/results.md (from `benchmarks.paper.paper_table`) and the index of every result
file (docs/results/README.md). A generated table sits between `<!-- results:NAME -->` and
`<!-- /results:NAME -->`.

    python scripts/docs_tables.py          # rewrite both
    python scripts/docs_tables.py --check  # exit 1 if either is not what the result files say

Per real model: lossless decode speed against stock `generate` (the newest docs/results/<key>/lossless/*.json;
the README's `lossless` block puts the peers of the same run beside it: `lossless_table`),
the layers certified exits save on tasks at 0.99 and 0.95 (the newest docs/results/<key>/eval/<date>/results.json
and <date>-0.95/results.json, the `adainfer eval` runs), and the oracle ceiling (the share of layers left after the
first layer whose logit lens equals the dense first token, from the same eval runs).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from adainfer_hf.utils.results import newest_result, read_result, result_files

ROOT = Path(__file__).resolve().parent.parent
KEYS = ("smollm2", "qwen2.5-0.5b", "gemma3-270m", "qwen2.5-1.5b")
NAMES = {"smollm2": "SmolLM2-135M-Instruct", "qwen2.5-0.5b": "Qwen2.5-Coder-0.5B-Instruct",
         "gemma3-270m": "Gemma-3-270M", "qwen2.5-1.5b": "Qwen2.5-Coder-1.5B-Instruct"}


def _saved(summary: dict | None) -> str:
    if summary is None or "adainfer" not in summary:
        return "-"
    row = summary["adainfer"]
    return f"{100 * row['pruning_ratio']:.0f}% (acc {100 * row['accuracy']:.1f} vs {100 * summary['dense']['accuracy']:.1f})"


def _newest(root: Path, model: str, question: str, *, required: bool = False, **kwargs) -> tuple | None:
    """`(file name, stamp, payload)` of the newest result of `model` / `question` under `root/docs/results`
    (`utils.results.newest_result` with `kwargs`, e.g. `variant=None` for any variant; the payload as
    `read_result` gives it, stamped or migrated alike). None when there is none, or a ValueError when `required`
    (a table that cannot be without its file)."""
    results = root / "docs" / "results"
    path = newest_result(model, question, results, **kwargs)
    if path is None:
        if required:
            raise ValueError(f"no result file for {model}/{question} ({kwargs or 'no variant'}) under docs/results")
        return None
    return (path.relative_to(results).as_posix(), *read_result(path))


def _ratio(row: dict | None) -> str:
    """`median [q1, q3]` of a lossless result run's per-(repeat, prompt group) speed ratios against stock."""
    if not row:
        return "-"
    q = row["ratio"]
    return f"{q['median']:.2f}x [{q['q1']:.2f}, {q['q3']:.2f}]"


def _best(rows: dict, prefix: str) -> tuple[str | None, dict | None]:
    """The run named `prefix...` with the highest median ratio; for lossless runs only those whose every row is the
    stock text count, unless none is."""
    names = [n for n in rows if n.startswith(prefix)]
    if prefix == "lossless:":
        names = [n for n in names if rows[n]["rows_identical"] == rows[n]["rows"]] or names
    if not names:
        return None, None
    name = max(names, key=lambda n: rows[n]["ratio"]["median"])
    return name, rows[name]


def _lossless_runs(result: dict) -> tuple[str | None, dict, dict]:
    """`(run name, batch-1 rows, batch-4 rows)` of a `benchmarks.speed.lossless` payload: the best lossless run at
    batch 1 (batch 4 when the file has no batch 1), and every run of each batch."""
    batches = result.get("batches", {})
    one, four = batches.get("1", {}), batches.get("4", {})
    name, _ = _best(one or four, "lossless:")
    return name, one, four


def _identical(*runs) -> str:
    runs = [r for r in runs if r]
    return f"{sum(r['tokens_identical'] for r in runs)}/{sum(r['tokens'] for r in runs)}" if runs else "-"


def _acceptance(run: dict | None) -> str:
    return "-" if not run or run.get("acceptance") is None else f"{100 * run['acceptance']:.0f}%"


def _measured(stamp: dict) -> str:
    device = stamp.get("device", {})
    where = (device.get("gpu") or device.get("cpu", "?")) if isinstance(device, dict) else str(device)
    return f"{where}, {stamp.get('date', '?')[:10]}"


def lossless_cell(result: dict | None) -> str:
    """`speed median [q1, q3], acceptance, identical tokens` of the best lossless run at batch 1 of a
    `benchmarks.speed.lossless` result's payload (None: not measured)."""
    if result is None:
        return "not measured"
    name, one, four = _lossless_runs(result)
    if name is None:
        return "not measured"
    run = (one or four)[name]
    drafted = ("nothing drafted (nothing pays: the stock path)" if run.get("acceptance") is None
               else f"{_acceptance(run)} accepted")
    return f"{_ratio(run)}, {drafted}, {_identical(run)} identical"


def _drafter(name: str, run: dict) -> str:
    setting = run.get("setting") or {}
    label = name.split(":", 1)[1]
    if "classifier" in setting:
        return f"{label} (artifact{', empty schedule' if setting.get('empty_schedule') else ''})"
    return f"rule {label}"


def lossless_table(root: Path = ROOT) -> str:
    """The README's lossless table: per real model, the newest `docs/results/<key>/lossless/*.json` (written by
    `benchmarks.speed.lossless`): the best lossless run against stock `generate` at batch 1 and 4 (median
    [quartiles] of the per-prompt-group ratios), its acceptance, drafts per verification, layers per token and
    the tokens identical to stock, beside the peers of the same run (the best `assistant_early_exit` k of the sweep,
    the best prompt-lookup n) and today's lossy exits at 0.95."""
    rows = ["| model (layers) | drafter | lossless, batch 1 | lossless, batch 4 | acceptance | drafts per verify | "
            "layers per token | identical tokens | `assistant_early_exit` (k) | prompt lookup (n) | "
            "lossy 0.95 (identical tokens) | tokens x prompts x repeats | measured on |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for key in KEYS:
        found = _newest(root, key, "lossless", variant=None)
        _, stamp, result = found or (None, {}, {})
        name, one, four = _lossless_runs(result) if found else (None, {}, {})
        if name is None:
            rows.append(f"| {NAMES[key]} | not measured |" + " |" * 11)
            continue
        run = (one or four)[name]
        peers = []
        for prefix in ("early_exit:", "lookup:"):
            peer, row = _best(one, prefix)
            on = f"; {row['prompts']} prompts" if row and row.get("prompts") else ""  # a subset (`--peer-prompts`)
            peers.append(f"{_ratio(row)} ({peer.split(':', 1)[1]}{on})" if row else "-")
        lossy = one.get("lossy:0.95") or four.get("lossy:0.95")
        lossy_cell = f"{_ratio(lossy)} ({_identical(lossy)})" if lossy else "-"
        fmt = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
        rows.append(f"| {NAMES[key]} ({result['num_layers']}) | {_drafter(name, run)} | {_ratio(one.get(name))} | "
                    f"{_ratio(four.get(name))} | {_acceptance(run)} | {fmt(run.get('drafts_per_verification'))} | "
                    f"{fmt(run.get('layers_per_token'))} | {_identical(one.get(name), four.get(name))} | "
                    f"{peers[0]} | {peers[1]} | {lossy_cell} | "
                    f"{result['new_tokens']} x {result['prompts']} x {result['repeats']} | {_measured(stamp)} |")
    return "\n".join(rows)


def _paper_table():
    if str(ROOT) not in sys.path:  # the benchmarks package, when this file runs as a script
        sys.path.insert(0, str(ROOT))
    from benchmarks.paper import paper_table

    return paper_table


def status_table(root: Path = ROOT) -> str:
    paper_table = _paper_table()
    rows = ["| model (layers) | lossless decode vs stock, batch 1: median [q1, q3], acceptance, identical tokens | "
            "certified savings on tasks @0.99 | @0.95 | oracle ceiling (first token) | lossless measured on |",
            "|---|---|---|---|---|---|"]
    for key in KEYS:
        run = paper_table.load(root / "docs" / "results", key) or {}  # the newest eval reports (0.99, 0.95)
        s99, s95 = run.get("s99"), run.get("s95")
        _, stamp, lossless = _newest(root, key, "lossless", variant=None) or (None, None, None)
        layers = run.get("L", "?")
        oracle = f"{100 * s99['oracle']['pruning_ratio']:.0f}%" if s99 and "oracle" in s99 else "-"
        where = _measured(stamp) if lossless else "-"
        rows.append(f"| {NAMES[key]} ({layers}) | {lossless_cell(lossless)} | {_saved(s99)} | {_saved(s95)} | "
                    f"{oracle} | {where} |")
    return "\n".join(rows)


def _command(data: dict) -> str:
    """The command a result file records (argv, the eval config's command, or the benchmark's arguments)."""
    argv = data.get("argv") or (data.get("stamp") or {}).get("argv")
    if isinstance(argv, list):
        return " ".join(str(a) for a in argv)
    if isinstance(data.get("command"), str):
        return data["command"]
    config = data.get("config")
    if isinstance(config, dict) and isinstance(config.get("command"), str):
        return config["command"]
    return f"`{data['benchmark']}` (arguments in the file)" if "benchmark" in data else "(not recorded)"


def results_index(root: Path = ROOT) -> str:
    """docs/results/README.md: one row per result file, newest first within a model and question."""
    results = root / "docs" / "results"
    rows = ["# Result files", "",
            "Generated by `python scripts/docs_tables.py` from the files below; each JSON file carries a `stamp` "
            "(commit, date, device; `reconstructed` for runs older than stamping, from the commit that added the "
            "file). Layout: `<model>/<question>/<date>[-variant].json`; `models/` holds files covering several "
            "models; `<model>/eval/<date>/` are `adainfer eval` reports (results.json, results.md, plots).", "",
            "| model | question | file | commit | command |", "|---|---|---|---|---|"]
    for path in sorted(results.rglob("*")):
        if not path.is_file() or path.suffix not in (".json", ".log", ".md", ".png") or path.name == "README.md":
            continue
        rel = path.relative_to(results)
        if len(rel.parts) < 3:
            raise ValueError(f"docs/results/{rel}: expected <model>/<question>/<file>")
        commit, command = "-", "-"
        if path.suffix == ".json":
            data = json.loads(path.read_text())
            stamp = data.get("stamp", {}) if isinstance(data, dict) else {}
            commit = str(stamp.get("commit", data.get("commit", "-")))[:10]
            command = _command(data).replace("|", "\\|")
            command = command if len(command) <= 160 else command[:157] + "..."
        rows.append(f"| {rel.parts[0]} | {rel.parts[1]} | [{'/'.join(rel.parts[2:])}]({rel.as_posix()}) | "
                    f"{commit} | {command} |")
    return "\n".join(rows) + "\n"


def render(text: str, table: str, name: str = "status") -> str:
    """`text` with the block `name` replaced by `table` (ValueError when the page has no such block)."""
    begin, end = f"<!-- results:{name} -->", f"<!-- /results:{name} -->"
    if begin not in text or end not in text:
        raise ValueError(f"no {begin} ... {end} block")
    start, stop = text.index(begin) + len(begin), text.index(end)
    return text[:start] + "\n" + table + "\n" + text[stop:]


def paper_tables(root: Path = ROOT) -> dict[str, str]:
    """docs/results.md's generated blocks: the paper's Table 2, the check costs, the gated-check runs."""
    paper_table = _paper_table()
    results = root / "docs" / "results"
    runs = paper_table.runs_of(results)
    return {"paper-table2": paper_table.table2(runs),
            "paper-costs": paper_table.costs_table(results, paper_table.KEYS).strip(),
            "paper-gates": paper_table.gates_table([r for r in runs if r["gates"]])}


def _files(root: Path, question: str):
    """`(model, date-and-variant, payload)` of every result file of `question`, by model then date (the payload
    of a stamped file and of a migrated one alike: `utils.results.read_result`)."""
    results = root / "docs" / "results"
    for path in sorted(results.glob(f"*/{question}/*.json")):
        yield path.parent.parent.name, path.stem, read_result(path)[1]


def _name(key: str) -> str:
    return NAMES.get(key, key)


def decode_gain_table(root: Path = ROOT, shortlists: bool = False) -> str:
    """Every run of every `benchmarks.speed.decode_gain` file (those of the shortlist study, `*-vocabulary*`, when
    `shortlists`, else the others): the decode speedup over stock `generate` (median and quartiles of per-run
    ratios, ratio of summed times), token agreement and first change, layers per token."""
    rows = ["| model | file | classifier (cache) | tokens x prompts x repeats | decode speedup: median (quartiles) / "
            "of sums | token agreement / first change | layers per token |", "|---|---|---|---|---|---|---|"]
    for key, stem, data in _files(root, "decode_gain"):
        if ("vocabulary" in stem) != shortlists:
            continue
        args = data.get("args") or {}
        repeats = args.get("repeats", "?")
        for run, r in data["runs"].items():
            tokens, prompts = r.get("new_tokens", args.get("new_tokens", "?")), r.get("prompts", data.get("prompts", "?"))
            rows.append(f"| {_name(key)} | {stem} | {run} | {tokens} x {prompts} x {repeats} | "
                        f"{r['speedup_median']:.3f}x ({r['speedup_q1']:.3f}-{r['speedup_q3']:.3f}) / "
                        f"{r['speedup_sum']:.3f}x | {r['token_agreement']:.3f} / {r['mean_prefix']:.1f} | "
                        f"{r['mean_layers_per_token']:.2f} of {data['num_layers']} |")
    return "\n".join(rows)


def prefill_gain_table(root: Path = ROOT) -> str:
    """Every classifier of every `benchmarks.speed.prefill_gain` file: first-token scoring speedup over the stock
    model (median of per-repeat medians, ratio of sums), agreement, mean layers."""
    rows = ["| model | file | classifier | prompts x repeats | prefill speedup: median / of sums | agreement | "
            "mean layers |", "|---|---|---|---|---|---|---|"]
    for key, stem, data in _files(root, "prefill_gain"):
        for name, r in data["results"].items():
            rows.append(f"| {_name(key)} | {stem} | {name} | {r['prompts']} x {r['repeats']} | "
                        f"{r['speedup_median']:.3f}x / {r['speedup_sum']:.3f}x | {r['agreement']:.3f} | "
                        f"{r['mean_layers']:.2f} of {data['layers']} |")
    return "\n".join(rows)


def catch_up_table(root: Path = ROOT) -> str:
    """`benchmarks.cost.catch_up_cost`: a decoder layer on q positions at once, relative to one position."""
    rows = ["| file | model | layer, 1 position | 2 / 3 / 4 positions (x one) |", "|---|---|---|---|"]
    for _, stem, data in _files(root, "catch_up_cost"):
        for key, m in data["models"].items():
            one = m["layer q=1"]
            rest = " / ".join(f"{m[f'layer q={q}'] / one:.2f}x" for q in (2, 3, 4))
            rows.append(f"| {stem} | {_name(key)} | {1000 * one:.2f} ms | {rest} |")
    return "\n".join(rows)


def vocabulary_cost_table(root: Path = ROOT) -> str:
    """`benchmarks.cost.vocabulary_cost`: one check in decoder layers, full vocabulary and shortlists."""
    rows = []
    for _, stem, data in _files(root, "vocabulary_cost"):
        for key, m in data.items():
            if key == "stamp":
                continue
            sizes = [k for k in m["rows"][0] if k.isdigit()]
            if not rows:
                rows = ["| file | model (vocab) | phase | full | " + " | ".join(f"{int(k):,} ids" for k in sizes)
                        + " |", "|---|---|---|---|" + "---|" * len(sizes)]
            for r in m["rows"]:
                phase = "decode" if r["phase"] == "decode" else f"prefill {r['tokens']}"
                rows.append(f"| {stem} | {_name(key)} ({m['vocab']:,}) | {phase} | {r['full']:.3g} | "
                            + " | ".join(f"{r[k]:.3g}" if k in r else "-" for k in sizes) + " |")
    return "\n".join(rows)


CALIBRATION_TARGETS = (0.9, 0.95, 0.99, 0.999)
CALIBRATION_DELTAS = (0.1, 0.05, 0.01)


def calibration_draws_table() -> str:
    """docs/scale.md: the calibration draws Learn-then-Test needs per target and delta
    (`adainfer_hf.training.draws.calibration_draws_needed`, the test `calibrate` runs)."""
    from adainfer_hf.training.calibrate import MAX_MIN_LAYERS
    from adainfer_hf.training.draws import calibration_draws_needed

    rows = [f"| target | delta | 1 candidate, 0 disagreements | {MAX_MIN_LAYERS} candidates (the default grid), "
            "0 disagreements | " f"{MAX_MIN_LAYERS} candidates, disagreeing on half the allowed share |",
            "|---:|---:|---:|---:|---:|"]
    for target in CALIBRATION_TARGETS:
        for delta in CALIBRATION_DELTAS:
            cells = (calibration_draws_needed(target, delta), calibration_draws_needed(target, delta, MAX_MIN_LAYERS),
                     calibration_draws_needed(target, delta, MAX_MIN_LAYERS, (1 - target) / 2))
            rows.append(f"| {target:g} | {delta:g} | " + " | ".join(f"{c:,}" for c in cells) + " |")
    return "\n".join(rows)


def collect_throughput_table(root: Path = ROOT) -> str:
    """docs/scale.md: prompt-table collection time on 1 and N processes (every collect_throughput result file)."""
    rows = ["| model | date | processes x threads | s per 1,000 prompts (median) | ms per prompt token | speedup | runs |",
            "|---|---|---|---:|---:|---:|---|"]
    for key, stem, data in _files(root, "collect_throughput"):
        result = data
        by = result["by_processes"]
        one = by.get("1", {}).get("s_per_1000_prompts")
        for n, r in sorted(by.items(), key=lambda item: int(item[0])):
            speedup = f"{one / r['s_per_1000_prompts']:.2f}x" if one else "-"
            rows.append(f"| {_name(key)} | {stem} | {n} x {result['threads_per_process']} | "
                        f"{r['s_per_1000_prompts']:.1f} | {r['ms_per_prompt_token']:.2f} | {speedup} | "
                        f"{len(r['runs_seconds'])} x {result['prompts']} prompts |")
    return "\n".join(rows)


# ------------------------------------------------------------------------------------------------------------------
# docs/results.md's tables that were copied by hand before: each now from its result file (issue 30, "results")

def _method_cell(row: dict | None, layers: bool = True) -> str:
    if row is None:
        return "-"
    return f"{100 * row['accuracy']:.1f}" + (f" / {row['mean_layers']:.1f}" if layers else "")


def smollm2_shots_table(root: Path = ROOT) -> str:
    """`benchmarks/paper/eval_smollm2.sh` (`adainfer eval` over several shot counts): per shot count, accuracy and
    mean layers of every method, from the newest SmolLM2 eval report that covers more than one shot count."""
    results = root / "docs" / "results"
    paths = [p for p in result_files("smollm2", "eval", results, variant=None, filename="results.json")
             if len(read_result(p)[1]["config"].get("shots", [])) > 1]
    if not paths:
        raise ValueError("no SmolLM2 eval report over several shot counts under docs/results/smollm2/eval/")
    data = read_result(paths[-1])[1]
    removed = len(data["methods"].get("shortgpt", {}).get("removed_layers", []))
    rows = [f"| shots | n | dense acc | AdaInfer acc / layers | gap>0.8 acc / layers | CRF acc / layers | "
            f"ShortGPT (-{removed} layers) acc | oracle acc / layers |", "|---|---|---|---|---|---|---|---|"]
    for shots in data["config"]["shots"]:
        by = {r["method"]: r for r in data["summary"] if r["task"] == "all" and r["shots"] == shots}
        rows.append(f"| {shots} | {by['dense']['n']} | {_method_cell(by['dense'], False)} | "
                    f"{_method_cell(by.get('adainfer'))} | {_method_cell(by.get('gap'))} | {_method_cell(by.get('crf'))} | "
                    f"{_method_cell(by.get('shortgpt'), False)} | {_method_cell(by.get('oracle'))} |")
    return "\n".join(rows) + f"\n\n(From [{paths[-1].relative_to(results).as_posix()}]" \
        f"(results/{paths[-1].relative_to(results).as_posix()}).)"


def check_dtype_table(root: Path = ROOT) -> str:
    """`benchmarks.quality.check_dtype_smollm2`: what a half-precision check head changes, per check dtype."""
    name, _, data = _newest(root, "smollm2", "check_dtype", required=True)
    ref = data["dtypes"]["float32"]["targets"]
    rows = [f"| check head | logit-lens top-1 equal to fp32's | max abs. change of top_prob | one check, prefill "
            f"{data['median_length']} / decode (layers) | fp32-calibrated rule's decisions changed | test agreement / "
            f"layers at targets {', '.join(ref)} |", "|---|---|---|---|---|---|"]
    for dtype, d in data["dtypes"].items():
        targets = d["targets"]
        flips = sum(t["fp32_rule_decision_flips"] for t in targets.values())
        checked = sum(t["rows"] for t in targets.values())
        same = all((t["test_agreement"], t["test_mean_layers"]) == (ref[k]["test_agreement"], ref[k]["test_mean_layers"])
                   for k, t in targets.items())
        outcome = ", ".join(f"{t['test_agreement']:.3f} / {t['test_mean_layers']:.2f}" for t in targets.values())
        rows.append(f"| {'fp32 (model)' if dtype == 'float32' else dtype} | {100 * d['top1_agreement_with_fp32']:.2f}% "
                    f"of rows | {d['max_abs_diff_top_prob']:.2g} | {d['check_cost_prefill']:.2f} / "
                    f"{d['check_cost_decode']:.1f} | {'-' if dtype == 'float32' else f'{flips} of {checked:,} checked rows'} | "
                    f"{outcome if dtype == 'float32' or not same else 'identical to fp32'} |")
    return "\n".join(rows) + f"\n\n(From [{name}](results/{name}).)"


def bench_exit_table(root: Path = ROOT, model: str = "smollm2") -> str:
    """`benchmarks.speed.bench_exit`: the machinery's overhead where nothing fires, and each exit's speedup as a
    fraction of the ideal's (in parentheses: with every skipped layer's K/V filled inside the timed call)."""
    name, _, data = _newest(root, model, "bench_exit", required=True, variant="cpu")
    cases = data["results"]
    ks = list(cases[0]["exit"])
    _paper_table()  # the benchmarks package on the path
    from benchmarks.speed.bench_exit import SHAPES

    L = SHAPES[data["args"]["shape"]]["num_hidden_layers"] if not data["args"].get("model") else "L"
    rows = ["| case | never fires: no checks / 1 check / every layer | "
            + " | ".join(f"exit after {k} of {L}" for k in ks) + " |", "|---" * (2 + len(ks)) + "|"]
    for c in cases:
        case = (f"prefill {c['length']}, batch {c['batch']}" if c["phase"] == "prefill" else
                f"decode (context {c['length']}, {data['args']['decode_steps']} steps), batch {c['batch']}")
        o = c["overhead"]
        cells = [f"{e['speedup']:.2f}x of {e['ideal']:.2f}x: **{e['of_ideal']:.2f}** ({e['of_ideal_filled']:.2f})"
                 for e in c["exit"].values()]
        rows.append(f"| {case} | {100 * o['no_checks']:+.1f}% / {100 * o['one_check']:+.1f}% / "
                    f"{100 * o['every_layer']:+.0f}% | " + " | ".join(cells) + " |")
    return "\n".join(rows) + f"\n\n(From [{name}](results/{name}), every sample included.)"


_PEER_NAMES = {"hf": "HF `generate` (stock)", "econ-plain": "economize, no early exit",
               "ada-shipped": "AdaInfer, shipped calibrated classifier",
               "ada-shipped-checks": "AdaInfer, shipped classifier forced to check every layer"}


def _peer_method(method: str) -> str:
    if method in _PEER_NAMES:
        return _PEER_NAMES[method]
    if method.startswith("econ-calm@"):
        return "economize CALM, threshold " + method.removeprefix("econ-calm@")
    if method.startswith("ada-gap@"):
        return "AdaInfer, `gap` rule at " + method.removeprefix("ada-gap@").replace("+prompt", " (prompt step may exit)")
    return f"AdaInfer, `{method.removeprefix('ada-')}`"


def peer_table(root: Path = ROOT, model: str = "smollm2") -> str:
    """`benchmarks.peers.peer_economize` without extra classifiers: every method's agreement with the stock greedy
    tokens, layers per token and time against HF `generate` (median of the repeats)."""
    name, _, data = _newest(root, model, "peer_economize", required=True)
    rows = ["| method | token agreement with dense (overall / common prefix) | identical prompts | mean layers | "
            "time vs HF `generate` (median; fastest repeat) |", "|---|---|---|---|---|"]
    n = data["settings"]["prompts"]
    for r in data["results"]:
        rows.append(f"| {_peer_method(r['method'])} | {r['overall_agreement']:.3f} / {r['prefix_agreement']:.3f} | "
                    f"{r['identical_prompts']}/{n} | {r['mean_layers']:.1f} | {r['x_hf']:.2f}x ({r['x_hf_min']:.2f}x) |")
    return "\n".join(rows) + f"\n\n(From [{name}](results/{name}).)"


def generation_table(root: Path = ROOT) -> str:
    """`benchmarks.quality.generation_real` (teacher-forced calibration on generated tokens, no `--free-running`):
    per model and rule, the calibration, the decode schedule and the 64-token generations with each cache."""
    rows = ["| model | rule @ target | calibration: tokens exiting / layers per token / agreement | decode schedule "
            "(layers) / predicted cost | generation, exact cache: agreement / first divergence / layers per token / "
            "speedup | same, propagate cache |", "|---|---|---|---|---|---|"]
    links = []
    for key in KEYS:
        found = _newest(root, key, "generation")
        if found is None:
            continue
        name, _, data = found
        links.append(f"[{_name(key)}](results/{name})")
        gen = data["generation"]
        for rule, c in data["classifiers"].items():
            cal = c["calibration"]
            decode = cal.get("decode_schedule") or {}
            layers = c["decode_check_layers"]
            schedule = ", ".join(map(str, layers)) if layers else "none"
            exiting = f"{100 * cal['early_exits'] / cal['n']:.0f}%" if cal.get("n") else "-"

            def run(g):
                return "" if g is None else (f"{g['token_agreement']:.3f} / {g['mean_prefix']:.1f} / "
                                             f"{g['mean_layers_per_token']:.2f} / {g['speedup_median']:.2f}x")

            rows.append(f"| {_name(key)} | {rule} | {exiting} / {cal.get('mean_exit_layer', float('nan')):.1f} / "
                        f"{cal.get('agreement', float('nan')):.2f} | {schedule} / "
                        f"{decode.get('relative_cost', 1.0):.3f} | {run(gen.get(rule))} | "
                        f"{run(gen.get(f'{rule} propagate'))} |")
    return "\n".join(rows) + f"\n\n(From {', '.join(links)}.)"


# ------------------------------------------------------------------------------------------------------------------
# The last hand-copied tables of docs/results.md (issue 30), each from its result file; a table whose file does not
# exist yet is a sentence naming the command that writes it.

def _not_measured(command: str) -> str:
    return f"Not measured on this commit; run `{command}` (then `python scripts/docs_tables.py`)."


def _link(name: str) -> str:
    return f"[{name}](results/{name})"


SIMULATE_COMMAND = "python -m benchmarks.quality.simulate_smollm2 --fv-dir ../shared/data/function_vectors"
_SIMULATE_NAMES = {"uncalibrated": "uncalibrated SVM (paper)", "gap>0.8": "`gap > 0.8` (paper)"}


def simulate_table(root: Path = ROOT) -> str:
    """`benchmarks.quality.simulate_smollm2`: each rule replayed on the held-out tasks' collected table
    (agreement with the dense token, mean exit layer, gold accuracy against dense)."""
    found = _newest(root, "smollm2", "simulate")
    if found is None:
        return _not_measured(SIMULATE_COMMAND)
    name, _, data = found
    rules = data["rules"]
    dense = next(iter(rules.values())).get("gold_accuracy_dense", float("nan"))
    rows = [f"| rule | agreement with dense | mean layers | gold accuracy (dense {dense:.3f}) |", "|---|---|---|---|"]

    def order(rule: str) -> tuple:  # the calibrated classifiers from the strictest target, then the paper's rules
        return (0, -float(rule.split("@", 1)[1])) if rule.startswith("calibrated@") else (1, rule != "uncalibrated")

    for rule in sorted(rules, key=order):
        r = rules[rule]
        label = _SIMULATE_NAMES.get(rule) or rule.replace("calibrated@", "calibrated, target ")
        rows.append(f"| {label} | {r['agreement']:.3f} | {r['mean_exit_layer']:.2f} of {r['num_layers']} | "
                    f"{r['gold_accuracy_exit']:.3f} |")
    return "\n".join(rows) + (f"\n\n({data['held_out_prompts']} prompts of {', '.join(data['held_out_tasks'])}; "
                              f"from {_link(name)}.)")


SWEEP_COMMAND = ("python -m benchmarks.quality.generation_smollm2 --prompts 20 --new-tokens 64 --batch-size 10 "
                 "--exit-layers 24 28")


def generation_sweep_table(root: Path = ROOT) -> str:
    """`benchmarks.quality.generation_smollm2`: per exit configuration and cache, token agreement with dense
    greedy decoding, common prefix, layers per token and the summed seconds of both (dense / early exit)."""
    found = _newest(root, "smollm2", "generation_sweep")
    if found is None:
        return _not_measured(SWEEP_COMMAND)
    name, _, data = found
    rows = ["| exits | KV cache | token agreement with dense | common prefix (tokens) | mean layers / token | "
            "dense s | early exit s | speedup |", "|---|---|---|---|---|---|---|---|"]
    for r in data["rows"]:
        exits = f"every token at {r['exits'][5:]}" if r["exits"].startswith("exit@") else r["exits"]
        rows.append(f"| {exits} | {r['cache']} | {r['agreement']:.3f} | {r['prefix']:.1f} | "
                    f"{r['mean_layers']:.2f} / {data['num_layers']} | {r['dense_seconds']:.1f} | {r['seconds']:.1f} | "
                    f"{r['speedup']:.2f}x |")
    return "\n".join(rows) + (f"\n\n({data['prompts']} prompts x {data['new_tokens']} tokens, batches of "
                              f"{data['batch_size']}, {data['threads']} threads; from {_link(name)}.)")


STEPS_COMMAND = "python -m benchmarks.cost.decode_steps KEY --classifier DIR --cache exact"


def _step_files(root: Path):
    return [(key, stem, data) for key, stem, data in _files(root, "decode_steps")]


def decode_steps_table(root: Path = ROOT) -> str:
    """`benchmarks.cost.decode_steps`, stock side: a decode step's time split into decoder layers, final norm +
    LM head and the rest, the head in decoder layers, and the step in layer-equivalents (what every exit still
    pays beside the layers it runs)."""
    rows = ["| model | file | stock decode step | layers / final norm + head / rest | head in layers | "
            "step in layer-equivalents (layers + head + rest) |", "|---|---|---|---|---|---|"]
    for key, stem, data in _step_files(root):
        s, L = data["stock"], data["num_layers"]
        equivalents = L / s["layers_share"]
        rows.append(f"| {_name(key)} | {stem} | {1000 * s['seconds_per_token']:.1f} ms | "
                    f"{100 * s['layers_share']:.1f}% / {100 * s['head_share']:.1f}% / {100 * s['rest_share']:.1f}% | "
                    f"{s['head_in_layers']:.1f} | {equivalents:.1f} ({L} layers) |")
    return "\n".join(rows) if len(rows) > 2 else _not_measured(STEPS_COMMAND)


_STEP_KINDS = (("exit", "exit steps"), ("full", "steps running every layer"),
               ("full+catch-up", "steps that also catch up"))


def decode_steps_groups_table(root: Path = ROOT) -> str:
    """`benchmarks.cost.decode_steps`, early-exit side: per kind of decode step (exited, ran every layer, ran every
    layer and caught up skipped ones), how many per run and its median time against the stock step; layers per
    token, and the speedup those step times predict for the run (stock step over the count-weighted mean step)."""
    rows = ["| model | file | classifier (cache) | " + " | ".join(label for _, label in _STEP_KINDS)
            + " | layers per token | predicted speedup |", "|---" * (5 + len(_STEP_KINDS)) + "|"]
    for key, stem, data in _step_files(root):
        steps = data["steps"]
        cells = [f"{steps[k]['count_per_run']} at {steps[k]['vs_stock']:.2f}x" if k in steps else "-"
                 for k, _ in _STEP_KINDS]
        count = sum(s["count_per_run"] for s in steps.values())
        predicted = count / sum(s["count_per_run"] * s["vs_stock"] for s in steps.values()) if count else None
        classifier = (data.get("args") or {}).get("classifier", "?")
        rows.append(f"| {_name(key)} | {stem} | `{classifier}` ({data['cache']}) | " + " | ".join(cells)
                    + f" | {data['mean_layers_per_decode_token']:.2f} of {data['num_layers']} | "
                    + ("-" if predicted is None else f"{predicted:.3f}x") + " |")
    return "\n".join(rows) if len(rows) > 2 else _not_measured(STEPS_COMMAND)


LM_EVAL_COMMAND = "python -m benchmarks.quality.lm_eval_smollm2 --fv-dir ../shared/data/function_vectors"
_LM_EVAL_NAMES = {"hf": "`--model hf`", "shipped": "`adainfer`, shipped classifier",
                  "shipped-every-layer": "`adainfer`, shipped classifier checked after every layer from its min_layer",
                  "gap>0.8": "`adainfer`, paper's `gap > 0.8` rule"}


def lm_eval_table(root: Path = ROOT) -> str:
    """`benchmarks.quality.lm_eval_smollm2`: the harness's sentiment accuracy and present-past exact match (with
    standard errors), the mean exit layer per task and the paper's FLOPs ratio over all requests."""
    found = _newest(root, "smollm2", "lm_eval")
    if found is None:
        return _not_measured(LM_EVAL_COMMAND)
    name, _, data = found
    sentiment, past = data["tasks"]
    rows = ["| model | sentiment acc | sentiment layers | present-past exact match | present-past layers / token | "
            "FLOPs ratio (all) |", "|---|---|---|---|---|---|"]

    def metric(m: dict, key: str) -> str:
        if key not in m:
            return "-"
        err = m.get(f"{key}_stderr")
        return f"{m[key]:.2f}" + (f" ± {err:.2f}" if isinstance(err, (int, float)) else "")

    known = list(_LM_EVAL_NAMES)  # the stock harness first, then the classifiers (the file's keys are sorted)
    for run in sorted(data["runs"], key=lambda n: (known.index(n) if n in known else len(known), n)):
        r = data["runs"][run]
        exits = r.get("exits")
        layers = [f"{exits[t]['mean_exit_layer']:.2f}" if exits else "all (stock)" for t in (sentiment, past)]
        flops = f"{exits['all']['flops_ratio']:.4f}" if exits else "1"
        rows.append(f"| {_LM_EVAL_NAMES.get(run, run)} | {metric(r['metrics'][sentiment], 'acc')} | {layers[0]} | "
                    f"{metric(r['metrics'][past], 'exact_match')} | {layers[1]} | {flops} |")
    return "\n".join(rows) + f"\n\n({data['limit']} examples per task, lm-eval {data['lm_eval']}; from {_link(name)}.)"


# The per-model summaries: one row per real model, every cell a query over that model's files.

def _run_parts(run: str) -> tuple[str, float, str, str] | None:
    """`(rule, target, extra, cache)` of a decode_gain run name such as `gate-knob@0.95+v16384 exact`."""
    m = re.match(r"^(?P<rule>[\w-]+)@(?P<target>[\d.]+)(?P<extra>\S*) (?P<cache>\w+)$", run)
    return None if m is None else (m["rule"], float(m["target"]), m["extra"], m["cache"])


def _decode_runs(root: Path, key: str):
    """`(file, run name, parts, row)` of every exact-cache, teacher-forced-calibrated run in `key`'s decode_gain
    files."""
    for model, stem, data in _files(root, "decode_gain"):
        for run, r in data["runs"].items():
            parts = _run_parts(run)
            if model == key and parts and parts[3] == "exact" and "free" not in parts[2]:
                yield stem, run, parts, r


def _speed(r: dict, bold: bool = True) -> str:
    """`median (q1-q3)`, bold where even the lower quartile is above 1."""
    text = f"{r['speedup_median']:.3f}x ({r['speedup_q1']:.3f}-{r['speedup_q3']:.3f})"
    return f"**{text}**" if bold and r["speedup_q1"] > 1 else text


def _best_decode(root: Path, key: str, target: float, shortlist: bool) -> str:
    runs = [(stem, run, r) for stem, run, parts, r in _decode_runs(root, key)
            if parts[1] == target and ("+v" in parts[2]) == shortlist]
    if not runs:
        return "-"
    stem, run, r = max(runs, key=lambda x: x[2]["speedup_median"])
    return (f"{run.rsplit(' ', 1)[0]} {_speed(r)}, {r['token_agreement']:.3f}, "
            f"{r['mean_layers_per_token']:.2f} layers ({stem})")


def _check_costs(root: Path, key: str) -> tuple[str | None, dict | None]:
    """`(file, payload)` of the newest check-cost measurement of `key` (gate_real's `--costs-only` file, else a
    gate_real run, which measures the same costs first)."""
    for question in ("gate_costs", "gate"):
        found = _newest(root, key, question)
        if found:
            return found[0], found[2]
    return None, None


def _vocabulary_costs(root: Path, key: str) -> tuple[str | None, dict | None]:
    """`(file, one model's entry)` of the newest vocabulary_cost file covering `key` (its own or `models/`)."""
    best = None
    for model in (key, "models"):
        for path in result_files(model, "vocabulary_cost", root / "docs" / "results"):
            data = read_result(path)[1]
            if key in data and (best is None or path.stem > best[0].stem):
                best = (path, data[key])
    if best is None:
        return None, None
    return best[0].relative_to(root / "docs" / "results").as_posix(), best[1]


def _check_cell(root: Path, key: str, sizes=None) -> str:
    """One decode check in decoder layers: full / gated (gate_real's costs), then, when `sizes` is given, the
    vocabulary-cost file's check over each of those shortlist sizes."""
    _, costs = _check_costs(root, key)
    decode = [r for r in (costs or {}).get("check_costs", []) if r["phase"] == "decode"]
    cell = " / ".join(f"{r['full_check_layers']:.2f} / {r['gate_layers']:.3f}" for r in decode) or "-"
    if sizes is not None:  # the shortlist part: "-" where no decode run used a shortlist
        _, vocab = _vocabulary_costs(root, key)
        row = next((r for r in (vocab or {}).get("rows", []) if r["phase"] == "decode"), None)
        short = ", ".join(f"{row[str(k)]:.2f} ({k:,} ids)" for k in sizes if row and str(k) in row)
        cell += f" / {short or '-'}"
    return cell


def _model_cell(root: Path, key: str) -> str:
    _, costs = _check_costs(root, key)
    if not costs:
        return _name(key)
    return f"{_name(key)} ({costs['num_layers']} / {costs['vocab_size']:,})"


def _calm_cell(root: Path, key: str) -> str:
    """economize's CALM against HF `generate` in the newest peer_economize file: never exiting, and at 0.9."""
    found = _newest(root, key, "peer_economize", variant=None)
    if found is None:
        return "-"
    by = {r["method"].split(" ")[0]: r for r in found[2]["results"]}
    never, at = by.get("econ-calm@1"), by.get("econ-calm@0.9")
    cells = [f"never exiting {never['x_hf']:.2f}x of HF's time" if never else None,
             f"at 0.9 {at['x_hf']:.2f}x, agreement {at['overall_agreement']:.2f}" if at else None]
    return "; ".join(c for c in cells if c) + f" ({found[0].split('/')[-1]})"


def _prefill_cell(root: Path, key: str) -> str:
    found = _newest(root, key, "prefill_gain", variant=None)
    if found is None:
        return "-"
    speeds = [r["speedup_median"] for r in found[2]["results"].values()]
    return f"{min(speeds):.3f}-{max(speeds):.3f}x ({len(speeds)} classifiers, {found[0].split('/')[-1]})"


def summary_shortlist_table(root: Path = ROOT) -> str:
    """Per real model: a decode check's cost (full, gated, over the shortlist the decode runs used), the newest
    prefill_gain file's range, and at each target the fastest exact-cache decode_gain run over a shortlist and
    the fastest over the full vocabulary (median (quartiles), token agreement, layers per token, file), and
    economize's CALM."""
    rows = ["| model (layers / vocab) | one check in decode, layers: full / gated / shortlist | prefill: speedup "
            "(range) | decode @0.95: shortlist; full vocabulary | decode @0.9 | decode @0.99 | economize CALM vs HF "
            "`generate` |", "|---|---|---|---|---|---|---|"]
    for key in KEYS:
        sizes = sorted({int(m) for _, _, parts, _ in _decode_runs(root, key)
                        for m in re.findall(r"\+v(\d+)", parts[2])})
        decode = [f"{_best_decode(root, key, t, True)}; {_best_decode(root, key, t, False)}" for t in (0.95, 0.9, 0.99)]
        rows.append(f"| {_model_cell(root, key)} | {_check_cell(root, key, sizes)} | "
                    f"{_prefill_cell(root, key)} | " + " | ".join(decode) + f" | {_calm_cell(root, key)} |")
    return "\n".join(rows)


def summary_full_table(root: Path = ROOT) -> str:
    """Per real model, the full-vocabulary measurements before the shortlist: a decode check's cost (full /
    gated), AdaInfer's first-token speedup in the eval reports (@0.99 / @0.95), and per target the one-pass
    64-token generation of each classifier calibrated on generated tokens (the newest generation file, exact
    cache; propagate in parentheses): the fastest rule's speedup and token agreement."""
    paper_table = _paper_table()
    rows = ["| model (layers / vocab) | one check in decode, layers: full / gated | prefill (first token, eval "
            "reports): AdaInfer @0.99 / @0.95 | decode, one pass @0.95: rule speedup, agreement | @0.9 | @0.99 | "
            "file |", "|---|---|---|---|---|---|---|"]
    for key in KEYS:
        run = paper_table.load(root / "docs" / "results", key) or {}
        prefill = " / ".join(f"{s['adainfer']['speedup']:.2f}x" if s and "adainfer" in s else "-"
                             for s in (run.get("s99"), run.get("s95")))
        found = _newest(root, key, "generation")
        cells, name = ["-"] * 3, "-"
        if found:
            name, _, data = found
            gen = data["generation"]
            for i, target in enumerate((0.95, 0.9, 0.99)):
                rules = [(rule, g) for rule, g in gen.items() if " " not in rule and rule.endswith(f"@{target:g}")]
                if rules:
                    rule, g = max(rules, key=lambda x: x[1]["speedup_median"])
                    other = gen.get(f"{rule} propagate")
                    extra = f" (propagate {other['speedup_median']:.2f}x, {other['token_agreement']:.3f})" if other else ""
                    cells[i] = f"{rule} {g['speedup_median']:.2f}x, {g['token_agreement']:.3f}{extra}"
            name = _link(name)
        rows.append(f"| {_model_cell(root, key)} | {_check_cell(root, key)} | {prefill} | " + " | ".join(cells)
                    + f" | {name} |")
    return "\n".join(rows)


def former_hand_tables(root: Path = ROOT) -> dict[str, str]:
    """The blocks of docs/results.md generated since issue 30 (tables that used to be copied from printed runs)."""
    return {"smollm2-shots": smollm2_shots_table(root), "check-dtype": check_dtype_table(root),
            "bench-exit": bench_exit_table(root), "peer-smollm2": peer_table(root),
            "generation": generation_table(root), "simulate-smollm2": simulate_table(root),
            "generation-sweep": generation_sweep_table(root), "decode-steps": decode_steps_table(root),
            "decode-steps-groups": decode_steps_groups_table(root), "lm-eval-smollm2": lm_eval_table(root),
            "summary-shortlist": summary_shortlist_table(root), "summary-full": summary_full_table(root)}


def pages(root: Path = ROOT) -> dict[Path, str]:
    """Each generated page as the result files say it should read."""
    readme, results_md = root / "README.md", root / "docs" / "results.md"
    text = results_md.read_text()
    tables = {**paper_tables(root), "decode-gain": decode_gain_table(root),
              "decode-gain-vocabulary": decode_gain_table(root, shortlists=True), "prefill-gain": prefill_gain_table(root),
              "catch-up-cost": catch_up_table(root), "vocabulary-cost": vocabulary_cost_table(root)}
    tables.update(former_hand_tables(root))
    for name, table in tables.items():
        text = render(text, table, name)
    scale = root / "docs" / "scale.md"
    scale_text = render(render(scale.read_text(), calibration_draws_table(), "calibration-draws"),
                        collect_throughput_table(root), "collect-throughput")
    front = render(render(readme.read_text(), status_table(root)), lossless_table(root), "lossless")
    return {readme: front, results_md: text, scale: scale_text,
            root / "docs" / "results" / "README.md": results_index(root)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--check", action="store_true", help="only compare; exit 1 when README.md is out of date")
    args = p.parse_args(argv)
    wanted = pages()
    stale = [p for p, text in wanted.items() if not p.is_file() or p.read_text() != text]
    if args.check:
        for p in stale:
            print(f"{p.relative_to(ROOT)} differs from the result files: run python scripts/docs_tables.py",
                  file=sys.stderr)
        return 1 if stale else 0
    for p in stale:
        p.write_text(wanted[p])
    return 0


if __name__ == "__main__":
    sys.exit(main())

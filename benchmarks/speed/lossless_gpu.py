"""Lossless early exit on a GPU: the cost parts of a Llama-3-8B-shaped model and lossless == stock tokens, fp16.

Prepared for a CUDA machine (issue 27, item 5); `--tiny --device cpu` is the dry run the test suite executes.

1. A model of Llama-3-8B's shape with random weights (32 layers, hidden 4096, MLP 14336, vocabulary 128256, 32
   heads with 8 K/V heads; `--layers` for fewer), built on the meta device and materialised on the device in fp16
   (about 16 GB for 32 layers). Measured with CUDA-synchronised timers (median of `--repeats`):
   - one decoder layer on 1 vs n positions (`--positions`, after `--context` cached positions are not modelled:
     the projections and MLP are what a short verification adds);
   - the final norm and LM head on 1 vs n positions.
   A verification that batches n drafts pays for itself when layer(n) and head(n) stay close to layer(1) and
   head(1): the ratios are printed.
2. Lossless greedy `generate` against the stock path (`exit_policy=None`) on the same random model: tokens
   identical, or for each row the first differing position and the stock top-1/top-2 logit margin there (in fp16
   only near-ties may differ).
3. With `--real DIR` (a local checkpoint, e.g. the converted qwen2.5-1.5b copied to the machine): stock vs lossless
   wall-clock and identity on a few held-out prompts, with a drafting rule (`--rule LAYER:SHORTLIST:CAP[:GAP]`).

Usage: `python -m benchmarks.speed.lossless_gpu [--layers 32] [--positions 1,2,4,8] [--real DIR] [--out FILE]`.
Prints one JSON object (also written to `--out`).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch
from transformers import LlamaConfig

from adainfer_hf import AdaInferLlamaForCausalLM
from benchmarks.common.timing import quartiles
from benchmarks.speed.lossless import HELD_OUT, drafting_rule, load_pair, mixed, parse_rules, read_prompts

LLAMA3_8B = dict(num_hidden_layers=32, hidden_size=4096, intermediate_size=14336, vocab_size=128256,
                 num_attention_heads=32, num_key_value_heads=8, rope_theta=500000.0, max_position_embeddings=8192,
                 tie_word_embeddings=False)
TINY = dict(num_hidden_layers=4, hidden_size=64, intermediate_size=128, vocab_size=512, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False)


def build(layers: int | None, tiny: bool, device: str, dtype: torch.dtype, seed: int = 0):
    """The random-weight AdaInfer Llama (built on meta, materialised on `device`, weights N(0, 0.02))."""
    shape = dict(TINY if tiny else LLAMA3_8B)
    if layers:
        shape["num_hidden_layers"] = layers
    config = LlamaConfig(**shape, pad_token_id=0, eos_token_id=None, bos_token_id=None)
    with torch.device("meta"):
        model = AdaInferLlamaForCausalLM(config)
    model.to_empty(device=device)
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name:
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=gen)
    model = model.to(dtype).eval()
    # to_empty left the rotary tables uninitialised (and `to(dtype)` would round them): a fresh fp32 module
    model.model.rotary_emb = type(model.model.rotary_emb)(config).to(device)
    return model


def _timer(device: str, fn, repeats: int) -> dict:
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return quartiles(times)


def cost_parts(model, positions: list[int], device: str, repeats: int) -> dict:
    """Median seconds of one decoder layer and of norm + head on each number of positions, and ratios to 1."""
    layer, hidden = model.model.layers[0], model.config.hidden_size
    out = {"layer": {}, "head": {}}
    with torch.no_grad():
        for n in positions:
            h = torch.randn(1, n, hidden, device=device, dtype=model.dtype)
            pos = torch.arange(n, device=device)[None]
            emb = model.model.rotary_emb(h, pos)
            out["layer"][n] = _timer(device, lambda h=h, emb=emb: layer(h, position_embeddings=emb,
                                                                        attention_mask=None), repeats)
            out["head"][n] = _timer(device, lambda h=h: model.lm_head(model.model.norm(h)), repeats)
    for part in ("layer", "head"):
        base = out[part][positions[0]]["median"]
        out[f"{part}_ratio_to_{positions[0]}"] = {n: out[part][n]["median"] / base for n in positions}
    return out


def compare(model, stock_call, lossless_call, inputs: dict, new_tokens: int) -> dict:
    """Tokens of stock and lossless greedy generation, identity, and the stock top-2 margin at each first
    difference."""
    gen = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    n = inputs["input_ids"].shape[1]
    with torch.no_grad():
        ref = stock_call(inputs, gen)
        out = lossless_call(inputs, gen)
    mismatches = []
    for row in range(ref.sequences.shape[0]):
        a, b = ref.sequences[row, n:], out.sequences[row, n:]
        diff = (a != b).nonzero()
        if len(diff):
            pos = int(diff[0])
            top2 = ref.logits[pos][row].float().topk(2).values
            mismatches.append({"row": row, "position": pos, "stock_top2_margin": float(top2[0] - top2[1])})
    return {"rows": ref.sequences.shape[0], "rows_identical": ref.sequences.shape[0] - len(mismatches),
            "mismatches": mismatches, "draft_tokens": out.draft_tokens.tolist(),
            "accepted_tokens": out.accepted_tokens.tolist()}


def random_model_identity(model, rule, cap, new_tokens, device) -> dict:
    ids = torch.randint(1, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))
    inputs = {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device)}
    inputs["attention_mask"][1, :5] = 0  # a left-padded row

    def stock_call(enc, gen):
        return model.generate(**enc, **gen, exit_policy=None, return_dict_in_generate=True, output_logits=True)

    def lossless_call(enc, gen):
        return model.generate(**enc, **gen, exit_policy=rule, lossless=True, max_draft_tokens=cap,
                              return_dict_in_generate=True)
    return compare(model, stock_call, lossless_call, inputs, new_tokens)


def real_model(path, rule_text, prompts, new_tokens, repeats, device, dtype) -> dict:
    """Stock class vs lossless on a real checkpoint: identity and wall-clock ratio (batch 1, rotated order)."""
    stock, ada, tok = load_pair(path, dtype)
    stock.to(device), ada.to(device)  # (`to` gives each its own copy on the device: twice the weights there)
    L = ada.exit_head.spec.num_layers(ada)
    layer, size, cap, gap = parse_rules(rule_text, L)[0]
    rule = drafting_rule(ada, layer, size, gap)
    texts = [p["text"] for p in mixed(read_prompts(HELD_OUT), prompts)]
    gen = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
    calls = {"stock": lambda e: stock.generate(**e, **gen, return_dict_in_generate=True),
             "lossless": lambda e: ada.generate(**e, **gen, exit_policy=rule, lossless=True, max_draft_tokens=cap,
                                                return_dict_in_generate=True)}
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    ratios, same, drafted, accepted = [], 0, 0, 0
    with torch.no_grad():
        for r in range(repeats):
            for i, text in enumerate(texts):
                enc = tok([text], return_tensors="pt").to(device)
                seconds, seqs = {}, {}
                for name in (["stock", "lossless"] if (r + i) % 2 == 0 else ["lossless", "stock"]):
                    sync()
                    t0 = time.perf_counter()
                    seqs[name] = calls[name](enc)
                    sync()
                    seconds[name] = time.perf_counter() - t0
                ratios.append(seconds["stock"] / seconds["lossless"])
                if r == 0:
                    same += int(torch.equal(seqs["stock"].sequences, seqs["lossless"].sequences))
                    drafted += int(seqs["lossless"].draft_tokens.sum())
                    accepted += int(seqs["lossless"].accepted_tokens.sum())
    return {"rule": rule_text, "prompts": len(texts), "rows_identical": same, "ratio": quartiles(ratios),
            "draft_tokens": drafted, "acceptance": accepted / drafted if drafted else None}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.speed.lossless_gpu", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    p.add_argument("--layers", type=int, default=None, help="decoder layers (default 32; fewer to fit or be quick)")
    p.add_argument("--tiny", action="store_true", help="a tiny config instead of Llama-3-8B's shape (dry run)")
    p.add_argument("--positions", default="1,2,4,8")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--rule", default="-2:0:4", help="drafting rule LAYER:SHORTLIST:CAP[:GAP]")
    p.add_argument("--real", default=None, help="a local checkpoint directory for the real-model comparison")
    p.add_argument("--real-rule", default="-2:32768:4:0.7")
    p.add_argument("--real-prompts", type=int, default=8)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda but CUDA is not available; use --tiny --device cpu for a dry run.")
    dtype = getattr(torch, args.dtype)
    positions = [int(v) for v in args.positions.split(",")]
    model = build(args.layers, args.tiny, args.device, dtype)
    L = model.config.num_hidden_layers
    layer, size, cap, gap = parse_rules(args.rule, L)[0]
    result = {"device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
              "dtype": args.dtype, "shape": {k: getattr(model.config, k) for k in LLAMA3_8B if k != "rope_theta"},
              "cost": cost_parts(model, positions, args.device, args.repeats),
              "identity": random_model_identity(model, drafting_rule(model, layer, size, gap), cap,
                                                args.new_tokens, args.device)}
    del model
    if args.real:
        result["real"] = real_model(args.real, args.real_rule, args.real_prompts, args.new_tokens, 3, args.device,
                                    dtype)
    text = json.dumps(result, indent=1, sort_keys=True)
    print(text)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as handle:
            handle.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

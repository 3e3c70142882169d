"""Lossless early exit: the stock model's text, with exits as drafts the deeper layers verify.

    python examples/lossless_generation.py [--exit-layer 26] [--max-draft-tokens 3] [--max-new-tokens 48]

Generates the same prompts with the stock path and with `lossless=True` (here with a fixed exit layer as the
drafting rule; an artifact trained with `adainfer train --lossless` chooses its own), checks that the texts are
identical, and prints the drafts, the acceptance and the time of each.
"""

import argparse
import time

import torch
from transformers import AutoTokenizer

from adainfer_hf import AutoAdaInferForCausalLM, ScriptedExit
from adainfer_hf.models.default_model import default_model_dir

PROMPTS = ["Write one sentence about the sea.", "def is_prime(n):", "Q: How many legs does a spider have?\nA:"]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--exit-layer", type=int, default=26)
    p.add_argument("--max-draft-tokens", type=int, default=3)
    p.add_argument("--max-new-tokens", type=int, default=48)
    args = p.parse_args(argv)
    path = default_model_dir()
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoAdaInferForCausalLM.from_pretrained(path, exit_classifier=None)
    common = dict(max_new_tokens=args.max_new_tokens, do_sample=False, pad_token_id=tok.eos_token_id)
    rows = []
    with torch.no_grad():
        for prompt in PROMPTS:
            inputs = tok([prompt], return_tensors="pt")
            start = time.perf_counter()
            stock = model.generate(**inputs, exit_policy=None, **common)
            stock_s = time.perf_counter() - start
            start = time.perf_counter()
            out = model.generate(**inputs, exit_policy=ScriptedExit(args.exit_layer), lossless=True,
                                 max_draft_tokens=args.max_draft_tokens, return_dict_in_generate=True, **common)
            lossless_s = time.perf_counter() - start
            same = torch.equal(out.sequences, stock)
            drafted, accepted = int(out.draft_tokens[0]), int(out.accepted_tokens[0])
            rows.append({"prompt": prompt, "identical": same, "drafts": drafted, "accepted": accepted,
                         "stock_s": stock_s, "lossless_s": lossless_s})
            print(f"{prompt!r}: identical={same}, {accepted}/{drafted} drafts accepted, "
                  f"stock {stock_s:.2f} s, lossless {lossless_s:.2f} s")
            print("   ", repr(tok.decode(out.sequences[0, inputs.input_ids.shape[1]:])))
    assert all(r["identical"] for r in rows), "lossless generation must reproduce the stock text"
    return rows


if __name__ == "__main__":
    main()

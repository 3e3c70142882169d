"""Early exit inside a `transformers` pipeline, lossy and lossless, on the embedded SmolLM2-135M-Instruct.

    python examples/pipeline.py [--max-new-tokens 24]

A pipeline takes an AdaInfer model as it takes a stock one; `generate` options such as `lossless=True` pass
through the pipeline call. The lossless text is the stock model's.
"""

import argparse

from transformers import AutoTokenizer, pipeline

from adainfer_hf import AutoAdaInferForCausalLM, ScriptedExit
from adainfer_hf.models.default_model import default_model_dir


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--max-new-tokens", type=int, default=24)
    args = p.parse_args(argv)
    path = default_model_dir()
    model = AutoAdaInferForCausalLM.from_pretrained(path, exit_classifier=None)
    generator = pipeline("text-generation", model=model, tokenizer=AutoTokenizer.from_pretrained(path))
    prompt = "The three primary colours are"
    common = dict(max_new_tokens=args.max_new_tokens, do_sample=False, return_full_text=False)
    stock = generator(prompt, exit_policy=None, **common)[0]["generated_text"]
    lossy = generator(prompt, exit_policy=ScriptedExit(26), **common)[0]["generated_text"]
    lossless = generator(prompt, exit_policy=ScriptedExit(26), lossless=True, **common)[0]["generated_text"]
    print(f"stock:                      {stock!r}")
    print(f"exit after layer 26, lossy: {lossy!r}")
    print(f"the same exits, lossless:   {lossless!r}")
    assert lossless == stock, "lossless generation must reproduce the stock text"
    return {"stock": stock, "lossy": lossy, "lossless": lossless}


if __name__ == "__main__":
    main()

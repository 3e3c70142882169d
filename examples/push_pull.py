"""Share an exit classifier on the Hugging Face Hub and load it back, as a colleague would.

    python examples/push_pull.py --repo your-name/smollm2-exit [--token hf_...]

Pushes the classifier shipped for the embedded SmolLM2 to `--repo` (created if needed), downloads it into a fresh
model, and checks that it decides as the original. The safetensors encoding needs no trust flag; a joblib-only
artifact from the Hub loads only with `trust_remote_classifier=True`.
"""

import argparse

import torch
from transformers import AutoTokenizer

from adainfer_hf import AutoAdaInferForCausalLM, ExitClassifier
from adainfer_hf.models.default_model import default_model_dir, shipped_classifier_dir


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repo", required=True, help="the Hub repository, e.g. your-name/smollm2-exit")
    p.add_argument("--token", default=None, help="a Hub token with write access (default: your login)")
    args = p.parse_args(argv)
    path = default_model_dir()
    local = ExitClassifier.from_pretrained(shipped_classifier_dir())
    local.push_to_hub(args.repo, token=args.token)
    pulled = ExitClassifier.from_pretrained(args.repo, token=args.token)
    model = AutoAdaInferForCausalLM.from_pretrained(path, exit_classifier=pulled)
    tok = AutoTokenizer.from_pretrained(path)
    inputs = tok(["Q: river\nA:"], return_tensors="pt")
    with torch.no_grad():
        mine = model(**inputs, exit_policy=local).exit_layers
        theirs = model(**inputs).exit_layers
    assert torch.equal(mine, theirs), "the pulled classifier must decide as the pushed one"
    print(f"pushed and pulled {args.repo}: exit layers {theirs.tolist()}, the same as the local artifact")
    return pulled


if __name__ == "__main__":
    main()

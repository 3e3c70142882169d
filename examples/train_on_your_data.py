"""Train and calibrate an exit classifier on your own task, save it, load it back and use it.

    python examples/train_on_your_data.py [--data my_task.jsonl] [--target 0.9] [--out my-exit-classifier]

Your data: a JSON list or JSONL of `{"input": ..., "output": ...}` examples (CSV with those columns works too).
Without `--data` the script writes a small example task (words and their capitalised form) to show the format.
Prompts follow the paper's template; the classifier is calibrated (Learn-then-Test) so that its exits agree with
the full model at the target, or it never exits.
"""

import argparse
import json
from pathlib import Path

from transformers import AutoTokenizer

from adainfer_hf import (
    CalibrationConfig,
    ExitClassifier,
    TrainingConfig,
    build_prompts,
    load_adainfer_model,
    load_task,
    train_and_calibrate,
)
from adainfer_hf.models.default_model import default_model_dir

WORDS = ("apple river paper green night table music stone cloud garden window silver forest bread candle "
         "mountain orange pencil winter summer ocean rabbit basket ladder mirror pillow rocket saddle tiger violin")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", help="your task file (JSON list / JSONL / CSV of input, output)")
    p.add_argument("--target", type=float, default=0.9, help="agreement with the full model (default 0.9)")
    p.add_argument("--limit", type=int, default=24, help="prompts per shots value (default 24)")
    p.add_argument("--out", default="my-exit-classifier")
    args = p.parse_args(argv)
    data = Path(args.data) if args.data else Path("example_task.jsonl")
    if not args.data:
        data.write_text("".join(json.dumps({"input": w, "output": w.capitalize()}) + "\n" for w in WORDS.split()))
    path = default_model_dir()
    model = load_adainfer_model(path, exit_classifier=None)
    tok = AutoTokenizer.from_pretrained(path, padding_side="left")
    task = load_task(str(data))
    prompts = [p for shots in (0, 3) for p in build_prompts(task, shots, limit=args.limit)]
    config = TrainingConfig(method="logistic", calibration=CalibrationConfig(target_agreement=args.target))
    clf, _, calibration = train_and_calibrate(model, tok, prompts, config)
    clf.save_pretrained(args.out)
    model.exit_classifier = ExitClassifier.from_pretrained(args.out)
    L = model.config.num_hidden_layers
    schedule = model.exit_classifier.layers_to_check(L)
    print(f"{len(prompts)} prompts; checks after layers {schedule or 'none (the stock model)'}; saved to {args.out}")
    inputs = tok([p.text for p in prompts[-4:]], return_tensors="pt", padding=True)
    out = model(**inputs, logits_to_keep=1)
    print("exit layers of four prompts:", out.exit_layers.tolist(), f"of {L}")
    return clf


if __name__ == "__main__":
    main()

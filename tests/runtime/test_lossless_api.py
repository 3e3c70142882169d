"""`generate(..., lossless=True)` as a `generate` option: streamers see verified tokens only, stopping criteria /
EOS / `max_new_tokens` / `min_new_tokens` behave as stock, `pipeline("text-generation")` gives the stock text,
options it cannot run are refused by name, an artifact trained for drafting makes it the default, and the
output's counts and scores are what a scripted policy constructs. The reference is always the stock class with
the same weights."""

from __future__ import annotations

import pytest
import torch
from tiny_models import make_pair, task_tokenizer, tiny_pair, tiny_tokenizer
from transformers import StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer, TextStreamer

from adainfer_hf import ExitPolicy, ScriptedExit

L = 4


def _identity_last_layer(variant="llama_gqa"):
    """A pair whose last decoder layer adds nothing, so an exit after layer L-1 drafts the stock token."""
    stock, ada = make_pair(variant)
    for model in (stock, ada):
        last = model.model.layers[-1]
        with torch.no_grad():
            last.self_attn.o_proj.weight.zero_()
            last.mlp.down_proj.weight.zero_()
    return stock, ada


class AlwaysWrong(ExitPolicy):
    """Exits every draft step after layer 1 with the lens' top token knocked out: on `_identity_last_layer` with
    exit at L-1 the runner-up of the stock token, so every draft is wrong and rejected."""

    def __init__(self, layer=L - 1):
        self.features = ("gap", "top_prob")
        self.check_layers = (layer,)
        self.calls = 0

    def decide(self, features, layer, rows, state=None):
        return torch.ones(features.shape[0], dtype=torch.bool, device=features.device)

    def record(self, layer, rows, features, stats, logits):
        logits[torch.arange(logits.shape[0]), logits.argmax(-1)] = -float("inf")
        self.calls += 1


def _prompt(length=6, seed=3):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 99, (1, length), generator=g)
    return ids, torch.ones_like(ids)


def _gen(model, ids, mask, **kw):
    kw.setdefault("max_new_tokens", 8)
    kw.setdefault("do_sample", False)
    kw.setdefault("pad_token_id", 0)
    with torch.no_grad():
        return model.generate(ids, attention_mask=mask, **kw)


# ---------------------------------------------------------------------------------------- streamers
class Recorder(BaseStreamer):
    def __init__(self):
        self.puts, self.ends = [], 0

    def put(self, value):
        self.puts.append(value.tolist())

    def end(self):
        self.ends += 1


@pytest.mark.parametrize("policy", ["always_wrong", "always_right"])
def test_streamer_sees_the_verified_tokens_in_order_and_one_end(policy):
    stock, ada = _identity_last_layer()
    ids, mask = _prompt()
    want = Recorder()
    ref = _gen(stock, ids, mask, max_new_tokens=9, streamer=want)
    got = Recorder()
    scripted = AlwaysWrong() if policy == "always_wrong" else ScriptedExit(L - 1)
    out = _gen(ada, ids, mask, max_new_tokens=9, streamer=got, exit_policy=scripted, lossless=True,
               max_draft_tokens=3, return_dict_in_generate=True)
    assert torch.equal(out.sequences, ref)
    assert int(out.draft_tokens[0]) > 0  # drafts were made (and, always wrong, all rejected)
    if policy == "always_wrong":
        assert int(out.accepted_tokens[0]) == 0
    # the prompt first (as stock streams it), then one put per verified token; end() once
    assert got.puts == want.puts and got.ends == want.ends == 1
    assert got.puts[1:] == [[t] for t in ref[0, ids.shape[1]:].tolist()]


def test_text_streamer_prints_the_stock_text(capsys):
    stock, ada = _identity_last_layer()
    tok = tiny_tokenizer()
    ids, mask = _prompt()
    _gen(stock, ids, mask, streamer=TextStreamer(tok))
    want = capsys.readouterr().out
    _gen(ada, ids, mask, streamer=TextStreamer(tok), exit_policy=AlwaysWrong(), lossless=True)
    assert capsys.readouterr().out == want and want.strip()


# ---------------------------------------------------------------------------------------- stopping
class StopAfter(StoppingCriteria):
    """Stops once the sequence holds `token` anywhere after the prompt (a user criterion)."""

    def __init__(self, prompt_length, token):
        self.prompt_length, self.token = prompt_length, token

    def __call__(self, input_ids, scores, **kwargs):
        return (input_ids[:, self.prompt_length:] == self.token).any(-1)


@pytest.mark.parametrize("policy", ["always_wrong", "always_right"])
def test_custom_stopping_criterion_stops_where_stock_stops(policy):
    stock, ada = _identity_last_layer()
    ids, mask = _prompt()
    free = _gen(stock, ids, mask, max_new_tokens=10)
    token = int(free[0, ids.shape[1] + 4])
    crit = StoppingCriteriaList([StopAfter(ids.shape[1], token)])
    ref = _gen(stock, ids, mask, max_new_tokens=10, stopping_criteria=crit)
    scripted = AlwaysWrong() if policy == "always_wrong" else ScriptedExit(L - 1)
    out = _gen(ada, ids, mask, max_new_tokens=10, stopping_criteria=crit, exit_policy=scripted, lossless=True,
               max_draft_tokens=4)
    assert torch.equal(out, ref) and ref.shape[1] < free.shape[1]


def test_stop_strings_stop_where_stock_stops():
    """`stop_strings` need a tokenizer whose tokens decode to text (the byte-level BPE of `tiny_pair`)."""
    stock, ada = tiny_pair("llama")
    tok = task_tokenizer()
    ids = tok(["Capitalize: apple ->"], return_tensors="pt").input_ids
    mask = torch.ones_like(ids)
    free = _gen(stock, ids, mask, max_new_tokens=10)
    text = tok.decode(free[0, ids.shape[1] + 3:ids.shape[1] + 4])
    assert text.strip()
    ref = _gen(stock, ids, mask, max_new_tokens=10, stop_strings=[text], tokenizer=tok)
    assert ref.shape[1] < free.shape[1]
    for policy in (AlwaysWrong(layer=1), ScriptedExit(1)):
        out = _gen(ada, ids, mask, max_new_tokens=10, stop_strings=[text], tokenizer=tok, exit_policy=policy,
                   lossless=True, max_draft_tokens=4)
        assert torch.equal(out, ref)


@pytest.mark.parametrize("policy", ["always_wrong", "always_right"])
def test_eos_mid_way_pads_as_stock(policy):
    stock, ada = _identity_last_layer()
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(3, 99, (2, 6), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    free = _gen(stock, ids, mask, max_new_tokens=10)
    eos = int(free[0, ids.shape[1] + 2])
    ref = _gen(stock, ids, mask, max_new_tokens=10, eos_token_id=eos)
    scripted = AlwaysWrong() if policy == "always_wrong" else ScriptedExit(L - 1)
    out = _gen(ada, ids, mask, max_new_tokens=10, eos_token_id=eos, exit_policy=scripted, lossless=True,
               max_draft_tokens=4)
    assert torch.equal(out, ref)
    assert (ref[0, ids.shape[1] + 3:] == 0).all()  # row 0 padded after its EOS (the stock reference says so)


@pytest.mark.parametrize("n", [1, 2, 3, 5, 7])
def test_max_new_tokens_never_exceeded_when_every_draft_is_accepted(n):
    """Always-right drafts with a cap far above the budget: a verification that accepts every draft would add a
    bonus token past `max_new_tokens` if the loop let drafts fill the budget."""
    stock, ada = _identity_last_layer()
    ids, mask = _prompt()
    ref = _gen(stock, ids, mask, max_new_tokens=n)
    out = _gen(ada, ids, mask, max_new_tokens=n, exit_policy=ScriptedExit(L - 1), lossless=True,
               max_draft_tokens=16, return_dict_in_generate=True)
    assert torch.equal(out.sequences, ref) and ref.shape[1] == ids.shape[1] + n
    assert out.exit_layers.shape == (1, n)


def test_min_new_tokens_as_stock():
    stock, ada = _identity_last_layer()
    ids, mask = _prompt()
    free = _gen(stock, ids, mask, max_new_tokens=10)
    eos = int(free[0, ids.shape[1] + 1])  # stock would stop at its 2nd token without min_new_tokens
    ref = _gen(stock, ids, mask, max_new_tokens=10, eos_token_id=eos, min_new_tokens=6)
    assert ref.shape[1] >= ids.shape[1] + 6
    for policy in (ScriptedExit(L - 1), AlwaysWrong()):
        out = _gen(ada, ids, mask, max_new_tokens=10, eos_token_id=eos, min_new_tokens=6, exit_policy=policy,
                   lossless=True, max_draft_tokens=3)
        assert torch.equal(out, ref)


# ---------------------------------------------------------------------------------------- pipeline
def test_text_generation_pipeline_gives_the_stock_text():
    from transformers import pipeline

    stock, ada = make_pair("llama_gqa")
    tok = tiny_tokenizer()
    prompt = "w5 w17 w40 w8 w61"
    kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    want = pipeline("text-generation", model=stock, tokenizer=tok)(prompt, **kw)[0]["generated_text"]
    got = pipeline("text-generation", model=ada, tokenizer=tok)(
        prompt, exit_policy=AlwaysWrong(layer=1), lossless=True, **kw)[0]["generated_text"]
    assert got == want and len(got) > len(prompt)


# ---------------------------------------------------------------------------------------- refusals
REFUSED = {
    "num_beams": (dict(num_beams=2), "num_beams=2"),
    "assistant_early_exit": (dict(assistant_early_exit=1), "assistant_early_exit=1"),
    "prompt_lookup_num_tokens": (dict(prompt_lookup_num_tokens=3), "prompt_lookup_num_tokens=3"),
    "cache_implementation": (dict(cache_implementation="static"), "cache_implementation='static'"),
    "exit_cache_propagate": (dict(exit_cache="propagate"), "exit_cache='propagate'"),
    "custom_generate": (dict(custom_generate=lambda *a, **k: None), "custom_generate="),
    "penalty_alpha": (dict(penalty_alpha=0.6, top_k=4), "penalty_alpha=0.6"),
    "dola_layers": (dict(dola_layers="low"), "dola_layers='low'"),
    "output_attentions": (dict(output_attentions=True, return_dict_in_generate=True), "output_attentions=True"),
    "output_hidden_states": (dict(output_hidden_states=True, return_dict_in_generate=True),
                             "output_hidden_states=True"),
    "lossless_value": (dict(lossless="yes"), "lossless"),
    "max_draft_tokens_zero": (dict(max_draft_tokens=0), "max_draft_tokens"),
    "max_draft_tokens_bool": (dict(max_draft_tokens=True), "max_draft_tokens"),
    "max_draft_tokens_float": (dict(max_draft_tokens=2.0), "max_draft_tokens"),
}


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_options_it_cannot_run_are_refused_by_name(name):
    _, ada = make_pair("llama_gqa")
    ids, mask = _prompt()
    kw, expected = REFUSED[name]
    kw = {"lossless": True, **kw}
    with pytest.raises(ValueError) as err:
        _gen(ada, ids, mask, exit_policy=ScriptedExit(1), **kw)
    assert expected in str(err.value)


def test_assistant_model_refused_by_name_pointing_at_lossless():
    stock, ada = make_pair("llama_gqa")
    ids, mask = _prompt()
    for lossless in (True, False):
        with pytest.raises(ValueError, match=r"assistant_model=<LlamaForCausalLM>.*lossless=True"):
            _gen(ada, ids, mask, exit_policy=ScriptedExit(1), assistant_model=stock, lossless=lossless)
    with pytest.raises(ValueError, match="another drafter.*lossless=True"):
        _gen(ada, ids, mask, exit_policy=ScriptedExit(1), prompt_lookup_num_tokens=2, lossless=False)


def test_a_cache_argument_is_refused_by_name():
    from transformers import DynamicCache

    _, ada = make_pair("llama_gqa")
    ids, mask = _prompt()
    with pytest.raises(ValueError, match="DynamicCache"):
        _gen(ada, ids, mask, exit_policy=ScriptedExit(1), lossless=True, past_key_values=DynamicCache())


def test_a_streamer_with_a_batch_is_refused_by_name():
    _, ada = make_pair("llama_gqa")
    ids = torch.randint(3, 99, (2, 5), generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="streamer.*2 rows"):
        _gen(ada, ids, torch.ones_like(ids), exit_policy=ScriptedExit(1), lossless=True, streamer=Recorder())


# ---------------------------------------------------------------------------------------- drafting default
def _artifact(tmp_path, drafting):
    """A classifier that exits after layer 1 at every check (lossy: it changes the tiny model's text), saved with
    `ExitClassifier.save_pretrained` and loaded back, its config saying `drafting`."""
    import numpy as np

    from adainfer_hf import AlwaysExit, ExitClassifier

    path = tmp_path / f"drafting-{drafting}"
    ExitClassifier(AlwaysExit().fit(np.zeros((1, 2))), check_layers=(1,), drafting=drafting).save_pretrained(path)
    loaded = ExitClassifier.from_pretrained(path)
    assert loaded.drafting is drafting
    return loaded


def test_drafting_artifact_makes_generate_lossless_by_default(tmp_path):
    stock, ada = make_pair("llama_gqa")
    ids, mask = _prompt()
    ref = _gen(stock, ids, mask, max_new_tokens=10)
    ada.exit_classifier = _artifact(tmp_path, drafting=False)
    lossy = _gen(ada, ids, mask, max_new_tokens=10, return_dict_in_generate=True)
    assert not torch.equal(lossy.sequences, ref)  # the exits change the text when nothing verifies them
    assert "draft_tokens" not in lossy

    ada.exit_classifier = _artifact(tmp_path, drafting=True)
    out = _gen(ada, ids, mask, max_new_tokens=10, return_dict_in_generate=True)
    assert torch.equal(out.sequences, ref) and int(out.draft_tokens[0]) > 0  # lossless by default
    # lossless=False per call, or an exit_cache named, keeps the old (lossy) behaviour
    for kw in (dict(lossless=False), dict(exit_cache="propagate")):
        again = _gen(ada, ids, mask, max_new_tokens=10, return_dict_in_generate=True, **kw)
        assert torch.equal(again.sequences, lossy.sequences) and "draft_tokens" not in again, kw
    exact = _gen(ada, ids, mask, max_new_tokens=10, return_dict_in_generate=True, exit_cache="exact")
    assert "draft_tokens" not in exact and not torch.equal(exact.sequences, ref)


# ---------------------------------------------------------------------------------------- output fields
def test_return_dict_counts_are_the_scripts_and_scores_are_stocks():
    """Scripted: exit at L-1 every draft step; drafts 2, 5, 8, ... (every third) knocked wrong. With cap 2 the
    counts follow from the script; the scores / logits are the stock full-depth ones."""
    stock, ada = _identity_last_layer()
    ids, mask = _prompt()
    n, cap = 12, 2
    ref = _gen(stock, ids, mask, max_new_tokens=n, output_scores=True, output_logits=True,
               return_dict_in_generate=True)

    class Every3rdWrong(AlwaysWrong):
        def record(self, layer, rows, features, stats, logits):
            if self.calls % 3 == 2:
                logits[torch.arange(logits.shape[0]), logits.argmax(-1)] = -float("inf")
            self.calls += 1

    out = _gen(ada, ids, mask, max_new_tokens=n, exit_policy=Every3rdWrong(), lossless=True, max_draft_tokens=cap,
               output_scores=True, output_logits=True, return_dict_in_generate=True)
    # the script, by hand: token 1 from the prefill; then runs of min(cap, left - 1) drafts
    made, call, drafted, accepted, layers = 1, 0, 0, 0, [L]
    while made < n:
        k = min(cap, n - made - 1)
        run = [(call + i) % 3 == 2 for i in range(k)]
        call += k
        drafted += k
        good = run.index(True) if True in run else k
        accepted += good
        layers += [L - 1] * good + [L]
        made += good + 1
    assert torch.equal(out.sequences, ref.sequences)
    assert out.draft_tokens.tolist() == [drafted] and out.accepted_tokens.tolist() == [accepted]
    assert out.exit_layers.tolist() == [layers[:n]]
    assert 0 < accepted < drafted
    assert len(out.scores) == len(ref.scores) == n and len(out.logits) == len(ref.logits) == n
    for got, want in zip(out.scores, ref.scores, strict=True):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    for got, want in zip(out.logits, ref.logits, strict=True):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)

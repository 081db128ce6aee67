"""The tiny fixture checkpoints are what they claim, and the reference scorers behave."""

from __future__ import annotations

import math
import os

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoTokenizer

from tests import reference
from tests.fixtures import tiny_models
from tests.fixtures.paths import FIXTURE_NAMES, fixture_dir

os.environ.setdefault("HF_HUB_OFFLINE", "1")

QUERY = "What is the capital of China?"
DOCUMENTS = [
    "The capital of China is Beijing.",
    "Gravity is a force that attracts two bodies towards each other.",
    "北京是中国的首都。🚀",
    "yes no yes no",
    "Paris is the capital of France, a city on the Seine.",
]

EXPECTED = {
    # name: (tokenizer class, architecture)
    "qwen3": ("Qwen2Tokenizer", "Qwen3ForCausalLM"),
    "gemma": ("GemmaTokenizer", "GemmaForCausalLM"),
    "xlmr": ("XLMRobertaTokenizer", "XLMRobertaForSequenceClassification"),
    "bert": ("BertTokenizer", "BertForSequenceClassification"),
    "qwen3-seq-cls": ("Qwen2Tokenizer", "Qwen3ForSequenceClassification"),
}

SCORERS = {
    "qwen3": reference.qwen3_reference,
    "qwen3-seq-cls": reference.qwen3_seq_cls_reference,
    "gemma": reference.bge_gemma_reference,
    "xlmr": reference.cross_encoder_reference,
    "bert": reference.cross_encoder_reference,
}

BUILDERS = {
    "qwen3": tiny_models.build_qwen3_reranker,
    "gemma": tiny_models.build_bge_gemma,
    "xlmr": tiny_models.build_xlmr_cross_encoder,
    "bert": tiny_models.build_bert_cross_encoder,
}


def _tok(name: str):
    return AutoTokenizer.from_pretrained(fixture_dir(name))


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_loads_like_a_hub_checkpoint(name):
    path = fixture_dir(name)
    assert (path / "config.json").is_file() and (path / "model.safetensors").is_file()
    assert (path / "tokenizer.json").is_file() and (path / "tokenizer_config.json").is_file()
    tok = AutoTokenizer.from_pretrained(path)
    config = AutoConfig.from_pretrained(path)
    tok_class, arch = EXPECTED[name]
    assert type(tok).__name__ == tok_class
    assert config.architectures == [arch]
    assert config.vocab_size == len(tok)
    if arch.endswith("ForSequenceClassification"):
        assert config.num_labels == 1


def test_fixture_dir_is_cached_and_rejects_unknown_names():
    assert fixture_dir("bert") == fixture_dir("bert")
    with pytest.raises(KeyError):
        fixture_dir("llama")


# ---------------------------------------------------------------------------------------------
# Tokenizers
# ---------------------------------------------------------------------------------------------


def test_qwen3_tokenizer_specials():
    tok = _tok("qwen3")
    n = len(tok)
    ids = tok.convert_tokens_to_ids(
        ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]
    )
    assert ids == list(range(n - 5, n))  # after the BPE vocabulary, in Qwen's order
    assert tok.bos_token is None
    assert tok.eos_token == "<|im_end|>" and tok.eos_token_id == ids[2]
    assert tok.pad_token == "<|endoftext|>" and tok.pad_token_id == ids[0]
    assert tok.model_max_length == 32768
    # no BOS (or EOS) added
    assert tok("hello world")["input_ids"] == tok.encode("hello world", add_special_tokens=False)
    for word in ("yes", "no"):
        word_ids = tok.encode(word, add_special_tokens=False)
        assert len(word_ids) == 1
        assert word_ids[0] == tok.convert_tokens_to_ids(word)
    suffix = tok.encode(reference.QWEN3_SUFFIX, add_special_tokens=False)
    assert ids[2] in suffix and ids[1] in suffix and ids[3] in suffix and ids[4] in suffix
    assert tok.decode(suffix) == reference.QWEN3_SUFFIX
    # special tokens written in a text are recognised as single ids
    assert tok.encode("a<|im_end|>b", add_special_tokens=False)[1] == ids[2]


def test_gemma_tokenizer_specials():
    tok = _tok("gemma")
    assert tok.convert_tokens_to_ids(["<pad>", "<eos>", "<bos>", "<unk>"]) == [0, 1, 2, 3]
    assert (tok.pad_token_id, tok.eos_token_id, tok.bos_token_id, tok.unk_token_id) == (0, 1, 2, 3)
    with_specials = tok("hello world")["input_ids"]
    without = tok("hello world", add_special_tokens=False)["input_ids"]
    assert with_specials == [2] + without
    assert len(tok("Yes", add_special_tokens=False)["input_ids"]) == 1
    assert tok.convert_tokens_to_ids("<0x41>") != tok.unk_token_id  # byte-fallback pieces exist
    config = AutoConfig.from_pretrained(fixture_dir("gemma"))
    assert config.tie_word_embeddings
    assert (config.pad_token_id, config.eos_token_id, config.bos_token_id) == (0, 1, 2)


def test_xlmr_tokenizer_and_pair_layout():
    tok = _tok("xlmr")
    assert tok.convert_tokens_to_ids(["<s>", "<pad>", "</s>", "<unk>"]) == [0, 1, 2, 3]
    assert tok.mask_token_id == len(tok) - 1
    assert tok.model_max_length == 512
    q = tok("what is gravity", add_special_tokens=False)["input_ids"]
    d = tok("gravity is a force", add_special_tokens=False)["input_ids"]
    enc = tok("what is gravity", "gravity is a force")
    assert enc["input_ids"] == [0] + q + [2, 2] + d + [2]
    assert not any(enc.get("token_type_ids", [0]))
    config = AutoConfig.from_pretrained(fixture_dir("xlmr"))
    assert config.max_position_embeddings == 514 and config.pad_token_id == 1


def test_bert_tokenizer_and_pair_layout():
    tok = _tok("bert")
    assert tok.model_max_length == 512
    cls, sep = tok.cls_token_id, tok.sep_token_id
    q = tok("What is Gravity", add_special_tokens=False)["input_ids"]
    d = tok("gravity is a force", add_special_tokens=False)["input_ids"]
    assert q == tok("what is gravity", add_special_tokens=False)["input_ids"]  # lowercase
    enc = tok("What is Gravity", "gravity is a force")
    assert enc["input_ids"] == [cls] + q + [sep] + d + [sep]
    assert enc["token_type_ids"] == [0] * (len(q) + 2) + [1] * (len(d) + 1)
    assert (fixture_dir("bert") / "vocab.txt").is_file()


@pytest.mark.parametrize(
    ("name", "text"),
    [
        ("qwen3", "北京是中国的首都。 😀🚀 and unseen 龘 🦄 café\n\n  spaced"),
        ("gemma", "北京是中国的首都。 😀🚀 and unseen 龘 🦄 café\n\n  spaced"),
        ("xlmr", "北京是中国的首都。 😀 🚀 The capital of China is Beijing."),
    ],
)
def test_cjk_and_emoji_round_trip(name, text):
    tok = _tok(name)
    ids = tok.encode(text, add_special_tokens=False)
    assert tok.unk_token_id is None or tok.unk_token_id not in ids
    assert tok.decode(ids) == text


# ---------------------------------------------------------------------------------------------
# Reference scorers
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_reference_scores_finite_and_spread(name):
    results = SCORERS[name](fixture_dir(name), QUERY, DOCUMENTS)
    assert len(results) == len(DOCUMENTS)
    scores = [score for _, score in results]
    assert all(math.isfinite(s) for s in scores)
    assert max(scores) - min(scores) > 0.1
    assert len({round(s, 4) for s in scores}) == len(scores)


def test_qwen3_reference_ids_follow_the_recipe():
    tok = _tok("qwen3")
    prefix = tok.encode(reference.QWEN3_PREFIX, add_special_tokens=False)
    suffix = tok.encode(reference.QWEN3_SUFFIX, add_special_tokens=False)
    doc = DOCUMENTS[0]
    body = f"<Instruct>: {reference.QWEN3_DEFAULT_INSTRUCTION}\n<Query>: {QUERY}\n<Document>: {doc}"
    ((ids, _),) = reference.qwen3_reference(fixture_dir("qwen3"), QUERY, [doc])
    assert ids == prefix + tok.encode(body, add_special_tokens=False) + suffix
    # truncation cuts the end of the body only
    max_len = len(prefix) + len(suffix) + 20
    ((ids, _),) = reference.qwen3_reference(fixture_dir("qwen3"), QUERY, [doc], max_length=max_len)
    assert len(ids) == max_len
    assert ids == prefix + tok.encode(body, add_special_tokens=False)[:20] + suffix


def test_bge_gemma_reference_ids_follow_the_recipe():
    tok = _tok("gemma")
    enc = lambda s: tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    sep, prompt = enc("\n"), enc(reference.BGE_GEMMA_DEFAULT_PROMPT)
    doc = DOCUMENTS[1]
    ((ids, _),) = reference.bge_gemma_reference(fixture_dir("gemma"), QUERY, [doc])
    assert ids == [tok.bos_token_id] + enc(f"A: {QUERY}") + sep + enc(f"B: {doc}") + sep + prompt
    # a long passage is cut at the end of the passage part only
    long_doc = "gravity " * 200
    L = 32
    ((ids, _),) = reference.bge_gemma_reference(
        fixture_dir("gemma"), QUERY, [long_doc], max_length=L
    )
    query_part = [tok.bos_token_id] + enc(f"A: {QUERY}")[: L * 3 // 4]
    passage = enc(f"B: {long_doc}")[:L]  # first cut: the passage alone to L tokens
    keep = L + len(sep) + len(prompt) - len(query_part) - len(sep)  # only_second budget
    assert ids == query_part + sep + passage[:keep] + sep + prompt
    assert len(ids) <= L + 2 * (len(sep) + len(prompt))
    # a long query is cut to 3/4 L, and then the pair budget cuts the passage
    long_query = "capital " * 100
    ((ids, _),) = reference.bge_gemma_reference(
        fixture_dir("gemma"), long_query, [long_doc], prompt="Yes?", max_length=L
    )
    prompt = enc("Yes?")
    query_part = [tok.bos_token_id] + enc(f"A: {long_query}")[: L * 3 // 4]
    keep = L + len(sep) + len(prompt) - len(query_part) - len(sep)
    assert 0 < keep < L
    assert ids == query_part + sep + passage[:keep] + sep + prompt


@pytest.mark.parametrize("name", ["xlmr", "bert"])
def test_cross_encoder_reference_equals_flagembedding_for_short_queries(name):
    docs = DOCUMENTS + ["", "word " * 300]
    plain = reference.cross_encoder_reference(fixture_dir(name), QUERY, docs, max_length=64)
    flag = reference.flag_cross_encoder_reference(fixture_dir(name), QUERY, docs, max_length=64)
    assert [ids for ids, _ in plain] == [ids for ids, _ in flag]
    assert [s for _, s in plain] == pytest.approx([s for _, s in flag], abs=1e-6)
    assert len(plain[-1][0]) == 64  # the long document was cut to fit


@pytest.mark.parametrize("name", ["xlmr", "bert"])
def test_flag_cross_encoder_reference_cuts_long_queries(name):
    tok = _tok(name)
    long_query = "capital city question " * 40
    results = reference.flag_cross_encoder_reference(
        fixture_dir(name), long_query, [DOCUMENTS[0], "word " * 300], max_length=64
    )
    q = tok(long_query, add_special_tokens=False)["input_ids"][: 64 * 3 // 4]
    d = tok(DOCUMENTS[0], add_special_tokens=False)["input_ids"]
    (short_ids, short_score), (long_ids, long_score) = results
    n_special = tok.num_special_tokens_to_add(pair=True)
    assert len(short_ids) == len(q) + len(d) + n_special < 64
    assert short_ids[1 : 1 + len(q)] == q and long_ids[1 : 1 + len(q)] == q
    assert len(long_ids) == 64
    assert math.isfinite(short_score) and math.isfinite(long_score)


def test_qwen3_seq_cls_conversion_is_exact():
    causal = reference.qwen3_reference(fixture_dir("qwen3"), QUERY, DOCUMENTS)
    seq_cls = reference.qwen3_seq_cls_reference(fixture_dir("qwen3-seq-cls"), QUERY, DOCUMENTS)
    assert [ids for ids, _ in causal] == [ids for ids, _ in seq_cls]
    assert [s for _, s in seq_cls] == pytest.approx([s for _, s in causal], abs=1e-4)

    tok = _tok("qwen3")
    causal_w = load_file(fixture_dir("qwen3") / "model.safetensors")
    cls_w = load_file(fixture_dir("qwen3-seq-cls") / "model.safetensors")
    yes, no = tok.convert_tokens_to_ids("yes"), tok.convert_tokens_to_ids("no")
    head = causal_w["lm_head.weight"]
    assert not torch.equal(head, causal_w["model.embed_tokens.weight"])  # untied by default
    assert torch.equal(cls_w["score.weight"], (head[yes] - head[no]).unsqueeze(0))
    for key, value in cls_w.items():
        if key != "score.weight":
            assert torch.equal(value, causal_w[key]), key
    assert AutoConfig.from_pretrained(fixture_dir("qwen3-seq-cls")).pad_token_id == tok.pad_token_id


# ---------------------------------------------------------------------------------------------
# Determinism
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", [*BUILDERS, "qwen3-seq-cls"])
def test_builds_are_deterministic(name, tmp_path):
    """A rebuild gives the same files: configs and tokenizers byte for byte, weights to float
    rounding. Not bit for bit: the LM fixtures calibrate their score head with a forward
    pass, whose last bits may follow the kernels this process has warmed up by then (seen
    once in a full-suite run: one lm_head value one ulp apart)."""
    if name == "qwen3-seq-cls":
        fresh = tiny_models.build_qwen3_seq_cls(tmp_path / name, fixture_dir("qwen3"))
    else:
        fresh = BUILDERS[name](tmp_path / name)
    cached = fixture_dir(name)
    files = sorted(p.name for p in fresh.iterdir())
    assert files == sorted(p.name for p in cached.iterdir() if not p.name.startswith("."))
    for file in files:
        if file.endswith(".safetensors"):
            fresh_weights, cached_weights = load_file(fresh / file), load_file(cached / file)
            assert fresh_weights.keys() == cached_weights.keys()
            for key, tensor in fresh_weights.items():
                torch.testing.assert_close(tensor, cached_weights[key], rtol=1e-5, atol=1e-6)
        else:
            assert (fresh / file).read_bytes() == (cached / file).read_bytes(), file
    again = SCORERS[name](fresh, QUERY, DOCUMENTS[:3])
    first = SCORERS[name](cached, QUERY, DOCUMENTS[:3])
    assert [ids for ids, _ in again] == [ids for ids, _ in first]
    assert [score for _, score in again] == pytest.approx([score for _, score in first], abs=1e-5)

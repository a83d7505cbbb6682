"""EOS, BOS and prompt token ids on the real tokenizers (transformers 5 can silently drop EOS)."""

import pytest

from sfr_export.errors import UserInputError
from sfr_export.models import load_tokenizer, resolve_model
from sfr_export.spec import E5_QUERY_TEMPLATE
from sfr_export.tokenization import TextTokenizer, Truncation


@pytest.fixture(scope="module")
def mistral():
    r = resolve_model("demo:tiny-mistral", compute_fingerprint=False)
    return TextTokenizer(load_tokenizer(r.local_dir), r.spec)


def test_real_mistral_tokenizer_has_full_vocab(mistral):
    assert mistral.vocab_size == 32000
    assert mistral.tok.eos_token_id == 2 and mistral.tok.bos_token_id == 1


def test_every_sequence_is_bos_text_eos(mistral):
    enc = mistral.encode(["Hello world", "A man is playing a guitar."])
    # "Hello world" in the Mistral-7B-v0.1 sentencepiece vocabulary is ▁Hello=22557, ▁world=1526.
    assert enc.ids[0] == [1, 22557, 1526, 2]
    for ids in enc.ids:
        assert ids[0] == 1 and ids[-1] == 2 and ids.count(2) == 1


def test_eos_survives_truncation_and_reserves_one_slot(mistral):
    enc = mistral.encode(["word " * 1000])
    ids = enc.ids[0]
    assert len(ids) == mistral.spec.max_length == 128
    assert ids[0] == 1 and ids[-1] == 2 and ids[-2] != 2
    assert enc.truncated == 1


def test_truncation_error_policy(mistral):
    strict = TextTokenizer(mistral.tok, mistral.spec, truncation=Truncation.ERROR)
    with pytest.raises(UserInputError, match="over the limit"):
        strict.encode(["word " * 1000])


def test_query_prompt_token_ids(mistral):
    spec = mistral.spec
    text = spec.apply_prompt(["how do vaccines work?"], "TRECCOVID")[0]
    assert text == E5_QUERY_TEMPLATE.format(instruction="Given a query on COVID-19, retrieve documents that answer the query",
                                           text="how do vaccines work?")
    ids = mistral.encode([text]).ids[0]
    instruct_ids = mistral.tok("Instruct:", add_special_tokens=False)["input_ids"]
    assert ids[1:1 + len(instruct_ids)] == instruct_ids
    assert ids[-1] == 2
    # documents get no instruction for retrieval tasks; named sentence-transformers prompts are prefixes
    assert spec.apply_prompt(["doc"], "TRECCOVID", side="document") == ["doc"]
    assert spec.apply_prompt(["q"], "sts_query") == ["Instruct: Retrieve semantically similar text.\nQuery: q"]
    with pytest.raises(UserInputError, match="unknown prompt"):
        spec.apply_prompt(["q"], "NoSuchTask")


def test_empty_inputs_are_refused(mistral):
    with pytest.raises(UserInputError, match="empty"):
        mistral.encode([])
    with pytest.raises(UserInputError, match="empty or whitespace"):
        mistral.encode(["ok", "   "])


def test_minilm_keeps_cls_sep_and_appends_no_eos():
    r = resolve_model("demo:minilm", compute_fingerprint=False)
    tt = TextTokenizer(load_tokenizer(r.local_dir), r.spec)
    ids = tt.encode(["hello world", "word " * 600]).ids
    assert ids[0] == [101, 7592, 2088, 102]
    assert len(ids[1]) == 256 and ids[1][0] == 101 and ids[1][-1] == 102


@pytest.mark.slow
def test_smollm2_appends_im_end_eos():
    r = resolve_model("demo:smollm2", compute_fingerprint=False)
    tt = TextTokenizer(load_tokenizer(r.local_dir), r.spec)
    assert r.spec.append_eos and tt.eos_id == tt.tok.convert_tokens_to_ids("<|im_end|>")
    for ids in tt.encode(["hello world", "word " * 2000]).ids:
        assert ids[-1] == tt.eos_id and ids.count(tt.eos_id) == 1 and len(ids) <= 512

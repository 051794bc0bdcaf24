"""Prompt template and token-budget truncation (tsarank.prompts), checked against independent tokenizations."""

from __future__ import annotations

import pytest

from conftest import build_tiny_tokenizer
from tsarank.prompts import EncodedPair, PromptTemplate, check_query, encode_pairs

LONG_DOC = " ".join(f"word{i} the capital of france is paris" for i in range(40))
MOJIBAKE = "It\u00e2\u0080\u0099s 30\u00c2\u00b0C in Caf\u00e9 na\u00efve"
NON_LATIN = "\u6771\u4eac\u306f\u65e5\u672c\u306e\u9996\u90fd\u3067\u3059\u3002 \u0645\u0631\u062d\u0628\u0627 \u041f\u0440\u0438\u0432\u0435\u0442"


def toks(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def independent_span(tokenizer, source: str, full: str) -> tuple[int, int]:
    """Query span found by tokenizing the source and the full text separately.

    Valid for tokenizers that add no special tokens (the tiny one) when the source's tokens are a prefix of the
    full text's tokens (asserted): the query is then everything after the source's tokens.
    """
    src = tokenizer(source)["input_ids"]
    ids = tokenizer(full)["input_ids"]
    assert ids[: len(src)] == src, "source is not a token prefix of the full text"
    return len(src), len(ids)


def test_doc_over_budget_cut_to_exactly_budget_tokens(tiny_tokenizer):
    template = PromptTemplate(max_doc_tokens=7, max_query_tokens=32)
    assert len(toks(tiny_tokenizer, LONG_DOC)) > 7
    (enc,) = encode_pairs(tiny_tokenizer, template, ["capital of france"], [LONG_DOC])
    text = tiny_tokenizer.decode(enc.input_ids)
    assert text.startswith("Document: ") and text.endswith(" Query: capital of france")
    kept = text[len("Document: ") : -len(" Query: capital of france")]
    # The kept document is a prefix of the original whose tokens are exactly the first 7 original tokens.
    assert LONG_DOC.startswith(kept)
    assert toks(tiny_tokenizer, kept) == toks(tiny_tokenizer, LONG_DOC)[:7]
    # And the model input is exactly the tokenization of that filled-in text.
    assert enc.input_ids == tiny_tokenizer("Document: " + kept + " Query: capital of france")["input_ids"]


def test_doc_within_budget_is_unchanged(tiny_tokenizer):
    doc = "Paris is the capital of France."
    (enc,) = encode_pairs(tiny_tokenizer, PromptTemplate(max_doc_tokens=len(toks(tiny_tokenizer, doc))), ["q"], [doc])
    assert tiny_tokenizer.decode(enc.input_ids) == f"Document: {doc} Query: q"


def test_query_over_budget_truncated_template_intact(tiny_tokenizer):
    query = "what is the capital of france and why is paris the largest city of france"
    template = PromptTemplate(max_doc_tokens=64, max_query_tokens=5)
    (enc,) = encode_pairs(tiny_tokenizer, template, [query], ["Paris is the capital."])
    text = tiny_tokenizer.decode(enc.input_ids)
    assert text.startswith("Document: Paris is the capital. Query: ")
    kept = text[len("Document: Paris is the capital. Query: ") :]
    assert query.startswith(kept) and kept  # a prefix of the query, not empty
    assert toks(tiny_tokenizer, kept) == toks(tiny_tokenizer, query)[:5]
    # The scored span is exactly the truncated query's tokens in context.
    start, end = independent_span(tiny_tokenizer, "Document: Paris is the capital. Query:", text)
    assert (enc.target_start, enc.target_end) == (start, end)
    assert tiny_tokenizer.decode(enc.input_ids[enc.target_start : enc.target_end]) == " " + kept


@pytest.mark.parametrize(
    "query, doc",
    [
        ("what is the capital of france", "Paris is the capital and largest city of France."),
        ("banana fruit", "Bananas are an elongated edible fruit."),
        ("mitochondria", ""),
        ("caf\u00e9 na\u00efve", MOJIBAKE),
        ("\u6771\u4eac", NON_LATIN),
    ],
)
def test_query_span_matches_independent_tokenization(tiny_tokenizer, query, doc):
    template = PromptTemplate()
    (enc,) = encode_pairs(tiny_tokenizer, template, [query], [doc])
    source = template.source.format(doc=doc)
    full = source + template.target.format(query=query)
    assert enc.input_ids == tiny_tokenizer(full)["input_ids"]
    assert (enc.target_start, enc.target_end) == independent_span(tiny_tokenizer, source, full)
    assert tiny_tokenizer.decode(enc.input_ids[enc.target_start : enc.target_end]) == " " + query


def test_query_span_excludes_special_tokens_added_by_tokenizer():
    """A tokenizer that wraps sequences in BOS ... EOS: the span covers the query only, not the EOS."""
    from tokenizers.processors import TemplateProcessing

    from conftest import build_tiny_tokenizer

    tok = build_tiny_tokenizer()
    bos, eos = tok.bos_token_id, tok.eos_token_id
    tok._tokenizer.post_processor = TemplateProcessing(
        single="<|im_start|> $A <|im_end|>", special_tokens=[("<|im_start|>", bos), ("<|im_end|>", eos)]
    )
    (enc,) = encode_pairs(tok, PromptTemplate(), ["capital of france"], ["Paris."])
    assert enc.input_ids[0] == bos and enc.input_ids[-1] == eos
    plain = toks(tok, "Document: Paris. Query: capital of france")
    src = toks(tok, "Document: Paris. Query:")
    assert enc.input_ids[1:-1] == plain
    assert (enc.target_start, enc.target_end) == (1 + len(src), 1 + len(plain))


def test_empty_doc_works(tiny_tokenizer):
    (enc,) = encode_pairs(tiny_tokenizer, PromptTemplate(), ["banana"], [""])
    assert tiny_tokenizer.decode(enc.input_ids) == "Document:  Query: banana"
    assert tiny_tokenizer.decode(enc.input_ids[enc.target_start : enc.target_end]) == " banana"


@pytest.mark.parametrize("doc", [MOJIBAKE, NON_LATIN])
@pytest.mark.parametrize("budget", [1, 2, 3, 5, 8, 13])
def test_mojibake_and_non_latin_truncation(tiny_tokenizer, doc, budget):
    """Byte-level tokens can split a multi-byte character: the cut keeps an exact prefix (no U+FFFD)."""
    template = PromptTemplate(max_doc_tokens=budget)
    (enc,) = encode_pairs(tiny_tokenizer, template, ["what"], [doc])
    text = tiny_tokenizer.decode(enc.input_ids)
    kept = text[len("Document: ") : -len(" Query: what")]
    assert doc.startswith(kept)
    assert "\ufffd" not in text
    assert len(toks(tiny_tokenizer, kept)) <= budget
    assert tiny_tokenizer.decode(enc.input_ids[enc.target_start : enc.target_end]) == " what"


def test_last_token_template_ends_with_eos(tiny_tokenizer):
    template = PromptTemplate.last_token()
    encs = encode_pairs(tiny_tokenizer, template, ["how tall is everest", "q"], ["Mount Everest is 8,849 m.", ""])
    for enc, (q, d) in zip(encs, [("how tall is everest", "Mount Everest is 8,849 m."), ("q", "")]):
        assert enc.input_ids[-1] == tiny_tokenizer.eos_token_id
        assert (enc.target_start, enc.target_end) == (len(enc.input_ids) - 1, len(enc.input_ids))
        assert enc.input_ids == tiny_tokenizer(f"query: {q} document: {d}" + tiny_tokenizer.eos_token)["input_ids"]


def test_batch_encoding_equals_one_by_one(tiny_tokenizer):
    template = PromptTemplate(max_doc_tokens=9, max_query_tokens=4)
    queries = ["what is the capital of france", "banana", "\u6771\u4eac", "mitochondria powerhouse of the cell"]
    docs = [LONG_DOC, "", NON_LATIN, MOJIBAKE]
    together = encode_pairs(tiny_tokenizer, template, queries, docs)
    alone = [encode_pairs(tiny_tokenizer, template, [q], [d])[0] for q, d in zip(queries, docs)]
    assert together == alone
    assert all(isinstance(e, EncodedPair) for e in together)


def test_errors(tiny_tokenizer):
    with pytest.raises(ValueError, match="2 queries but 1 docs"):
        encode_pairs(tiny_tokenizer, PromptTemplate(), ["a", "b"], ["x"])
    assert encode_pairs(tiny_tokenizer, PromptTemplate(), [], []) == []
    with pytest.raises(ValueError, match="empty"):
        check_query("   ")
    with pytest.raises(TypeError, match="str"):
        check_query(3)
    with pytest.raises(ValueError, match="doc"):
        PromptTemplate(source="Passage: Query:")
    with pytest.raises(ValueError, match="query"):
        PromptTemplate(target=" {q}")
    with pytest.raises(ValueError, match="scoring_head"):
        PromptTemplate(scoring_head="cls")
    assert PromptTemplate.from_dict(PromptTemplate.last_token().to_dict() | {"unknown": 1}) == PromptTemplate.last_token()


# ------------------------------------------------------------------------------------------ released constructions
LONG = " ".join(f"word{i} is here, and (this) part: {i * 7}" for i in range(120))  # > 512 tokens


def released_rankinggpt_eval(tokenizer, query: str, passage: str) -> tuple[list[int], int]:
    """RankingGPT's eval.py, written out as released: (input ids, number of source tokens = the label mask)."""
    prompt = "Document: {doc} Query:"
    prompt_len = len(tokenizer.encode(prompt))
    query = query.replace("[PAD]", "PAD")
    passage_max_len = 512 - prompt_len - len(tokenizer.encode(query)) - 10
    doc = tokenizer.decode(tokenizer.encode(passage, max_length=passage_max_len, add_special_tokens=False,
                                            truncation=True))
    source = prompt.format(doc=doc).replace("[PAD]", "PAD")
    return tokenizer(source + query)["input_ids"], len(tokenizer(source)["input_ids"])


def released_rankinggpt_sft(tokenizer, query: str, passage: str, len_query=32, len_doc=128) -> tuple[list[int], int]:
    """RankingGPT's sft.py SupervisedDataset, as released."""
    def truncation(text, length):
        return tokenizer.decode(tokenizer.encode(text, max_length=length, add_special_tokens=False, truncation=True))

    query = truncation(query, len_query)
    source = "Document: {passage} Query:".format(passage=truncation(passage, len_doc))
    return tokenizer(source + query)["input_ids"], len(tokenizer(source)["input_ids"])


@pytest.mark.parametrize("which", ["tiny", "default_model"])
def test_rankinggpt_template_equals_the_released_construction(which, tiny_tokenizer, request):
    """Same token ids and the same scored span as RankingGPT's eval.py and sft.py, long documents included; the
    query follows 'Query:' with no space, unlike tsarank's own template."""
    if which == "tiny":
        tok = tiny_tokenizer
    else:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(request.getfixturevalue("default_model_dir"))
    pairs = [("what is the capital of france", "Paris is the capital and largest city of France."),
             ("long document query", LONG), ("a b c", "")]
    evaluation = PromptTemplate.named("rankinggpt")
    training = PromptTemplate.named("rankinggpt", max_doc_tokens=128, max_query_tokens=32, max_length=None)
    for template, released in ((evaluation, released_rankinggpt_eval), (training, released_rankinggpt_sft)):
        got = encode_pairs(tok, template, [q for q, _ in pairs], [d for _, d in pairs])
        for (q, d), e in zip(pairs, got):
            ids, n_source = released(tok, q, d)
            assert e.input_ids == ids and (e.target_start, e.target_end) == (n_source, len(ids)), (q, template)
    own = encode_pairs(tok, PromptTemplate(), [pairs[0][0]], [pairs[0][1]])[0]
    released_ids, _ = released_rankinggpt_eval(tok, *pairs[0])
    assert own.input_ids != released_ids  # " what" vs "what": the first query token differs


def test_rankinggpt_query_within_budget_kept_as_written():
    """The one deliberate difference from sft.py's construction: sft.py round-trips every query through
    ``decode(encode(q)[:32])``, tsarank only a query over its budget (eval.py never does, so training and scoring
    see the same query). It shows with a tokenizer whose round trip changes the text: here one that strips spaces."""
    from tokenizers import normalizers

    tok = build_tiny_tokenizer()
    tok._tokenizer.normalizer = normalizers.Strip()
    query, doc = "  what is the capital of france", "Paris is the capital of France."
    assert tok.decode(tok(query, add_special_tokens=False)["input_ids"]) != query  # the round trip changes it
    training = PromptTemplate.named("rankinggpt", max_doc_tokens=128, max_query_tokens=32, max_length=None)
    got = encode_pairs(tok, training, [query], [doc])[0]
    source = "Document: {doc} Query:".format(doc=tok.decode(tok(doc, add_special_tokens=False)["input_ids"]))
    assert got.input_ids == tok(source + query)["input_ids"]  # as written, as eval.py scores it
    assert got.input_ids != released_rankinggpt_sft(tok, query, doc)[0]  # sft.py trained on the round trip

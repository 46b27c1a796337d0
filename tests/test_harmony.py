"""GPT-OSS's harmony messages (`--reasoning-parser openai_gptoss`): the analysis channel goes
to reasoning_content, final and commentary to content, markers removed, the same whole and
streamed at every chunk size; through the server on a model whose tokenizer has harmony's
special tokens: a reply forced into harmony's shape with a regex, and the markers kept in the
text for the parser (skip_special_tokens off for such requests)."""

from __future__ import annotations

import pytest
from server_helpers import openai_client, serving

from pagedserve.reasoning import ReasoningSplitter

MODEL = "tiny-harmony"
HARMONY_TOKENS = ["<|start|>", "<|channel|>", "<|message|>", "<|end|>", "<|return|>", "<|call|>", "<|constrain|>"]
A, F = "<|channel|>analysis<|message|>", "<|start|>assistant<|channel|>final<|message|>"


@pytest.mark.parametrize("text, want", [
    (A + "2 + 2 is 4.<|end|>" + F + "It is 4.", ("2 + 2 is 4.", "It is 4.")),
    (A + "still thinking", ("still thinking", None)),  # cut short
    (A + "done<|end|><|start|>assistant<|channel|>commentary<|message|>Checking.<|end|>" + F + "Yes.",
     ("done", "Checking.Yes.")),  # a preamble (commentary) is content
    ("<|channel|>final<|message|>No thinking.", (None, "No thinking.")),
    (A + "a<|end|><|start|>assistant<|channel|>analysis<|message|>b<|end|>" + F + "c<|return|>", ("ab", "c")),
    ('{"x": 1}', (None, '{"x": 1}')),  # no harmony at all (a grammar from the first token): the answer
    (A + "a < b <|end|>" + F + "x <| y", ("a < b ", "x <| y")),  # "<" and "<|" that open no marker
])
def test_split_whole_and_streamed(text, want):
    assert ReasoningSplitter.split("openai_gptoss", text) == want
    for size in (1, 2, 3, 7):
        s = ReasoningSplitter("openai_gptoss")
        parts = [s.feed(text[i:i + size]) for i in range(0, len(text), size)] + [s.finish()]
        reasoning, content = "".join(r for r, _ in parts), "".join(c for _, c in parts)
        assert (reasoning if want[0] is not None else None, content or None) == want, size


@pytest.fixture(scope="module")
def harmony_dir(tmp_path_factory):
    """A tiny Llama whose tokenizer carries harmony's markers as special tokens."""
    from pagedserve.model.random_model import build_random_model, build_tokenizer

    tok_dir = str(tmp_path_factory.mktemp("harmony_tok"))
    tok = build_tokenizer(tok_dir, 1024)
    tok.add_special_tokens({"additional_special_tokens": HARMONY_TOKENS})
    tok.save_pretrained(tok_dir)
    return build_random_model(str(tmp_path_factory.mktemp("harmony")), tokenizer_dir=tok_dir, initializer_range=0.5)


@pytest.fixture(scope="module")
def client(harmony_dir):
    pytest.importorskip("xgrammar")
    with serving(harmony_dir, MODEL, reasoning_parser="openai_gptoss") as srv:
        with openai_client(srv) as c:
            yield c


def test_harmony_reply_whole_and_streamed(client):
    kwargs = dict(model=MODEL, messages=[{"role": "user", "content": "Think first."}], temperature=0, max_tokens=80,
                  extra_body={"structured_outputs": {"regex": r"<\|channel\|>analysis<\|message\|>[a-z]{2,6} [a-z]{2,6}"
                                                              r"<\|end\|><\|start\|>assistant<\|channel\|>final"
                                                              r"<\|message\|>[a-z]{2,8}"}})
    whole = client.chat.completions.create(**kwargs).choices[0]
    thought = whole.message.model_extra["reasoning_content"]
    assert thought.count(" ") == 1 and thought.replace(" ", "").isalpha()
    assert whole.message.content.isalpha()
    reasoning = content = ""
    for chunk in client.chat.completions.create(stream=True, **kwargs):
        d = chunk.choices[0].delta
        reasoning += (d.model_extra or {}).get("reasoning_content") or ""
        content += d.content or ""
    assert (reasoning, content) == (thought, whole.message.content)


def test_markers_reach_the_parser_as_text(client, harmony_dir):
    """The model made to emit the special token <|message|> at every step: with special tokens
    skipped the reply would be empty; kept, the first opens a message and the rest are its
    text."""
    from transformers import AutoTokenizer

    msg_id = AutoTokenizer.from_pretrained(harmony_dir).convert_tokens_to_ids("<|message|>")
    reply = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=4,
                                           temperature=0, logit_bias={str(msg_id): 100})
    assert reply.choices[0].message.content == "<|message|>" * 3

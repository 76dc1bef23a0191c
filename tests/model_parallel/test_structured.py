"""Grammar-constrained decoding in the engine on the real default model: outputs match their spec
alone and beside unconstrained requests, bad specs are refused, and no block leaks."""

from __future__ import annotations

import json
import re

import pytest

from model_parallel.request import SamplingParams
from model_parallel.structured import StructuredOutputSpec, build_grammar
from tests.conftest import assert_pool_full, chat_ids, run_all, text_of

pytestmark = pytest.mark.slow

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 20},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "role": {"type": "string", "enum": ["admin", "user"]},
    },
    "required": ["name", "age", "role"],
    "additionalProperties": False,
}


def guided(kind: str, spec: object, **kw: object) -> SamplingParams:
    text = spec if isinstance(spec, str) else json.dumps(spec)
    kw = {"temperature": 0.0, "max_tokens": 64, **kw}
    return SamplingParams(structured=StructuredOutputSpec(kind, text), **kw)  # type: ignore[arg-type]


def test_each_kind_matches_its_spec_beside_free_requests(engine_fp32, tokenizer) -> None:
    ask = chat_ids(tokenizer, "Describe a user of our system as JSON.")
    requests = {
        "schema": (ask, guided("json_schema", PERSON)),
        "object": (ask, guided("json_object", "")),
        "regex": (ask, guided("regex", r"[0-9]{3}-[0-9]{4}")),
        "choice": (ask, guided("choice", ["yes", "no"])),
        "ebnf": (ask, guided("grammar", 'root ::= "a" ("b" | "c")+ "."', max_tokens=8)),
        "free": (ask, SamplingParams(temperature=0.0, max_tokens=32)),
        "sampled": (ask, guided("json_schema", PERSON, temperature=1.0, seed=7)),
    }
    outs = run_all(engine_fp32, requests)
    for key in ("schema", "sampled"):
        person = json.loads(text_of(outs[key]))
        assert set(person) == {"name", "age", "role"} and person["role"] in ("admin", "user")
        assert isinstance(person["age"], int) and outs[key][-1].outputs[-1].finish_reason == "stop"
    obj = outs["object"]  # a free-form object may run to max_tokens; when it stops, it parses
    assert obj[-1].outputs[-1].finish_reason == "length" or isinstance(
        json.loads(text_of(obj)), dict
    )
    assert re.fullmatch(r"[0-9]{3}-[0-9]{4}", text_of(outs["regex"]))
    assert text_of(outs["choice"]) in ("yes", "no")
    ebnf = text_of(outs["ebnf"])
    assert re.fullmatch(r"a[bc]+\.", ebnf) or outs["ebnf"][-1].outputs[-1].finish_reason == "length"
    free = run_all(engine_fp32, {"f": requests["free"]})["f"]
    assert text_of(outs["free"]) == text_of(free)  # a constrained neighbour changes nothing
    assert_pool_full(engine_fp32)


def test_json_whitespace_is_bounded(engine_fp32, tokenizer) -> None:
    """Pushing newlines with logit_bias cannot make the JSON run away in whitespace."""
    newline = tokenizer.encode("\n")[0]
    ask = chat_ids(tokenizer, "Give me a JSON object.")
    out = run_all(engine_fp32, {"j": (ask, guided("json_object", "", logit_bias={newline: 30.0}))})[
        "j"
    ]
    assert "\n" * 13 not in text_of(out)


def test_bad_specs_are_value_errors() -> None:
    for kind, spec in [
        ("json_schema", '{"type": "frobnicate"}'),
        ("json_schema", "{not json"),
        ("regex", "(unclosed"),
        ("grammar", "root ::= "),
        ("choice", "[]"),
    ]:
        with pytest.raises(ValueError, match=kind):
            build_grammar(StructuredOutputSpec(kind, spec))  # type: ignore[arg-type]


def test_a_spec_that_fails_to_compile_is_refused_and_frees_nothing_twice(
    engine_fp32, tokenizer
) -> None:
    ask = chat_ids(tokenizer, "Hi")
    engine_fp32.add_request("bad", ask, guided("regex", "(unclosed"))
    engine_fp32.add_request("ok", ask, SamplingParams(temperature=0.0, max_tokens=4))
    outs = []
    while engine_fp32.has_unfinished():
        outs.extend(engine_fp32.step())
    bad = [o for o in outs if o.request_id == "bad"]
    assert len(bad) == 1 and bad[0].finished and "regex" in bad[0].error
    assert any(o.request_id == "ok" and o.finished for o in outs)
    assert_pool_full(engine_fp32)


def test_abort_while_compiling_and_n_siblings(engine_fp32, tokenizer) -> None:
    ask = chat_ids(tokenizer, "Pick one.")
    engine_fp32.add_request("gone", ask, guided("json_schema", {**PERSON, "title": "fresh"}))
    engine_fp32.abort_request("gone")
    outs = run_all(
        engine_fp32,
        {"n": (ask, guided("choice", ["red", "green", "blue"], n=3, temperature=1.0, seed=3))},
    )["n"]
    texts: dict[int, str] = {}
    for o in outs:
        for c in o.outputs:
            texts[c.index] = texts.get(c.index, "") + c.text
    assert len(texts) == 3 and set(texts.values()) <= {"red", "green", "blue"}
    assert_pool_full(engine_fp32)

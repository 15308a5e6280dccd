"""Structured output and tool calls through the OpenAI endpoint, with the official `openai` SDK
(run by tests/structured.rs against a real mesh). Each check raises on failure; the facts the Rust
test asserts are printed as one JSON object.

Usage: structured_checks.py --base-url URL --model NAME --image PNG
The SDK trusts the mesh's CA through SSL_CERT_FILE.
"""

import argparse
import base64
import json
import sys

import openai

sys.path.insert(0, __import__("os").path.dirname(__file__))
from autoglm_client import parse_action, parse_response  # noqa: E402  (the client's parsers)

SCHEMA = {
    "type": "object",
    "properties": {
        "shape": {"enum": ["star", "circle", "square"]},
        "count": {"type": "integer", "minimum": 0, "maximum": 9},
        "filled": {"type": "boolean"},
    },
    "required": ["shape", "count", "filled"],
    "additionalProperties": False,
}

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "tap",
            "description": "Tap the screen at a point.",
            "parameters": {
                "type": "object",
                "properties": {
                    "x": {"type": "integer", "minimum": 0, "maximum": 999},
                    "y": {"type": "integer", "minimum": 0, "maximum": 999},
                },
                "required": ["x", "y"],
                "additionalProperties": False,
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "press",
            "description": "Press a key.",
            "parameters": {
                "type": "object",
                "properties": {"key": {"enum": ["back", "home"]}},
                "required": ["key"],
                "additionalProperties": False,
            },
        },
    },
]


def valid(doc: str) -> bool:
    """The schema's rules, spelled out (no validator from the code under test)."""
    try:
        v = json.loads(doc)
    except ValueError:
        return False
    return (
        isinstance(v, dict)
        and set(v) == {"shape", "count", "filled"}
        and v["shape"] in ("star", "circle", "square")
        and isinstance(v["count"], int)
        and not isinstance(v["count"], bool)
        and 0 <= v["count"] <= 9
        and isinstance(v["filled"], bool)
    )


def valid_call(name: str, arguments: str) -> bool:
    args = json.loads(arguments)
    if name == "tap":
        return (
            set(args) == {"x", "y"}
            and all(isinstance(args[k], int) and 0 <= args[k] <= 999 for k in args)
        )
    if name == "press":
        return args == {"key": "back"} or args == {"key": "home"}
    return False


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--base-url", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--image", required=True)
    ap.add_argument("--eos", type=int, action="append", default=[], help="end-of-sequence ids")
    ap.add_argument("--agent-grammar", help="examples/grammars/autoglm_actions.lark")
    a = ap.parse_args()
    client = openai.OpenAI(base_url=a.base_url, api_key="unused", max_retries=0)
    with open(a.image, "rb") as f:
        url = "data:image/png;base64," + base64.b64encode(f.read()).decode()
    ask = [
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": url}},
                {"type": "text", "text": "Describe the image as JSON."},
            ],
        }
    ]
    out = {}

    def chat(**kw):
        kw.setdefault("max_tokens", 120)
        kw.setdefault("temperature", 0)
        return client.chat.completions.create(model=a.model, **kw)

    def streamed(**kw):
        text, calls, finish = "", {}, None
        for chunk in chat(stream=True, **kw):
            for c in chunk.choices:
                d = c.delta
                text += d.content or ""
                for tc in d.tool_calls or []:
                    slot = calls.setdefault(tc.index, {"id": None, "name": "", "arguments": ""})
                    slot["id"] = tc.id or slot["id"]
                    if tc.function:
                        slot["name"] += tc.function.name or ""
                        slot["arguments"] += tc.function.arguments or ""
                finish = c.finish_reason or finish
        return text, [calls[i] for i in sorted(calls)], finish

    # Free text of the same random model is not valid under the schema.
    free = chat(messages=ask).choices[0].message.content
    out["free_text_valid"] = valid(free)

    fmt = {"type": "json_schema", "json_schema": {"name": "shapes", "strict": True, "schema": SCHEMA}}
    r = chat(messages=ask, response_format=fmt)
    doc = r.choices[0].message.content
    assert valid(doc), f"json_schema answer {doc!r}"
    out["json_schema"] = doc
    out["json_schema_finish"] = r.choices[0].finish_reason
    text, calls, finish = streamed(messages=ask, response_format=fmt)
    assert text == doc and not calls, (text, doc, calls)
    out["json_schema_streamed_equal"] = True
    for seed in range(3):
        r = client.chat.completions.create(
            model=a.model, max_tokens=120, temperature=1.0, seed=seed, messages=ask, response_format=fmt
        )
        assert valid(r.choices[0].message.content), r.choices[0].message.content
    r = client.chat.completions.create(
        model=a.model, max_tokens=120, messages=ask, response_format={"type": "json_object"}
    )
    out["json_object_starts"] = r.choices[0].message.content[:1]

    # Tool calls: required, named, parallel or not; streamed and not.
    tap = [{"role": "user", "content": "Tap the star, then go back."}]
    results = {}
    for label, kw in {
        "required": {"tool_choice": "required"},
        "required_single": {"tool_choice": "required", "parallel_tool_calls": False},
        "named": {"tool_choice": {"type": "function", "function": {"name": "press"}}},
    }.items():
        r = chat(messages=tap, tools=TOOLS, **kw)
        m = r.choices[0].message
        assert r.choices[0].finish_reason == "tool_calls", (label, r)
        assert m.content is None and m.tool_calls, (label, m)
        for c in m.tool_calls:
            assert c.type == "function" and c.id.startswith("call_"), c
            assert valid_call(c.function.name, c.function.arguments), (label, c)
        if label == "named":
            assert all(c.function.name == "press" for c in m.tool_calls), m
        if label == "required_single":
            assert len(m.tool_calls) == 1, m
        text, calls, finish = streamed(messages=tap, tools=TOOLS, **kw)
        assert finish == "tool_calls" and text == "", (label, text, finish)
        assert [(c["name"], c["arguments"]) for c in calls] == [
            (c.function.name, c.function.arguments) for c in m.tool_calls
        ], (label, calls, m.tool_calls)
        results[label] = [(c.function.name, json.loads(c.function.arguments)) for c in m.tool_calls]
    out["tool_calls"] = results
    # Parallel calls: with end-of-sequence made unlikely, the model goes on calling until the
    # grammar's bound; with parallel_tool_calls false, one call ends the answer all the same.
    no_eos = {str(t): -100 for t in a.eos}
    for label, parallel in (("parallel", True), ("parallel_off", False)):
        r = chat(messages=tap, tools=TOOLS, tool_choice="required", parallel_tool_calls=parallel,
                 logit_bias=no_eos, max_tokens=1500)
        m = r.choices[0].message
        assert r.choices[0].finish_reason == "tool_calls", (label, r)
        assert all(valid_call(c.function.name, c.function.arguments) for c in m.tool_calls), m
        assert len({c.id for c in m.tool_calls}) == len(m.tool_calls), m
        out[label] = len(m.tool_calls)
    # auto: calls or text, whichever the model starts; a call is always well-formed.
    r = chat(messages=tap, tools=TOOLS, tool_choice="auto")
    m = r.choices[0].message
    if m.tool_calls:
        assert r.choices[0].finish_reason == "tool_calls"
        assert all(valid_call(c.function.name, c.function.arguments) for c in m.tool_calls), m
        out["auto"] = "tool_calls"
    else:
        assert not (m.content or "").startswith("<tool_call>"), m
        out["auto"] = "text"

    # A tool result in the history: the conversation goes on, and the result is in the prompt.
    history = tap + [
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": "call_1", "type": "function", "function": {"name": "tap", "arguments": '{"x": 5, "y": 7}'}}
            ],
        },
    ]
    short = history + [{"role": "tool", "tool_call_id": "call_1", "content": "ok"}]
    long = history + [{"role": "tool", "tool_call_id": "call_1", "content": "ok " * 40}]
    p_short = chat(messages=short, tools=TOOLS, max_tokens=2).usage.prompt_tokens
    p_long = chat(messages=long, tools=TOOLS, max_tokens=2).usage.prompt_tokens
    out["tool_result_prompt_tokens"] = [p_short, p_long]

    # The phone agent's action grammar: every answer parses with the agent's own parsers.
    if a.agent_grammar:
        with open(a.agent_grammar) as f:
            grammar = f.read()
        actions = []
        for seed in range(8):
            r = client.chat.completions.create(
                model=a.model, max_tokens=600, temperature=1.0, seed=seed, messages=ask,
                extra_body={"structured_outputs": {"grammar": grammar}},
            )
            content = r.choices[0].message.content
            assert r.choices[0].finish_reason == "stop", (seed, content)
            thinking, action = parse_response(content)
            parsed = parse_action(action)
            assert parsed["_metadata"] in ("do", "finish"), parsed
            actions.append(parsed.get("action", "finish"))
        out["agent_actions"] = actions

    # Errors name the field.
    errors = {}
    for label, kw in {
        "bad_schema": {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "florp"}}}},
        "no_schema": {"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
        "unknown_tool": {"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "fly"}}},
        "two_formats": {"response_format": {"type": "json_object"}, "tools": TOOLS, "tool_choice": "required"},
        "prediction": {"prediction": {"type": "content", "content": "x"}},
        "audio": {"modalities": ["text", "audio"], "audio": {"voice": "alloy", "format": "wav"}},
    }.items():
        try:
            chat(messages=ask, **kw)
        except openai.BadRequestError as e:
            errors[label] = e.body.get("param") if isinstance(e.body, dict) else None
        else:
            raise AssertionError(f"{label} was accepted")
    # Streamed, a bad schema is still a 400 (not an error event after a 200).
    try:
        streamed(messages=ask, response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "florp"}}})
    except openai.BadRequestError as e:
        errors["bad_schema_streamed"] = e.body.get("param") if isinstance(e.body, dict) else None
    out["errors"] = errors
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    main()

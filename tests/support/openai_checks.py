#!/usr/bin/env python3
"""Drives a gateway's OpenAI-compatible endpoint with the official `openai` SDK for tests/clients.rs:
bad requests (each must raise the SDK's typed error, parsed from OpenAI's error JSON), then
GET /v1/models and one good request to show the server kept serving. Prints one JSON object;
the Rust test decides what is right.
"""

import argparse
import base64
import json
import pathlib

import openai


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--base-url", required=True)
    ap.add_argument("--ca", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--image", required=True)
    ap.add_argument("--prompt", required=True)
    args = ap.parse_args()

    client = openai.OpenAI(base_url=args.base_url, api_key="unused", max_retries=0,
                           http_client=openai.DefaultHttpxClient(verify=args.ca))
    data = base64.b64encode(pathlib.Path(args.image).read_bytes()).decode()

    def user(*parts):
        return [{"role": "user", "content": list(parts)}]

    text = {"type": "text", "text": args.prompt}
    good_image = {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{data}"}}
    cases = {
        "no_image": dict(messages=user({"type": "text", "text": "Describe <image> briefly."})),
        "image_part_without_url": dict(messages=user(text, {"type": "image_url", "image_url": {}})),
        "malformed_base64": dict(messages=user(text, {"type": "image_url", "image_url": {
            "url": "data:image/png;base64,iVBORw0K!!!not-base64"}})),
        "not_an_image": dict(messages=user(text, {"type": "image_url", "image_url": {
            "url": "data:image/png;base64," + base64.b64encode(b"plain text, no PNG").decode()}})),
        "unknown_model": dict(messages=user(text, good_image), model="gpt-4o"),
        "n_2": dict(messages=user(text, good_image), n=2),
        "http_url": dict(messages=user(text, {"type": "image_url", "image_url": {
            "url": "http://127.0.0.1:9/cat.png"}})),
    }
    out = {"errors": {}}
    for name, kwargs in cases.items():
        kwargs.setdefault("model", args.model)
        try:
            client.chat.completions.create(max_tokens=4, temperature=0, **kwargs)
            out["errors"][name] = {"raised": None}
        except openai.APIStatusError as e:
            out["errors"][name] = {
                "raised": type(e).__name__, "status": e.status_code, "type": e.type,
                "param": e.param, "code": e.code, "message": e.message,
                "body": e.response.json(),
            }
    out["models"] = [m.id for m in client.models.list().data]
    completion = client.chat.completions.create(
        model=args.model, messages=user(text, good_image), max_tokens=16, temperature=0)
    out["after"] = {"text": completion.choices[0].message.content,
                    "usage": completion.usage.model_dump()}
    # The same request again: its prompt prefix is in the decoder's prefix cache now.
    again = client.chat.completions.create(
        model=args.model, messages=user(text, good_image), max_tokens=16, temperature=0)
    out["again"] = {"text": again.choices[0].message.content, "usage": again.usage.model_dump()}
    print(json.dumps(out))


if __name__ == "__main__":
    main()

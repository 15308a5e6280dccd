#!/usr/bin/env python3
"""Ask a vlm-mesh gateway about an image through its OpenAI-compatible endpoint with the official
`openai` SDK: the image goes inline as a base64 data URL, as OpenAI's vision API expects.

    python openai_chat.py --base-url https://127.0.0.1:8080/v1 --ca ca.pem \\
        --image ../../../models/images/shapes-48x48.png --prompt "What is shown in this image?"
"""

import argparse
import base64
import json
import mimetypes
import pathlib

import openai


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base-url", required=True, metavar="URL",
                    help="the gateway's OpenAI-compatible endpoint, ending in /v1 (`vlm-mesh up "
                         "--http-listen ADDR` prints it as openai=https://HOST:PORT/v1)")
    ap.add_argument("--ca", metavar="FILE",
                    help="PEM file of the CA that signed the gateway's certificate (for `vlm-mesh "
                         "up`: <state-dir>/certs/ca.pem; default: the CAs the SDK trusts)")
    ap.add_argument("--model", metavar="ID",
                    help="model id (default: the first model GET /v1/models lists)")
    ap.add_argument("--image", required=True, metavar="FILE",
                    help="image file (PNG, JPEG or WebP), sent after the prompt as a base64 data "
                         "URL")
    ap.add_argument("--prompt", required=True, metavar="TEXT",
                    help="the question, as plain text: the gateway applies the model's chat "
                         "template")
    ap.add_argument("--max-tokens", type=int, default=64, metavar="N",
                    help="most tokens to generate (default: %(default)s)")
    ap.add_argument("--temperature", type=float, default=0.0, metavar="T",
                    help="sampling temperature; 0 is greedy (default: %(default)s)")
    ap.add_argument("--top-p", type=float, metavar="P",
                    help="nucleus sampling: sample only from the most likely tokens whose "
                         "probabilities add up to P, in (0, 1] (default: not sent; the gateway "
                         "uses 1, all tokens)")
    ap.add_argument("--seed", type=int, metavar="N",
                    help="sampler seed, for reproducible sampled output (default: not sent; the "
                         "gateway picks one)")
    ap.add_argument("--stream", action="store_true",
                    help="stream the answer as server-sent events (with usage in the last chunk) "
                         "instead of one response")
    ap.add_argument("--json", action="store_true",
                    help="instead of printing the text, print one JSON object at the end: model, "
                         "text, finish_reason and usage")
    args = ap.parse_args()

    client = openai.OpenAI(
        base_url=args.base_url,
        api_key="unused",  # the SDK insists on one; the gateway does not check it
        http_client=openai.DefaultHttpxClient(verify=args.ca) if args.ca else None,
        max_retries=0,
    )
    model = args.model or client.models.list().data[0].id
    mime = mimetypes.guess_type(args.image)[0] or "image/png"
    data = base64.b64encode(pathlib.Path(args.image).read_bytes()).decode()
    messages = [{"role": "user", "content": [
        {"type": "text", "text": args.prompt},
        {"type": "image_url", "image_url": {"url": f"data:{mime};base64,{data}"}},
    ]}]
    extra = {k: v for k, v in (("top_p", args.top_p), ("seed", args.seed)) if v is not None}
    common = dict(model=model, messages=messages, max_tokens=args.max_tokens,
                  temperature=args.temperature, **extra)
    if args.stream:
        text, usage, finish = [], None, None
        for chunk in client.chat.completions.create(
                stream=True, stream_options={"include_usage": True}, **common):
            if chunk.usage:
                usage = chunk.usage
            for choice in chunk.choices:
                if choice.delta.content:
                    text.append(choice.delta.content)
                    if not args.json:
                        print(choice.delta.content, end="", flush=True)
                finish = choice.finish_reason or finish
        text = "".join(text)
    else:
        completion = client.chat.completions.create(**common)
        text = completion.choices[0].message.content
        usage, finish = completion.usage, completion.choices[0].finish_reason
        if not args.json:
            print(text, end="")
    if args.json:
        print(json.dumps({"model": model, "text": text, "finish_reason": finish,
                          "usage": usage.model_dump() if usage else None}))
    else:
        print()


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Calls a gateway's OpenAI-compatible endpoint exactly as Open-AutoGLM's phone agent does
(phone_agent/model/client.py, phone_agent/agent.py, main.py's check_model_api), with the official
`openai` SDK, for tests/clients.rs:

- the preflight: a text-only, non-streamed "Hi" with max_tokens=5;
- three agent steps, each streamed with Open-AutoGLM's sampling arguments and consumed as it
  consumes them (chunks without choices skipped, delta content accumulated, time to first token
  taken), its answer split into thinking and action by Open-AutoGLM's rules; after each step the
  assistant turn is appended as `<think>…</think><answer>…</answer>` and the images of the user
  turn are removed (only its text parts stay), and the next user turn brings a fresh screenshot;
- step 1 again, not streamed (the twin the stream must equal), and not streamed with
  frequency_penalty=0 (to show the penalty is applied);
- step 1 with a max_tokens beyond the model's context (--beyond-context), and the preflight
  with a wrong API key.

Prints one JSON object; the Rust test decides what is right. The messages of each step are
printed with every image's data URL replaced by the file it was read from.
"""

import argparse
import base64
import json
import random
import struct
import time
import zlib

import openai

MODEL = "autoglm-phone-9b"
# Open-AutoGLM's system prompt opens like this (shortened).
SYSTEM_PROMPT = "你是一个智能体分析专家。You are a phone agent."
# Open-AutoGLM's own max_tokens for an agent step.
AUTOGLM_MAX_TOKENS = 3000


def png(width, height, seed):
    """A phone-screenshot-like RGB PNG: a status bar, app icons on a gradient, and a little
    noise everywhere so that it compresses about as badly as a real screenshot."""
    rnd = random.Random(seed)
    small = bytes(i & 0x0F for i in range(256))
    icons = [(x0, rnd.randrange(0, 240), rnd.randrange(0, 240), rnd.randrange(0, 240))
             for x0 in range(60, width - 200, 250)]
    raw = bytearray()
    for y in range(height):
        if y < 80:
            row = bytes((30, 30, 30)) * width
        else:
            shade = 60 + (y * 160) // height
            row = bytearray(bytes((shade, 120, 240 - shade)) * width)
            if (y - 80) % 300 < 160:
                for x0, r, g, b in icons:
                    row[3 * x0:3 * (x0 + 160)] = bytes((r, g, b)) * 160
            row = bytes(row)
        # Every base byte is at most 240 and every noise byte at most 15: no carries.
        noise = rnd.randbytes(3 * width).translate(small)
        mixed = int.from_bytes(row, "big") + int.from_bytes(noise, "big")
        raw += b"\x00" + mixed.to_bytes(3 * width, "big")

    def chunk(kind, data):
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))

    return (b"\x89PNG\r\n\x1a\n"
            + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(bytes(raw), 6))
            + chunk(b"IEND", b""))


def parse_response(content):
    """Open-AutoGLM's ModelClient._parse_response: (thinking, action)."""
    if "finish(message=" in content:
        parts = content.split("finish(message=", 1)
        return parts[0].strip(), "finish(message=" + parts[1]
    if "do(action=" in content:
        parts = content.split("do(action=", 1)
        return parts[0].strip(), "do(action=" + parts[1]
    if "<answer>" in content:
        parts = content.split("<answer>", 1)
        thinking = parts[0].replace("<think>", "").replace("</think>", "").strip()
        return thinking, parts[1].replace("</answer>", "").strip()
    return "", content


def parse_action(response):
    """Open-AutoGLM's actions.handler.parse_action: the answer's action as a dict."""
    import ast

    response = response.strip()
    if response.startswith('do(action="Type"') or response.startswith('do(action="Type_Name"'):
        text = response.split("text=", 1)[1][1:-2]
        return {"_metadata": "do", "action": "Type", "text": text}
    if response.startswith("do"):
        call = ast.parse(response, mode="eval").body
        if not isinstance(call, ast.Call) or getattr(call.func, "id", None) != "do" or call.args:
            raise ValueError(f"not an action call: {response!r}")
        action = {"_metadata": "do"}
        for kw in call.keywords:
            action[kw.arg] = ast.literal_eval(kw.value)
        return action
    if response.startswith("finish"):
        return {"_metadata": "finish", "message": response.replace("finish(message=", "")[1:-2]}
    raise ValueError(f"Failed to parse action: {response}")


def user_message(text, image_b64):
    """Open-AutoGLM's MessageBuilder.create_user_message: the image first, then the text."""
    return {"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{image_b64}"}},
        {"type": "text", "text": text},
    ]}


def remove_images(message):
    """Open-AutoGLM's MessageBuilder.remove_images_from_message."""
    if isinstance(message["content"], list):
        message["content"] = [item for item in message["content"] if item["type"] == "text"]
    return message


def screen_info(app):
    """Open-AutoGLM's MessageBuilder.build_screen_info."""
    return json.dumps({"current_app": app}, ensure_ascii=False)


def error_of(e):
    out = {"raised": type(e).__name__, "message": getattr(e, "message", str(e))}
    if isinstance(e, openai.APIStatusError):
        out["status"] = e.status_code
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--base-url", required=True)

    ap.add_argument("--api-key", required=True)
    ap.add_argument("--task", required=True)
    ap.add_argument("--screenshot", action="append", required=True,
                    help="one PNG per agent step, in order")
    ap.add_argument("--large-screenshot", metavar="PATH",
                    help="write a generated 1440x3200 PNG here first (it may then be one of the "
                         "--screenshot files)")
    ap.add_argument("--max-tokens", type=int, default=AUTOGLM_MAX_TOKENS,
                    help="max_tokens of the agent steps (default: Open-AutoGLM's %(default)s)")
    ap.add_argument("--beyond-context", type=int, required=True,
                    help="a max_tokens more than the model's context, sent once (step 1)")
    args = ap.parse_args()

    if args.large_screenshot:
        with open(args.large_screenshot, "wb") as f:
            f.write(png(1440, 3200, seed=7))

    def client(key):
        # Open-AutoGLM: OpenAI(base_url=…, api_key=…), nothing about certificates: the mesh's CA
        # is trusted only through SSL_CERT_FILE, as the README's command sets it. No retries, so
        # that every failure shows.
        return openai.OpenAI(base_url=args.base_url, api_key=key, max_retries=0)

    sdk = client(args.api_key)
    out = {}

    # main.py's check_model_api.
    def preflight(c):
        return c.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=5,
            temperature=0.0, stream=False)

    r = preflight(sdk)
    out["preflight"] = {
        "choices": len(r.choices), "text": r.choices[0].message.content if r.choices else None,
        "finish_reason": r.choices[0].finish_reason if r.choices else None,
        "usage": r.usage.model_dump() if r.usage else None, "model": r.model,
    }
    try:
        preflight(client(args.api_key + "-wrong"))
        out["wrong_key"] = {"raised": None}
    except openai.OpenAIError as e:
        out["wrong_key"] = error_of(e)

    # ModelClient.request's arguments, but for max_tokens and stream.
    def sampling(max_tokens, frequency_penalty=0.2):
        return dict(model=MODEL, max_tokens=max_tokens, temperature=0.0, top_p=0.85,
                    frequency_penalty=frequency_penalty, extra_body={})

    def request(messages):
        """ModelClient.request: one streamed call, consumed as Open-AutoGLM consumes it."""
        start = time.time()
        stream = sdk.chat.completions.create(messages=messages, stream=True,
                                             **sampling(args.max_tokens))
        raw, chunks, content_chunks, ttft = "", 0, 0, None
        finish, usage, models = None, None, set()
        for chunk in stream:
            chunks += 1
            models.add(chunk.model)
            if chunk.usage:
                usage = chunk.usage.model_dump()
            if len(chunk.choices) == 0:
                continue
            if chunk.choices[0].finish_reason:
                finish = chunk.choices[0].finish_reason
            if chunk.choices[0].delta.content is not None:
                content = chunk.choices[0].delta.content
                raw += content
                if content:
                    content_chunks += 1
                if ttft is None:
                    ttft = time.time() - start
        thinking, action = parse_response(raw)
        return {"text": raw, "thinking": thinking, "action": action, "chunks": chunks,
                "content_chunks": content_chunks, "finish_reason": finish, "usage": usage,
                "ttft_s": ttft, "total_s": time.time() - start, "models": sorted(models)}

    # PhoneAgent: system prompt, then one user turn per step.
    files = {}

    def screenshot(path):
        with open(path, "rb") as f:
            data = base64.b64encode(f.read()).decode()
        files[f"data:image/png;base64,{data}"] = path
        return data

    def shown(messages):
        """The messages with each data URL replaced by its file's path."""
        def part(p):
            if p["type"] == "image_url":
                return {"type": "image_url", "image_url": {"url": files[p["image_url"]["url"]]}}
            return p
        return [dict(m, content=[part(p) for p in m["content"]])
                if isinstance(m["content"], list) else m for m in messages]

    messages = [{"role": "system", "content": SYSTEM_PROMPT}]
    out["steps"] = []
    for i, path in enumerate(args.screenshot):
        info = screen_info("System Home")
        text = (f"{args.task}\n\n** Screen Info **\n\n{info}" if i == 0
                else f"** Screen Info **\n\n{info}")
        messages.append(user_message(text, screenshot(path)))
        step = request(messages)
        step["sent"] = shown(messages)
        out["steps"].append(step)
        if i == 0:
            # The same first step: not streamed, and without the penalty.
            twin = sdk.chat.completions.create(messages=messages, stream=False,
                                               **sampling(args.max_tokens))
            unpenalised = sdk.chat.completions.create(
                messages=messages, stream=False, **sampling(args.max_tokens, 0.0))
            for name, c in [("twin", twin), ("unpenalised", unpenalised)]:
                out[name] = {"text": c.choices[0].message.content,
                             "finish_reason": c.choices[0].finish_reason,
                             "usage": c.usage.model_dump(), "model": c.model,
                             "token_ids": (c.model_extra or {}).get("vlm", {}).get("token_ids")}
            try:
                for _ in sdk.chat.completions.create(messages=messages, stream=True,
                                                     **sampling(args.beyond_context)):
                    pass
                out["beyond_context"] = {"raised": None}
            except openai.OpenAIError as e:
                out["beyond_context"] = error_of(e)
        # PhoneAgent._execute_step: images out of the context, the answer in.
        remove_images(messages[-1])
        messages.append({"role": "assistant", "content":
                         f"<think>{step['thinking']}</think><answer>{step['action']}</answer>"})
    print(json.dumps(out))


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Ask a vlm-mesh gateway about an image over gRPC (TLS), streaming the answer.

The stubs are generated from the repository's proto/ by grpc_tools.protoc each run (into a
temporary directory), so nothing generated is committed:

    pip install -r requirements.txt
    python client.py --target 127.0.0.1:50051 --ca ~/.local/state/vlm-mesh/certs/ca.pem \\
        --image ../../../models/images/shapes-48x48.png \\
        --prompt $'USER: <image>\\nWhat is shown in this image? ASSISTANT:'
"""

import argparse
import json
import pathlib
import sys
import tempfile

import grpc
from grpc_tools import protoc

PROTO_ROOT = pathlib.Path(__file__).resolve().parents[3] / "proto"


def finish_reason(decoder_pb2, value):
    """vlm.v1.FinishReason in OpenAI's vocabulary, the one vlm-mesh shows everywhere: "stop" (an
    end-of-sequence token or a stop string) or "length" (max_tokens reached or the context full)."""
    return {
        decoder_pb2.FINISH_REASON_STOP: "stop",
        decoder_pb2.FINISH_REASON_STOP_STRING: "stop",
        decoder_pb2.FINISH_REASON_LENGTH: "length",
        decoder_pb2.FINISH_REASON_CONTEXT_LENGTH: "length",
    }.get(value, "unspecified")


def load_stubs():
    """Generates the vlm.v1 Python modules and imports them."""
    out = tempfile.mkdtemp(prefix="vlm-stubs-")
    files = sorted(str(p) for p in (PROTO_ROOT / "vlm" / "v1").glob("*.proto"))
    include = pathlib.Path(protoc.__file__).parent / "_proto"  # google/protobuf/*.proto
    rc = protoc.main(["protoc", f"-I{PROTO_ROOT}", f"-I{include}",
                      f"--python_out={out}", f"--grpc_python_out={out}", *files])
    if rc != 0:
        sys.exit(f"protoc failed ({rc})")
    sys.path.insert(0, out)
    from vlm.v1 import gateway_pb2, gateway_pb2_grpc, decoder_pb2  # noqa: E402
    return gateway_pb2, gateway_pb2_grpc, decoder_pb2


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", required=True, metavar="HOST:PORT",
                    help="the gateway's gRPC address, without a scheme (`vlm-mesh up` prints it as "
                         "gateway=https://HOST:PORT)")
    ap.add_argument("--ca", required=True, metavar="FILE",
                    help="PEM file of the CA that signed the gateway's certificate "
                         "(for `vlm-mesh up`: <state-dir>/certs/ca.pem)")
    ap.add_argument("--image", action="append", default=[], metavar="FILE",
                    help="image file (PNG, JPEG or WebP); repeat for several images, in the order "
                         "of their <image> placeholders in --prompt")
    ap.add_argument("--prompt", required=True, metavar="TEXT",
                    help="raw prompt, in the model's chat format (no template is applied), "
                         "with one <image> placeholder per --image")
    ap.add_argument("--max-tokens", type=int, default=64, metavar="N",
                    help="most tokens to generate (default: %(default)s)")
    ap.add_argument("--temperature", type=float, default=0.0, metavar="T",
                    help="sampling temperature; 0 is greedy (default: %(default)s)")
    ap.add_argument("--top-p", type=float, default=1.0, metavar="P",
                    help="nucleus sampling: sample only from the most likely tokens whose "
                         "probabilities add up to P, in (0, 1] (default: %(default)s, all tokens)")
    ap.add_argument("--seed", type=int, metavar="N",
                    help="sampler seed, for reproducible sampled output (default: the gateway "
                         "picks one)")
    ap.add_argument("--timeout", type=float, default=120, metavar="SECONDS",
                    help="deadline for the whole call (default: %(default)s)")
    ap.add_argument("--json", action="store_true",
                    help="instead of streaming the text, print one JSON object at the end: text, "
                         "token_ids, prompt_tokens, completion_tokens, finish_reason (\"stop\" or "
                         "\"length\") and trace_id")
    args = ap.parse_args()

    gateway_pb2, gateway_pb2_grpc, decoder_pb2 = load_stubs()
    creds = grpc.ssl_channel_credentials(root_certificates=pathlib.Path(args.ca).read_bytes())
    options = [("grpc.max_send_message_length", 64 << 20)]
    with grpc.secure_channel(args.target, creds, options=options) as channel:
        stub = gateway_pb2_grpc.GatewayStub(channel)
        params = decoder_pb2.SamplingParams(
            max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p)
        if args.seed is not None:
            params.seed = args.seed
        request = gateway_pb2.GenerateRequest(
            images=[pathlib.Path(p).read_bytes() for p in args.image],
            prompt=args.prompt, params=params)
        text, token_ids, final = [], [], None
        try:
            for msg in stub.Generate(request, timeout=args.timeout):
                if msg.HasField("delta"):
                    text.append(msg.delta.text)
                    token_ids.extend(msg.delta.token_ids)
                    if not args.json:
                        print(msg.delta.text, end="", flush=True)
                else:
                    final = msg.final
        except grpc.RpcError as e:
            sys.exit(f"error: {e.code().name}: {e.details()}")
    if args.json:
        print(json.dumps({
            "text": "".join(text),
            "token_ids": token_ids,
            "prompt_tokens": final.usage.prompt_tokens,
            "completion_tokens": final.usage.completion_tokens,
            "finish_reason": finish_reason(decoder_pb2, final.finish_reason),
            "trace_id": final.trace_id,
        }))
    else:
        print()


if __name__ == "__main__":
    main()

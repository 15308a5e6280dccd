#!/usr/bin/env python3
"""grpcurl-style discovery of a vlm-mesh gateway through server reflection, with the stock
grpcio-reflection client: lists the services and their methods and, with --image/--prompt, calls
vlm.v1.Gateway/Generate using only message types learned from the server (no stubs, no protos).

    python reflect.py --target 127.0.0.1:50051 --ca ca.pem                # list
    python reflect.py --target … --ca ca.pem --image img.png --prompt …   # list, then call Generate
"""

import argparse
import json
import pathlib

import grpc
from google.protobuf import json_format
from google.protobuf.descriptor_pool import DescriptorPool
from google.protobuf.message_factory import GetMessageClass
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", required=True, metavar="HOST:PORT",
                    help="the gateway's gRPC address, without a scheme (`vlm-mesh up` prints it as "
                         "gateway=https://HOST:PORT)")
    ap.add_argument("--ca", required=True, metavar="FILE",
                    help="PEM file of the CA that signed the gateway's certificate "
                         "(for `vlm-mesh up`: <state-dir>/certs/ca.pem)")
    ap.add_argument("--image", metavar="FILE",
                    help="image file (PNG, JPEG or WebP): after listing the services, call "
                         "vlm.v1.Gateway/Generate with it and --prompt (default: only list)")
    ap.add_argument("--prompt", metavar="TEXT",
                    help="raw prompt for Generate, in the model's chat format, with one <image> "
                         "placeholder (needed with --image)")
    ap.add_argument("--max-tokens", type=int, default=16, metavar="N",
                    help="most tokens Generate may produce (default: %(default)s)")
    args = ap.parse_args()
    if args.image and args.prompt is None:
        ap.error("--image needs --prompt")

    creds = grpc.ssl_channel_credentials(root_certificates=pathlib.Path(args.ca).read_bytes())
    with grpc.secure_channel(args.target, creds) as channel:
        db = ProtoReflectionDescriptorDatabase(channel)
        pool = DescriptorPool(db)
        services = {}
        for name in db.get_services():
            svc = pool.FindServiceByName(name)
            services[name] = [
                {"name": m.name, "input": m.input_type.full_name,
                 "output": m.output_type.full_name, "server_streaming": m.server_streaming}
                for m in svc.methods
            ]
        out = {"services": services}
        if args.image:
            method = pool.FindMethodByName("vlm.v1.Gateway.Generate")
            request_cls = GetMessageClass(method.input_type)
            response_cls = GetMessageClass(method.output_type)
            request = request_cls(images=[pathlib.Path(args.image).read_bytes()], prompt=args.prompt)
            request.params.max_tokens = args.max_tokens
            call = channel.unary_stream(
                f"/{method.containing_service.full_name}/{method.name}",
                request_serializer=request_cls.SerializeToString,
                response_deserializer=response_cls.FromString)
            token_ids, messages = [], []
            for msg in call(request, timeout=120):
                messages.append(json_format.MessageToDict(msg))
                if msg.HasField("delta"):
                    token_ids.extend(msg.delta.token_ids)
            out["generate"] = {"token_ids": token_ids, "last": messages[-1] if messages else None}
        print(json.dumps(out))


if __name__ == "__main__":
    main()

#!/usr/bin/env node
// Ask a vlm-mesh gateway about an image over gRPC (TLS), streaming the answer.
// The service definition is loaded at run time from the repository's proto/ by
// @grpc/proto-loader, so nothing generated is committed:
//
//   npm install
//   node client.js --target 127.0.0.1:50051 --ca ~/.local/state/vlm-mesh/certs/ca.pem \
//     --image ../../../models/images/shapes-48x48.png \
//     --prompt $'USER: <image>\nWhat is shown in this image? ASSISTANT:'
'use strict';

const fs = require('fs');
const path = require('path');
const { parseArgs } = require('util');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

const PROTO_ROOT = path.resolve(__dirname, '../../../proto');

const { values: args } = parseArgs({
  options: {
    target: { type: 'string' },
    ca: { type: 'string' },
    image: { type: 'string', multiple: true, default: [] },
    prompt: { type: 'string' },
    'max-tokens': { type: 'string', default: '64' },
    temperature: { type: 'string', default: '0' },
    'top-p': { type: 'string', default: '1' },
    seed: { type: 'string' },
    timeout: { type: 'string', default: '120' },
    json: { type: 'boolean', default: false },
  },
});
for (const required of ['target', 'ca', 'prompt']) {
  if (!args[required]) {
    console.error(`error: --${required} is required`);
    process.exit(2);
  }
}

const definition = protoLoader.loadSync('vlm/v1/gateway.proto', {
  includeDirs: [PROTO_ROOT],
  keepCase: true,
  longs: String,
  enums: String,
  defaults: true,
  oneofs: true,
});
const vlm = grpc.loadPackageDefinition(definition).vlm.v1;
const client = new vlm.Gateway(
  args.target,
  grpc.credentials.createSsl(fs.readFileSync(args.ca)),
  { 'grpc.max_send_message_length': 64 << 20 },
);

const params = {
  max_tokens: Number(args['max-tokens']),
  temperature: Number(args.temperature),
  top_p: Number(args['top-p']),
};
if (args.seed !== undefined) params.seed = args.seed; // uint64: passed as a string
const request = {
  images: args.image.map((p) => fs.readFileSync(p)),
  prompt: args.prompt,
  params,
};

const deadline = new Date(Date.now() + Number(args.timeout) * 1000);
const call = client.Generate(request, { deadline });
const text = [];
const tokenIds = [];
let final = null;
call.on('data', (msg) => {
  if (msg.kind === 'delta') {
    text.push(msg.delta.text);
    tokenIds.push(...msg.delta.token_ids);
    if (!args.json) process.stdout.write(msg.delta.text);
  } else {
    final = msg.final;
  }
});
call.on('error', (e) => {
  console.error(`error: ${grpc.status[e.code]}: ${e.details}`);
  process.exit(1);
});
call.on('end', () => {
  if (args.json) {
    console.log(JSON.stringify({
      text: text.join(''),
      token_ids: tokenIds,
      prompt_tokens: final.usage.prompt_tokens,
      completion_tokens: final.usage.completion_tokens,
      finish_reason: final.finish_reason,
      trace_id: final.trace_id,
    }));
  } else {
    process.stdout.write('\n');
  }
  client.close();
});

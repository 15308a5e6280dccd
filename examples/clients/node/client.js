#!/usr/bin/env node
// Ask a vlm-mesh gateway about an image over gRPC (TLS), streaming the answer.
// The service definition is loaded at run time from the repository's proto/ by
// @grpc/proto-loader, so nothing generated is committed. `node client.js --help`
// lists the options, with an example.
'use strict';

const fs = require('fs');
const net = require('net');
const path = require('path');
const tls = require('tls');
const { parseArgs } = require('util');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

const PROTO_ROOT = path.resolve(__dirname, '../../../proto');

const USAGE = `usage: node client.js [-h] --target HOST:PORT --ca FILE [--image FILE]...
                      --prompt TEXT [--max-tokens N] [--temperature T] [--top-p P] [--seed N]
                      [--timeout SECONDS] [--json]

Ask a vlm-mesh gateway about an image over gRPC (TLS), streaming the answer.

The service definition is loaded at run time from the repository's proto/ by
@grpc/proto-loader, so nothing generated is committed:

    npm ci
    node client.js --target 127.0.0.1:50051 --ca ~/.local/state/vlm-mesh/certs/ca.pem \\
        --image ../../../models/images/shapes-48x48.png \\
        --prompt $'USER: <image>\\nWhat is shown in this image? ASSISTANT:'

options:
  -h, --help          show this help message and exit
  --target HOST:PORT  the gateway's gRPC address, without a scheme (\`vlm-mesh
                      up\` prints it as gateway=https://HOST:PORT)
  --ca FILE           PEM file of the CA that signed the gateway's certificate
                      (for \`vlm-mesh up\`: <state-dir>/certs/ca.pem)
  --image FILE        image file (PNG, JPEG or WebP); repeat for several
                      images, in the order of their <image> placeholders in
                      --prompt
  --prompt TEXT       raw prompt, in the model's chat format (no template is
                      applied), with one <image> placeholder per --image
  --max-tokens N      most tokens to generate (default: 64)
  --temperature T     sampling temperature; 0 is greedy (default: 0)
  --top-p P           nucleus sampling: sample only from the most likely
                      tokens whose probabilities add up to P, in (0, 1]
                      (default: 1, all tokens)
  --seed N            sampler seed, for reproducible sampled output (default:
                      the gateway picks one)
  --timeout SECONDS   deadline for the whole call (default: 120)
  --json              instead of streaming the text, print one JSON object at
                      the end: text, token_ids, prompt_tokens,
                      completion_tokens, finish_reason ("stop" or "length")
                      and trace_id
`;

// Command-line mistakes end like argparse's: usage, one error line, exit status 2.
function usageError(message) {
  process.stderr.write(`${USAGE.slice(0, USAGE.indexOf('\n\n'))}\nclient.js: error: ${message}\n`);
  process.exit(2);
}

let args;
try {
  ({ values: args } = parseArgs({
    options: {
      help: { type: 'boolean', short: 'h', default: false },
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
  }));
} catch (e) {
  usageError(e.message);
}
if (args.help) {
  process.stdout.write(USAGE);
  process.exit(0);
}
for (const required of ['target', 'ca', 'prompt']) {
  if (args[required] === undefined) usageError(`--${required} is required`);
}
const INTEGER = /^\d+$/;
const NUMBER = /^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$/;
for (const [name, pattern] of [['max-tokens', INTEGER], ['seed', INTEGER], ['temperature', NUMBER],
  ['top-p', NUMBER], ['timeout', NUMBER]]) {
  if (args[name] !== undefined && !pattern.test(args[name])) {
    usageError(`--${name}: invalid value '${args[name]}'`);
  }
}

// OpenAI's finish reasons, the one vocabulary vlm-mesh shows everywhere: "stop" (an
// end-of-sequence token or a stop string) or "length" (max_tokens reached or the context full).
const FINISH_REASONS = {
  FINISH_REASON_STOP: 'stop',
  FINISH_REASON_STOP_STRING: 'stop',
  FINISH_REASON_LENGTH: 'length',
  FINISH_REASON_CONTEXT_LENGTH: 'length',
};

// grpc-js sends the target's host as the TLS server name (SNI) even when it is an IP address,
// which RFC 6066 forbids and Node warns about on every run (DEP0123; grpc/grpc-node#1919), and
// it cannot be told to send none. So for an IP target this client sends a DNS name instead
// (every gateway certificate `vlm-mesh certs` or the Helm chart issues names localhost; the
// gateway does not look at SNI anyway) and still checks the certificate against the IP itself.
const targetHost = (args.target.match(/^\[([^\]]+)\](?::\d+)?$/) || [])[1]
  ?? args.target.replace(/:\d+$/, '');
const channelOptions = { 'grpc.max_send_message_length': 64 << 20 };
const verifyOptions = {};
if (net.isIP(targetHost)) {
  channelOptions['grpc.ssl_target_name_override'] = 'localhost';
  verifyOptions.checkServerIdentity = (_sni, cert) => tls.checkServerIdentity(targetHost, cert);
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
  grpc.credentials.createSsl(fs.readFileSync(args.ca), null, null, verifyOptions),
  channelOptions,
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
      finish_reason: FINISH_REASONS[final.finish_reason] ?? 'unspecified',
      trace_id: final.trace_id,
    }));
  } else {
    process.stdout.write('\n');
  }
  client.close();
});

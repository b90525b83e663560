// Runs the steps the test asks for in the query string against a gateway through the
// shipped client, and leaves the outcome in window.results (shown on the page too, so a
// failure screenshot says what happened). Query: gateway, token, steps (comma-separated:
// echo, dns, pkcs11, big, idle), echo and sink (target ports on 127.0.0.1), idle (ms),
// close (how the connection ends, see `closes`).
import { Client, Reader, Writer, text, withTimeout } from './ksw1.js';

const query = new URLSearchParams(location.search);
const STEP_MS = 30_000;
const results = { events: [] };
window.results = results;
let client;
let socket;

// The shipped client's WebSocket, made through this subclass: its error and close events
// (all a page learns of how a connection ended) go to results.events.
window.WebSocket = class RecordingWebSocket extends WebSocket {
  constructor(...args) {
    super(...args);
    socket = this;
    this.addEventListener('error', () => results.events.push({ type: 'error' }));
    this.addEventListener('close', ({ code, reason, wasClean }) => {
      results.events.push({ type: 'close', code, reason, wasClean });
    });
  }
};

// How the connection ends (query `close`, default `client`).
const closes = {
  client: () => client.close(), // the shipped client: close(1000)
  empty: () => socket.close(), // no code, as the polyfill's disconnect()
  gateway: () => {}, // the test makes the gateway close it
};

const P11_GET_SLOT_LIST = 0x0000;
const P11_OPEN_SESSION = 0x0004;
const P11_CLOSE_SESSION = 0x0102;
const P11_GENERATE_RANDOM = 0x010e;
const P11_SERIAL_SESSION = 0x2; // docs/pkcs11.md §4 flags: bit1 serial; read-only is enough here
const P11_STATUS = ['Ok', 'ProtocolError', 'CkError', 'Internal', 'AuthDenied'];

function randomBytes(size) {
  const bytes = new Uint8Array(size);
  for (let at = 0; at < size; at += 65536) { // getRandomValues fills at most 64 KiB a call
    crypto.getRandomValues(bytes.subarray(at, at + 65536));
  }
  return bytes;
}

const hex = (bytes) => Array.from(bytes, (b) => b.toString(16).padStart(2, '0')).join('');
const sameBytes = (a, b) => a.byteLength === b.byteLength && a.every((value, i) => value === b[i]);

async function p11(fnId, args) {
  const { status, body } = await client.pkcs11(fnId, args);
  if (status === 0) return new Reader(body);
  const reader = new Reader(body);
  const detail = status === 2 // CkError: u32 CKR, then the message to the end
    ? `CKR 0x${reader.u32().toString(16)} ${text(reader.rest())}`
    : text(reader.raw(reader.u32()));
  throw new Error(`PKCS#11 fn 0x${fnId.toString(16)}: ${P11_STATUS[status] ?? status}: ${detail}`);
}

const steps = {
  async echo() {
    const sent = randomBytes(256 * 1024);
    const stream = await client.openTcp('127.0.0.1', Number(query.get('echo')));
    stream.write(sent);
    const back = await stream.readExactly(sent.byteLength);
    stream.close();
    if (!sameBytes(back, sent)) throw new Error('the echo differs from what was sent');
    return { bytes: back.byteLength };
  },

  async dns() {
    return { addresses: await client.resolve('localhost') };
  },

  async pkcs11() {
    const slots = await p11(P11_GET_SLOT_LIST, new Writer().u8(1).bytes()); // token present
    if (slots.u32() === 0) throw new Error('no slot has a token');
    const slot = Number(slots.u64()); // slot ids are u64 in results, u32 in arguments
    const session = (await p11(P11_OPEN_SESSION,
      new Writer().u32(slot).u32(P11_SERIAL_SESSION).bytes())).u32();
    const random = await p11(P11_GENERATE_RANDOM, new Writer().u32(session).u32(16).bytes());
    const bytes = random.raw(random.u32());
    await p11(P11_CLOSE_SESSION, new Writer().u32(session).bytes());
    return { randomBytes: bytes.byteLength };
  },

  // One maximal Data frame (the gateway's default max_payload); the sink answers
  // "<bytes> <sha256>" of what it received once we half-close.
  async big() {
    const sent = randomBytes(16 * 1024 * 1024);
    const stream = await client.openTcp('127.0.0.1', Number(query.get('sink')));
    stream.write(sent);
    stream.end();
    const digest = hex(new Uint8Array(await crypto.subtle.digest('SHA-256', sent)));
    const sinkSays = text(await stream.readToEnd());
    if (sinkSays !== `${sent.byteLength} ${digest}`) {
      throw new Error(`sent ${sent.byteLength} bytes with SHA-256 ${digest}, the sink says ${sinkSays}`);
    }
    return { bytes: sent.byteLength, sha256: digest };
  },

  // Nothing sent for `idle` ms: only the gateway's pings, which the browser answers
  // itself, cross the WebSocket.
  async idle() {
    await new Promise((resolve) => { setTimeout(resolve, Number(query.get('idle'))); });
    if (socket.readyState !== WebSocket.OPEN) {
      throw new Error(`the WebSocket is no longer open (readyState ${socket.readyState})`);
    }
  },
};

async function step(name, run) {
  try {
    results[name] = { ok: true, ...(await withTimeout(run(), STEP_MS, name)) };
  } catch (error) {
    results[name] = { ok: false, error: String(error?.message ?? error) };
  }
  document.getElementById('results').textContent = JSON.stringify(results, null, 2);
  return results[name].ok;
}

const connected = await step('connect', async () => {
  client = await Client.connect(query.get('gateway'), { token: query.get('token') ?? '' });
  return { features: client.features, maxStreams: client.maxStreams, subprotocol: client.subprotocol };
});
if (connected) {
  for (const name of (query.get('steps') ?? '').split(',').filter(Boolean)) {
    await step(name, steps[name]);
  }
  await step('close', async () => {
    closes[query.get('close') ?? 'client']();
    await client.closed;
  });
}
results.done = true;
console.log('results', JSON.stringify(results));

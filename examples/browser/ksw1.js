// A small KSW1 client for browsers (the wire protocol: docs/protocol.md).
// One WebSocket carries TCP streams, DNS lookups and PKCS#11 calls. Like the polyfill it
// does not ask for FlowControl and relies on the gateway's own backpressure.

export const Feature = Object.freeze({
  FLOW_CONTROL: 0x01, HALF_CLOSE: 0x02, DNS: 0x04, UDP: 0x08, OPEN_TOKEN: 0x10, PKCS11: 0x20,
});

const Type = Object.freeze({
  HELLO: 0x01, HELLO_ACK: 0x02, OPEN: 0x10, OPEN_OK: 0x11, OPEN_ERR: 0x12, DATA: 0x20,
  CLOSE: 0x30, CLOSE_ACK: 0x31, DNS_QUERY: 0x40, DNS_RESULT: 0x41, DNS_ERR: 0x42,
  PKCS11_REQUEST: 0x50, PKCS11_RESPONSE: 0x51, PING: 0xf0, PONG: 0xf1,
});

const MAGIC = 0x3157534b; // "KSW1" read as a little-endian u32
const HEADER = 16;
const EOF = 0x01;
const PROTO_TCP = 1;
const ADDR_HOSTNAME = 1; // the polyfill always sends the host as text
const EMPTY = new Uint8Array(0);
// What the polyfill asks for: HalfClose, Dns, Udp, Pkcs11 (0x2e)
const POLYFILL_FEATURES = Feature.HALF_CLOSE | Feature.DNS | Feature.UDP | Feature.PKCS11;
const OPEN_ERRORS = ['', 'Blocked', 'ResolveFail', 'ConnRefused', 'Timeout', 'Unreachable',
  'AuthRequired', 'AuthFailed', 'TooManyStreams', 'Internal'];
const DNS_ERRORS = ['', 'FormatError', 'ServerFailure', 'NxDomain', 'NotImplemented', 'Refused',
  'Timeout'];

const utf8 = new TextEncoder();
export const text = (bytes) => new TextDecoder().decode(bytes);

/** Builds a little-endian payload. */
export class Writer {
  #parts = [];
  #size = 0;

  #put(size, set) {
    const part = new Uint8Array(size);
    set(new DataView(part.buffer));
    return this.raw(part);
  }

  u8(value) { return this.#put(1, (view) => view.setUint8(0, value)); }
  u16(value) { return this.#put(2, (view) => view.setUint16(0, value, true)); }
  u32(value) { return this.#put(4, (view) => view.setUint32(0, value, true)); }

  raw(bytes) {
    this.#parts.push(bytes);
    this.#size += bytes.byteLength;
    return this;
  }

  bytes() {
    const out = new Uint8Array(this.#size);
    let offset = 0;
    for (const part of this.#parts) {
      out.set(part, offset);
      offset += part.byteLength;
    }
    return out;
  }
}

/** Reads a little-endian payload; reading past its end throws a RangeError. */
export class Reader {
  #view;
  #bytes;
  #offset = 0;

  constructor(bytes) {
    this.#bytes = bytes;
    this.#view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  }

  #take(size) {
    const at = this.#offset;
    if (at + size > this.#bytes.byteLength) throw new RangeError('payload too short');
    this.#offset += size;
    return at;
  }

  u8() { return this.#view.getUint8(this.#take(1)); }
  u16() { return this.#view.getUint16(this.#take(2), true); }
  u32() { return this.#view.getUint32(this.#take(4), true); }
  u64() { return this.#view.getBigUint64(this.#take(8), true); }
  raw(size) { const at = this.#take(size); return this.#bytes.subarray(at, at + size); }
  rest() { return this.raw(this.#bytes.byteLength - this.#offset); }
}

export function encodeFrame(type, id, payload = EMPTY, flags = 0) {
  const frame = new Uint8Array(HEADER + payload.byteLength);
  const view = new DataView(frame.buffer);
  view.setUint32(0, MAGIC, true);
  view.setUint8(4, 1); // version
  view.setUint8(5, type);
  view.setUint8(6, flags);
  view.setUint32(8, id, true);
  view.setUint32(12, payload.byteLength, true);
  frame.set(payload, HEADER);
  return frame;
}

/**
 * The inbound messages of a connection are ONE byte stream (protocol.md §1): a message may hold
 * several frames and a frame may be split across messages. feed() returns the whole
 * frames seen so far and keeps the incomplete tail for the next message.
 */
export class FrameParser {
  #tail = EMPTY;

  feed(message) {
    let bytes = new Uint8Array(message);
    if (this.#tail.byteLength) bytes = new Writer().raw(this.#tail).raw(bytes).bytes();
    const frames = [];
    let offset = 0;
    while (bytes.byteLength - offset >= HEADER) {
      const view = new DataView(bytes.buffer, bytes.byteOffset + offset, HEADER);
      if (view.getUint32(0, true) !== MAGIC || view.getUint8(4) !== 1) {
        throw new Error('not a KSW1 v1 frame');
      }
      const end = offset + HEADER + view.getUint32(12, true);
      if (end > bytes.byteLength) break;
      frames.push({
        type: view.getUint8(5), flags: view.getUint8(6), id: view.getUint32(8, true),
        payload: bytes.subarray(offset + HEADER, end),
      });
      offset = end;
    }
    this.#tail = bytes.subarray(offset);
    return frames;
  }
}

export class Ksw1Error extends Error {
  constructor(kind, names, payload) {
    const reader = new Reader(payload);
    const code = reader.u8();
    super(`${kind} ${names[code] ?? code}: ${text(reader.raw(reader.u16()))}`);
    this.code = code;
  }
}

/** Rejects with a message naming `what` unless `promise` settles within `ms`. */
export function withTimeout(promise, ms, what) {
  let timer;
  const timeout = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error(`${what}: no answer within ${ms} ms`)), ms);
  });
  return Promise.race([promise, timeout]).finally(() => clearTimeout(timer));
}

/** One TCP stream: write() sends one Data frame, read() returns what the target sent. */
export class Stream {
  #send;
  #chunks = [];
  #done = false; // the target sent EOF, or the stream or WebSocket closed
  #error = null;
  #wake = null;

  constructor(id, send) {
    this.id = id;
    this.#send = send;
    this._opened = Promise.withResolvers();
  }

  write(bytes) { this.#send(Type.DATA, this.id, bytes); }
  end() { this.#send(Type.DATA, this.id, EMPTY, EOF); } // half-close: we are done writing
  close() { this.#send(Type.CLOSE, this.id, new Writer().u32(0).bytes()); }

  /** The next chunk from the target, or null once it has sent everything. */
  async read() {
    while (!this.#chunks.length && !this.#done) {
      await new Promise((resolve) => { this.#wake = resolve; });
    }
    if (this.#chunks.length) return this.#chunks.shift();
    if (this.#error) throw this.#error;
    return null;
  }

  async readExactly(size) {
    const out = new Uint8Array(size);
    for (let got = 0; got < size;) {
      const chunk = await this.read();
      if (chunk === null) throw new Error(`stream ended after ${got} of ${size} bytes`);
      const used = Math.min(chunk.byteLength, size - got);
      out.set(chunk.subarray(0, used), got);
      if (used < chunk.byteLength) this.#chunks.unshift(chunk.subarray(used));
      got += used;
    }
    return out;
  }

  async readToEnd() {
    const writer = new Writer();
    for (let chunk; (chunk = await this.read()) !== null;) writer.raw(chunk);
    return writer.bytes();
  }

  _receive(payload, eof) {
    if (payload.byteLength) this.#chunks.push(payload);
    if (eof) this.#done = true;
    this.#wake?.();
  }

  _end(error = null) {
    this.#done = true;
    this.#error = error;
    this._opened.reject(error ?? new Error('stream closed'));
    this.#wake?.();
  }
}

export class Client {
  #ws;
  #token;
  #parser = new FrameParser();
  #helloAck = Promise.withResolvers();
  #closedWith = Promise.withResolvers();
  #streams = new Map();
  #dns = new Map();
  #pkcs11 = new Map();
  #nextId = { stream: 1, dns: 1, pkcs11: 1 }; // three separate id spaces (protocol.md §2)

  /**
   * Opens the WebSocket and does Hello. The token travels as the subprotocol
   * `auth-<token>` (a browser cannot set headers) and in every Open, as the polyfill does.
   */
  static async connect(url, { token = '', features = POLYFILL_FEATURES, maxStreams = 64,
    timeoutMs = 10_000 } = {}) {
    const ws = new WebSocket(url, token ? [`auth-${token}`] : []);
    ws.binaryType = 'arraybuffer';
    const client = new Client(ws, token, features, maxStreams);
    try {
      return await withTimeout(client.#helloAck.promise, timeoutMs, 'KSW1 handshake');
    } catch (error) {
      ws.close();
      throw error;
    }
  }

  constructor(ws, token, features, maxStreams) {
    this.#ws = ws;
    this.#token = utf8.encode(token);
    this.features = 0; // granted by HelloAck
    this.maxStreams = 0;
    this.maxPayload = 0; // ksw1fast's HelloAck extension; 0 from a gateway without it
    this.initialCredit = 0;
    ws.onopen = () => this.#send(Type.HELLO, 0, new Writer().u32(features).u32(maxStreams).bytes());
    ws.onmessage = (event) => this.#receive(event.data);
    ws.onclose = (event) => this.#closed(event);
  }

  get subprotocol() { return this.#ws.protocol; }

  /** Resolves with the close code once the WebSocket has closed. */
  get closed() { return this.#closedWith.promise; }

  async openTcp(host, port) {
    const id = this.#nextId.stream++;
    const stream = new Stream(id, (...frame) => this.#send(...frame));
    this.#streams.set(id, stream);
    const addr = utf8.encode(host);
    this.#send(Type.OPEN, id, new Writer().u8(PROTO_TCP).u8(ADDR_HOSTNAME).u16(port)
      .u16(addr.byteLength).raw(addr).u16(this.#token.byteLength).raw(this.#token).bytes());
    await stream._opened.promise;
    return stream;
  }

  /** Addresses of `name` as text; family 4 or 6 filters, 0 asks for both. */
  async resolve(name, family = 0) {
    const encoded = utf8.encode(name);
    const { type, payload } = await this.#request(this.#dns, 'dns', Type.DNS_QUERY,
      new Writer().u8(family).u16(encoded.byteLength).raw(encoded).bytes());
    if (type === Type.DNS_ERR) throw new Ksw1Error('DnsErr', DNS_ERRORS, payload);
    const reader = new Reader(payload);
    return Array.from({ length: reader.u16() }, () => formatAddress(reader.raw(reader.u16())));
  }

  /** One PKCS#11 RPC call (docs/pkcs11.md): raw args in, status and raw body out. */
  async pkcs11(fnId, args = EMPTY) {
    const { payload } = await this.#request(this.#pkcs11, 'pkcs11', Type.PKCS11_REQUEST,
      new Writer().u16(fnId).raw(args).bytes());
    return { status: payload[0], body: payload.subarray(1) };
  }

  close() { this.#ws.close(1000); }

  #send(type, id, payload, flags = 0) {
    this.#ws.send(encodeFrame(type, id, payload, flags));
  }

  #request(table, space, type, payload) {
    const id = this.#nextId[space]++;
    const answer = Promise.withResolvers();
    table.set(id, answer);
    this.#send(type, id, payload);
    return answer.promise;
  }

  #answer(table, frame) {
    table.get(frame.id)?.resolve(frame);
    table.delete(frame.id);
  }

  #receive(data) {
    if (typeof data === 'string') return; // KSW1 is binary; a gateway sends no text
    let frames;
    try {
      frames = this.#parser.feed(data);
    } catch (error) {
      this.#ws.close(4002, error.message); // a page may not send 1002 itself
      return;
    }
    for (const frame of frames) this.#dispatch(frame);
  }

  #dispatch(frame) {
    const { type, flags, id, payload } = frame;
    const stream = this.#streams.get(id);
    switch (type) {
      case Type.HELLO_ACK: {
        const reader = new Reader(payload);
        this.features = reader.u32();
        this.maxStreams = reader.u32();
        if (payload.byteLength >= 16) {
          this.maxPayload = reader.u32();
          this.initialCredit = reader.u32();
        }
        this.#helloAck.resolve(this);
        break;
      }
      case Type.OPEN_OK: stream?._opened.resolve(); break;
      case Type.OPEN_ERR:
        this.#streams.delete(id);
        stream?._opened.reject(new Ksw1Error('OpenErr', OPEN_ERRORS, payload));
        break;
      case Type.DATA: stream?._receive(payload, flags & EOF); break;
      case Type.CLOSE:
      case Type.CLOSE_ACK: {
        this.#streams.delete(id);
        const reason = payload.byteLength >= 4 ? new Reader(payload).u32() : 0;
        stream?._end(reason ? new Error(`stream ${id} closed by the gateway (reason ${reason})`) : null);
        break;
      }
      case Type.DNS_RESULT:
      case Type.DNS_ERR: this.#answer(this.#dns, frame); break;
      case Type.PKCS11_RESPONSE: this.#answer(this.#pkcs11, frame); break;
      case Type.PING: this.#send(Type.PONG, 0, payload); break;
      default: // Pong, DataAck and unknown types: nothing to do (protocol.md §2)
    }
  }

  #closed(event) {
    // a refused handshake shows only as 1006: browsers hide the HTTP status from pages
    const error = new Error(`WebSocket closed (code ${event.code}${event.reason ? `: ${event.reason}` : ''})`);
    this.#helloAck.reject(error);
    for (const stream of this.#streams.values()) stream._end(error);
    for (const table of [this.#dns, this.#pkcs11]) {
      for (const answer of table.values()) answer.reject(error);
      table.clear();
    }
    this.#streams.clear();
    this.#closedWith.resolve(event.code);
  }
}

function formatAddress(bytes) {
  if (bytes.byteLength === 4) return bytes.join('.');
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const groups = Array.from({ length: 8 }, (_, i) => view.getUint16(2 * i).toString(16));
  return groups.join(':').replace(/(^|:)0(:0)+(:|$)/, '::'); // first run of zeros as ::
}

// A KSW1 tunnel (docs/protocol.md) on Node's `ws` package, driven the way the
// polyfill's WsTunnelManager drives a browser WebSocket: subprotocol auth-<token>,
// binaryType arraybuffer, one frame per message, ids from 1, a 1 MiB send window per
// stream with FlowControl and DataAck for what the reader consumes. Written from the
// protocol's description; it shares no code with ksw1fast, so it can catch what the project's own client
// would agree with.
import { WebSocket } from 'ws'

export const Type = {
  Hello: 0x01, HelloAck: 0x02, Open: 0x10, OpenOk: 0x11, OpenErr: 0x12, Data: 0x20,
  DataAck: 0x21, Close: 0x30, CloseAck: 0x31, DnsQuery: 0x40, DnsResult: 0x41, DnsErr: 0x42,
  Pkcs11Request: 0x50, Pkcs11Response: 0x51,
}
export const FlowControl = 0x01
export const MiB = 1 << 20
const WAIT_MS = 10000         // the longest any single wait may take
const MAGIC = 0x3157534b             // "KSW1" read as a little-endian u32
const HEADER = 16
const EOF = 0x01
const WINDOW = MiB                   // the polyfill's initialTxCredit; also the gateway's send window
const CHUNK = 64 * 1024              // Data payload per frame, as a wasm write would hand over
const EMPTY = Buffer.alloc(0)

export function frame (type, id, payload = EMPTY, flags = 0) {
  const out = Buffer.allocUnsafe(HEADER + payload.length)
  out.writeUInt32LE(MAGIC, 0)
  out.writeUInt8(1, 4)
  out.writeUInt8(type, 5)
  out.writeUInt8(flags, 6)
  out.writeUInt8(0, 7)
  out.writeUInt32LE(id, 8)
  out.writeUInt32LE(payload.length, 12)
  payload.copy(out, HEADER)
  return out
}

/** Inbound messages are one byte stream: a frame may span messages, a message hold several. */
class FrameReader {
  constructor () { this.buffer = EMPTY }

  * feed (message) {
    this.buffer = this.buffer.length ? Buffer.concat([this.buffer, message]) : message
    let at = 0
    while (this.buffer.length - at >= HEADER) {
      if (this.buffer.readUInt32LE(at) !== MAGIC || this.buffer[at + 4] !== 1) {
        throw new Error(`bad frame header ${this.buffer.subarray(at, at + HEADER).toString('hex')}`)
      }
      const end = at + HEADER + this.buffer.readUInt32LE(at + 12)
      if (this.buffer.length < end) break
      yield {
        type: this.buffer[at + 5], flags: this.buffer[at + 6],
        id: this.buffer.readUInt32LE(at + 8), payload: this.buffer.subarray(at + HEADER, end),
      }
      at = end
    }
    this.buffer = this.buffer.subarray(at)
  }
}

/** Rejects when `promise` has not settled within `ms`. */
export function within (promise, ms, what) {
  let timer
  const late = new Promise((resolve, reject) => {
    timer = setTimeout(() => reject(new Error(`no ${what} within ${ms} ms`)), ms)
  })
  return Promise.race([promise, late]).finally(() => clearTimeout(timer))
}

/** One TCP stream or UDP flow. read() hands out one Data payload (one datagram for UDP). */
class Stream {
  constructor (tunnel, id) {
    this.tunnel = tunnel
    this.id = id
    this.opened = undefined   // true after OpenOk, the OpenErr's text after one
    this.chunks = []
    this.eof = false          // the peer sent Data+EOF
    this.ended = null         // the Close or CloseAck frame that ended the stream
    this.txCredit = WINDOW
    this.unacked = 0          // received but not yet consumed: what the gateway may not exceed
  }

  async write (data = EMPTY, { eof = false } = {}) {
    let at = 0
    do {
      const n = Math.min(CHUNK, data.length - at)
      if (this.tunnel.flowControl && n > 0) {
        await this.tunnel.until(() => this.txCredit >= n || this.ended, `credit on stream ${this.id}`)
      }
      if (this.ended) throw new Error(`stream ${this.id} ended while writing`)
      const last = at + n >= data.length
      this.tunnel.send(frame(Type.Data, this.id, data.subarray(at, at + n), eof && last ? EOF : 0))
      this.txCredit -= n
      at += n
    } while (at < data.length)
  }

  /** The next payload, or null at EOF or when the stream ended; consuming it returns credit. */
  async read () {
    await this.tunnel.until(() => this.chunks.length || this.eof || this.ended,
      `data on stream ${this.id}`)
    const chunk = this.chunks.shift()
    if (!chunk) return null
    this.consumed(chunk.length)
    return chunk
  }

  consumed (n) {
    this.unacked -= n
    if (this.tunnel.flowControl) this.tunnel.send(frame(Type.DataAck, this.id, u32(n)))
  }

  async readExactly (n) {
    const parts = []
    let have = 0
    while (have < n) {
      const chunk = await this.read()
      if (!chunk) throw new Error(`stream ${this.id}: EOF after ${have} of ${n} bytes`)
      parts.push(chunk)
      have += chunk.length
    }
    const all = Buffer.concat(parts)
    if (all.length > n) throw new Error(`stream ${this.id}: ${all.length - n} bytes beyond ${n}`)
    return all
  }

  async readToEof () {
    const parts = []
    for (let chunk; (chunk = await this.read());) parts.push(chunk)
    if (!this.eof) throw new Error(`stream ${this.id} ended by ${describe(this.ended)} without EOF`)
    return Buffer.concat(parts)
  }

  /** The frame that ends the stream: the gateway's Close, or CloseAck to ours. */
  async ending () {
    await this.tunnel.until(() => this.ended, `Close or CloseAck on stream ${this.id}`)
    return this.ended
  }

  close () {
    this.tunnel.send(frame(Type.Close, this.id, u32(0)))
  }
}

export class Tunnel {
  /** Opens the WebSocket and completes Hello; `ca` (PEM) is trusted for wss://. */
  static async connect (url, { token, features, ca }) {
    const tunnel = new Tunnel(url, token, features, ca)
    await tunnel.until(() => tunnel.granted !== undefined, 'HelloAck')
    return tunnel
  }

  constructor (url, token, features, ca) {
    this.token = token
    this.problems = []        // protocol violations seen by the frame handler
    this.errors = []          // the WebSocket's error events
    this.closeEvent = null
    this.streams = new Map()
    this.nextStream = 1
    this.dns = new Map()      // query id -> its answer, null until it comes
    this.nextDns = 1
    this.pkcs11 = new Map()
    this.nextPkcs11 = 1
    this.waiters = []
    this.reader = new FrameReader()
    this.ws = new WebSocket(url, [`auth-${token}`], ca ? { ca } : {})
    this.ws.binaryType = 'arraybuffer'
    this.ws.onopen = () => this.send(frame(Type.Hello, 0, Buffer.concat([u32(features), u32(64)])))
    this.ws.onmessage = (event) => this.received(event.data)
    this.ws.onerror = (event) => { this.errors.push(event.message); this.wake() }
    this.ws.onclose = (event) => { this.closeEvent = event; this.wake() }
  }

  /** What the polyfill's disconnect() does: drop every handler, then close() without a code. */
  disconnect () {
    this.ws.onopen = this.ws.onmessage = this.ws.onclose = this.ws.onerror = null
    if (this.ws.readyState === WebSocket.OPEN) this.ws.close()
  }

  get flowControl () { return (this.granted & FlowControl) !== 0 }

  send (bytes) { this.ws.send(bytes) }

  /** Waits until cond() holds, re-checked on every inbound message and WebSocket event. */
  async until (cond, what, ms = WAIT_MS) {
    const deadline = Date.now() + ms
    while (!cond()) {
      if (this.closeEvent) {
        throw new Error(`WebSocket closed (code ${this.closeEvent.code}` +
          `${this.errors.length ? ', error: ' + this.errors.join('; ') : ''}) awaiting ${what}`)
      }
      const left = deadline - Date.now()
      if (left <= 0) throw new Error(`no ${what} within ${ms} ms`)
      await within(new Promise((resolve) => this.waiters.push(resolve)), left, what)
    }
  }

  wake () {
    const waiters = this.waiters
    this.waiters = []
    for (const resolve of waiters) resolve()
  }

  received (data) {
    if (!(data instanceof ArrayBuffer)) {
      this.problems.push(`a ${typeof data} message; KSW1 is binary only`)
      return
    }
    try {
      for (const f of this.reader.feed(Buffer.from(data))) this.handle(f)
    } catch (error) {
      this.problems.push(error.message)
    }
    this.wake()
  }

  handle ({ type, flags, id, payload }) {
    const stream = this.streams.get(id)
    switch (type) {
      case Type.HelloAck:
        this.granted = payload.readUInt32LE(0)
        this.maxStreams = payload.readUInt32LE(4)
        // the extension the polyfill never reads: max_payload, initial_credit
        this.initialCredit = payload.length >= 16 ? payload.readUInt32LE(12) : null
        return
      case Type.OpenOk: case Type.OpenErr:
        if (!stream || stream.opened !== undefined) break
        stream.opened = type === Type.OpenOk ? true : openError(payload)
        return
      case Type.Data:
        if (!stream) break
        if (payload.length) {
          stream.chunks.push(payload)
          stream.unacked += payload.length
          if (this.flowControl && stream.unacked > WINDOW) {
            this.problems.push(`stream ${id}: the gateway sent ${stream.unacked} bytes ` +
              `unacknowledged, beyond the ${WINDOW}-byte window`)
          }
        }
        if (flags & EOF) stream.eof = true
        return
      case Type.DataAck:
        if (!stream) break
        if (!this.flowControl) this.problems.push(`DataAck on stream ${id} without FlowControl`)
        stream.txCredit += payload.readUInt32LE(0)
        return
      case Type.Close: case Type.CloseAck:
        if (!stream) break
        stream.ended = { type, reason: payload.length >= 4 ? payload.readUInt32LE(0) : null }
        this.streams.delete(id)
        return
      case Type.DnsResult: case Type.DnsErr:
        if (this.dns.get(id) !== null) break
        this.dns.set(id, type === Type.DnsResult ? dnsAddresses(payload) : openError(payload))
        return
      case Type.Pkcs11Response:
        if (this.pkcs11.get(id) !== null) break
        this.pkcs11.set(id, { status: payload[0], body: payload.subarray(1) })
        return
      default:
        this.problems.push(`unexpected frame type 0x${type.toString(16)} on id ${id}`)
        return
    }
    this.problems.push(`frame type 0x${type.toString(16)} for unknown or answered id ${id}`)
  }

  /** A stream to host:port (proto 1 TCP, 2 UDP); throws on OpenErr. */
  async open (host, port, proto = 1) {
    const stream = new Stream(this, this.nextStream++)
    this.streams.set(stream.id, stream)
    const addr = Buffer.from(host)
    const token = Buffer.from(this.token)  // the polyfill repeats its token in every Open
    this.send(frame(Type.Open, stream.id, Buffer.concat([
      Buffer.from([proto, 1]), u16(port), u16(addr.length), addr, u16(token.length), token])))
    await this.until(() => stream.opened !== undefined, `OpenOk for stream ${stream.id}`)
    if (stream.opened !== true) throw new Error(`Open ${host}:${port} refused: ${stream.opened}`)
    return stream
  }

  /** Addresses (dotted or colon text) for name, or throws with the DnsErr. */
  async lookup (name, family = 0) {
    const id = this.nextDns++
    const bytes = Buffer.from(name)
    const result = await this.request(this.dns, id, frame(Type.DnsQuery, id,
      Buffer.concat([Buffer.from([family]), u16(bytes.length), bytes])), `DnsResult for ${name}`)
    if (!Array.isArray(result)) throw new Error(`DnsErr for ${name}: ${result}`)
    return result
  }

  /** One PKCS#11 RPC: { status, body }. */
  async call (fn, args = EMPTY) {
    const id = this.nextPkcs11++
    return this.request(this.pkcs11, id, frame(Type.Pkcs11Request, id,
      Buffer.concat([u16(fn), args])), `Pkcs11Response to fn 0x${fn.toString(16)}`)
  }

  /** Sends a query and waits for the answer the frame handler files under its id. */
  async request (answers, id, bytes, what) {
    answers.set(id, null)
    this.send(bytes)
    await this.until(() => answers.get(id) !== null, what)
    const answer = answers.get(id)
    answers.delete(id)
    return answer
  }
}

export function u16 (n) { const b = Buffer.alloc(2); b.writeUInt16LE(n); return b }
export function u32 (n) { const b = Buffer.alloc(4); b.writeUInt32LE(n); return b }

/** OpenErr and DnsErr share a shape: u8 code, u16 length, UTF-8 message. */
function openError (p) {
  return `code ${p[0]} "${p.subarray(3, 3 + p.readUInt16LE(1)).toString()}"`
}

function dnsAddresses (p) {
  const out = []
  for (let at = 2, i = 0; i < p.readUInt16LE(0); i++) {
    const len = p.readUInt16LE(at)
    const a = p.subarray(at + 2, at + 2 + len)
    out.push(len === 4 ? [...a].join('.')
      : new URL(`http://[${a.toString('hex').match(/.{4}/g).join(':')}]`).hostname.slice(1, -1))
    at += 2 + len
  }
  return out
}

export function describe (ended) {
  if (!ended) return 'nothing'
  return ended.type === Type.Close ? `Close(reason ${ended.reason})` : 'CloseAck'
}

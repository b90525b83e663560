// Drives a ksw1fast gateway the way the polyfill's WsTunnelManager does, on Node's `ws`
// package, and exits 0 only when every check passed; each failed check is one line on
// stderr. Run by tests/test_node_client.py, which starts the targets:
//
//   --echo PORT        TCP: echoes until EOF, then closes
//   --greeting PORT    TCP: sends GREETING first, then echoes until EOF, then closes
//   --sink PORT        TCP: reads to EOF, then answers "<bytes> <sha256 hex>" and closes
//   --early-eof PORT   TCP: sends "bye\n" and shuts its write side, then reads to EOF
//   --udp PORT         UDP: echoes each datagram
//   --dns-name NAME --dns-address ADDR      a name that resolves to ADDR (among others)
//   --pkcs11-label L --pkcs11-pin PIN       a token the gateway's --pkcs11-lib has
//   --url, --token, --features 0x2e|0x2f, --ca PEM (trusted for wss://)
import { createHash, randomBytes } from 'node:crypto'
import { readFileSync } from 'node:fs'
import { parseArgs } from 'node:util'
import { WebSocket } from 'ws'
import { FlowControl, MiB, Tunnel, Type, describe, u32, within } from './ksw1.mjs'

const GREETING = 'hello from the target\n'
const CLOSE_MS = 5000
let failures = 0

const REQUIRED = ['url', 'token', 'features', 'echo', 'greeting', 'sink', 'early-eof', 'udp',
  'dns-name', 'dns-address', 'pkcs11-label', 'pkcs11-pin']
const { values: opt } = parseArgs({
  options: Object.fromEntries([...REQUIRED, 'ca'].map((name) => [name, { type: 'string' }])),
})
const missing = REQUIRED.filter((name) => !(name in opt))
if (missing.length) {
  console.error(`ksw1_client.mjs: missing --${missing.join(', --')}`)
  process.exit(2)
}
const features = Number(opt.features)
const connectOptions = { token: opt.token, features, ca: opt.ca && readFileSync(opt.ca) }
const port = (name) => Number(opt[name])

/** A failed check is printed at once: a crash later must not hide it. */
function check (ok, what) {
  if (ok) return
  failures++
  console.error(what)
}

/** Runs one scenario; an exception is its failed check. */
async function scenario (name, body) {
  try {
    await body()
  } catch (error) {
    check(false, `${name}: ${error.message}`)
  }
}

async function endsNormally (stream, what) {
  const ended = await stream.ending()
  check(ended.type === Type.Close && ended.reason === 0,
    `${what}: stream ended by ${describe(ended)}, expected Close(reason 0)`)
}

async function echo (tunnel) {
  const stream = await tunnel.open('127.0.0.1', port('echo'))
  const sent = randomBytes(MiB)
  const [back] = await Promise.all([stream.readExactly(sent.length), stream.write(sent)])
  check(back.equals(sent), 'echo: 1 MiB came back different')
  await stream.write(undefined, { eof: true })
  check((await stream.readToEof()).length === 0, 'echo: bytes after the echo')
  await endsNormally(stream, 'echo')
}

/** FlowControl: 3 MiB through one stream against a slow reader, so both windows fill. */
async function credit (tunnel) {
  const stream = await tunnel.open('127.0.0.1', port('echo'))
  const sent = randomBytes(3 * MiB)
  const reader = async () => {
    const parts = []
    let have = 0
    while (have < sent.length) {
      await tunnel.until(() => stream.chunks.length || stream.eof || stream.ended, 'echoed data')
      if (!stream.chunks.length) throw new Error(`stream ended after ${have} bytes`)
      await new Promise((resolve) => setTimeout(resolve, 5))  // let the window fill first
      for (const chunk of stream.chunks.splice(0)) {
        parts.push(chunk)
        have += chunk.length
        stream.consumed(chunk.length)
      }
    }
    return Buffer.concat(parts)
  }
  const [back] = await Promise.all([reader(), stream.write(sent)])
  check(back.equals(sent), 'credit: 3 MiB came back different')
  await stream.write(undefined, { eof: true })
  await stream.readToEof()
  await endsNormally(stream, 'credit')
}

/** The target speaks first: the client reads before it writes anything. */
async function greeting (tunnel) {
  const stream = await tunnel.open('127.0.0.1', port('greeting'))
  const hello = await stream.readExactly(GREETING.length)
  check(hello.toString() === GREETING, `greeting: got ${JSON.stringify(hello.toString())}`)
  await stream.write(Buffer.from('ping'))
  check((await stream.readExactly(4)).toString() === 'ping', 'greeting: no echo after it')
  await stream.write(undefined, { eof: true })
  await stream.readToEof()
  await endsNormally(stream, 'greeting')
}

/** The client half-closes first and still reads the target's answer. */
async function clientHalfClose (tunnel) {
  const stream = await tunnel.open('127.0.0.1', port('sink'))
  const sent = randomBytes(200 * 1024)
  await stream.write(sent, { eof: true })
  const answer = (await stream.readToEof()).toString()
  const expected = `${sent.length} ${createHash('sha256').update(sent).digest('hex')}`
  check(answer === expected, `client half-close: target answered ${JSON.stringify(answer)}`)
  await endsNormally(stream, 'client half-close')
}

/** The target half-closes first and the client still writes (the test checks the target got it). */
async function targetHalfClose (tunnel) {
  const stream = await tunnel.open('127.0.0.1', port('early-eof'))
  const bye = await stream.readToEof()
  check(bye.toString() === 'bye\n', `target half-close: got ${JSON.stringify(bye.toString())}`)
  await stream.write(Buffer.alloc(100 * 1024, 'after the target EOF\n'), { eof: true })
  await endsNormally(stream, 'target half-close')
}

async function udp (tunnel) {
  const flow = await tunnel.open('127.0.0.1', port('udp'), 2)
  const datagrams = [1, 100, 1200, 8000].map((size) => randomBytes(size))
  for (const d of datagrams) await flow.write(d)
  const back = []
  for (const _ of datagrams) back.push(await flow.read())
  const key = (list) => list.map((d) => d?.toString('hex')).sort().join()
  check(key(back) === key(datagrams), `udp: datagrams came back as sizes ${back.map((d) => d?.length)}`)
  flow.close()
  const ended = await flow.ending()
  check(ended.type === Type.CloseAck, `udp: Close answered by ${describe(ended)}, expected CloseAck`)
}

async function dns (tunnel) {
  const any = await tunnel.lookup(opt['dns-name'])
  check(any.includes(opt['dns-address']), `dns: ${opt['dns-name']} gave ${any}`)
  const v4 = await tunnel.lookup(opt['dns-name'], 4)
  check(v4.includes(opt['dns-address']) && v4.every((a) => a.includes('.')),
    `dns: family 4 gave ${v4}`)
}

/** Reads the wire types of docs/pkcs11.md §1 from a response body. */
class Body {
  constructor (bytes) { this.bytes = bytes; this.at = 0 }
  u8 () { return this.bytes[this.at++] }
  u32 () { this.at += 4; return this.bytes.readUInt32LE(this.at - 4) }
  u64 () { this.at += 8; return Number(this.bytes.readBigUInt64LE(this.at - 8)) }
  bytesField () { const n = this.u32(); this.at += n; return this.bytes.subarray(this.at - n, this.at) }
  string () { return this.bytesField().toString() }
}

async function ok (tunnel, name, fn, args) {
  const { status, body } = await tunnel.call(fn, args)
  if (status === 0) return new Body(body)
  const detail = status === 2 ? `CKR 0x${body.readUInt32LE(0).toString(16)} ${body.subarray(4)}`
    : new Body(body).string()
  throw new Error(`${name} answered status ${status}: ${detail}`)
}

/** The reference client's sequence, on the token the test made. */
async function pkcs11 (tunnel) {
  const info = await ok(tunnel, 'GetInfo', 0x0009)
  const cryptoki = info.u8()
  check(cryptoki >= 2, `pkcs11: GetInfo says cryptoki version ${cryptoki}`)
  const slots = await ok(tunnel, 'GetSlotList', 0x0000, Buffer.from([1]))
  const ids = Array.from({ length: slots.u32() }, () => slots.u64())
  let slot
  for (const id of ids) {
    const token = await ok(tunnel, 'GetTokenInfo', 0x000b, u32(id))
    if (token.string() === opt['pkcs11-label']) slot = id
  }
  if (slot === undefined) throw new Error(`no token "${opt['pkcs11-label']}" in slots ${ids}`)
  const session = (await ok(tunnel, 'OpenSession', 0x0004, Buffer.concat([u32(slot), u32(3)]))).u32()
  const pin = Buffer.from(opt['pkcs11-pin'])
  await ok(tunnel, 'Login', 0x0100, Buffer.concat([u32(session), u32(1), u32(pin.length), pin]))
  const random = (await ok(tunnel, 'GenerateRandom', 0x010e, Buffer.concat([u32(session), u32(32)])))
    .bytesField()
  check(random.length === 32, `pkcs11: GenerateRandom(32) gave ${random.length} bytes`)
  await ok(tunnel, 'Logout', 0x0101, u32(session))
  await ok(tunnel, 'CloseSession', 0x0102, u32(session))
}

/** 32 streams opened at once, their writes interleaved frame by frame. */
async function interleaved (tunnel) {
  const streams = await Promise.all(Array.from({ length: 32 },
    () => tunnel.open('127.0.0.1', port('echo'))))
  const sent = streams.map(() => randomBytes(64 * 1024))
  const backs = Promise.all(streams.map((s, i) => s.readExactly(sent[i].length)))
  for (let at = 0; at < 64 * 1024; at += 4096) {
    await Promise.all(streams.map((s, i) => s.write(sent[i].subarray(at, at + 4096))))
  }
  const back = await backs
  const wrong = streams.filter((s, i) => !back[i].equals(sent[i])).map((s) => s.id)
  check(!wrong.length, `interleaved: streams ${wrong} came back different`)
  await Promise.all(streams.map((s) => s.write(undefined, { eof: true })))
  await Promise.all(streams.map(async (s) => {
    await s.readToEof()
    await endsNormally(s, `interleaved stream ${s.id}`)
  }))
}

/** close() without a code, with listeners: a clean close reading 1005 and no error event. */
async function closeWithListeners (tunnel) {
  tunnel.ws.close()
  await tunnel.until(() => tunnel.closeEvent, 'close event after close()', CLOSE_MS)
  const event = tunnel.closeEvent
  check(!tunnel.errors.length, `close: error event: ${tunnel.errors.join('; ')}`)
  check(event.code === 1005, `close: close event has code ${event.code}, expected 1005`)
  check(event.reason === '', `close: close event has reason ${JSON.stringify(event.reason)}`)
  check(event.wasClean, 'close: wasClean is false')
}

/** The polyfill's disconnect() with a stream open: no handler is left to catch an 'error',
 *  so a bad close code from the gateway would crash this process. */
async function disconnectLikeThePolyfill () {
  const tunnel = await Tunnel.connect(opt.url, connectOptions)
  const stream = await tunnel.open('127.0.0.1', port('echo'))
  await stream.write(Buffer.from('left open'))
  await stream.readExactly(9)
  tunnel.disconnect()
  const closed = new Promise((resolve) => {
    const poll = () => tunnel.ws.readyState === WebSocket.CLOSED ? resolve() : setTimeout(poll, 10)
    poll()
  })
  await within(closed, CLOSE_MS, 'closed socket after disconnect()')
}

async function main () {
  const tunnel = await Tunnel.connect(opt.url, connectOptions)
  check(tunnel.ws.protocol === `auth-${opt.token}`,
    `hello: the 101 selected subprotocol ${JSON.stringify(tunnel.ws.protocol)}`)
  check(tunnel.granted === features, `hello: features 0x${tunnel.granted.toString(16)} granted ` +
    `for 0x${features.toString(16)}`)
  check(tunnel.maxStreams === 64, `hello: max_streams ${tunnel.maxStreams} for 64`)
  if (features & FlowControl) {  // the polyfill assumes 1 MiB without reading the extension
    check(tunnel.initialCredit >= MiB, `hello: initial_credit ${tunnel.initialCredit} < 1 MiB`)
  }
  // echo, dns and pkcs11 start together, so stream 1, DNS query 1 and PKCS#11 query 1 coexist
  await Promise.all([
    scenario('echo', () => echo(tunnel)),
    scenario('dns', () => dns(tunnel)),
    scenario('pkcs11', () => pkcs11(tunnel)),
    scenario('greeting', () => greeting(tunnel)),
    scenario('client half-close', () => clientHalfClose(tunnel)),
    scenario('target half-close', () => targetHalfClose(tunnel)),
    scenario('udp', () => udp(tunnel)),
    scenario('interleaved', () => interleaved(tunnel)),
    ...(features & FlowControl ? [scenario('credit', () => credit(tunnel))] : []),
  ])
  for (const problem of tunnel.problems) check(false, `protocol: ${problem}`)
  await scenario('close', () => closeWithListeners(tunnel))
  await scenario('disconnect', disconnectLikeThePolyfill)
}

// a wait that outlives its timer is a bug here; this never keeps the process alive
setTimeout(() => {
  console.error('ksw1_client.mjs: still running after 60 s')
  process.exit(1)
}, 60000).unref()

await scenario('connect', main)
if (failures) process.exit(1)
// no process.exit() on success: the process ends when the closed sockets are gone, and an
// uncaught 'error' from the disconnected WebSocket would end it non-zero instead
console.log(`ksw1_client.mjs: all checks passed (features 0x${features.toString(16)})`)

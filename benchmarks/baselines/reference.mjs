// Starts the Node reference KSW1 server (the polyfill's ws-gateway server.ts bundled
// into one CommonJS file: see benchmarks/README.md) on 127.0.0.1:PORT and says where.
// Usage: node reference.mjs BUNDLE PORT
import { pathToFileURL } from 'node:url'

const [bundle, port] = process.argv.slice(2)
const module = await import(pathToFileURL(bundle).href)
const { createTcpGatewayServer } = module.default ?? module
const server = await createTcpGatewayServer({ host: '127.0.0.1', port: Number(port) })
console.error(`reference serving ws://127.0.0.1:${server.port}/`)

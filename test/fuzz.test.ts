// Fuzzing the whole gateway (issue 4): generated methods, paths, headers and bodies, and mangled
// raw HTTP, against a real fleet for a bounded time. Afterwards the gateway must still serve,
// every answer must have had a contract status and format, every GPU must be free and no GPU may
// have run two requests at once.
//
// Replay a run with the seed it prints: FUZZ_SEED=<seed> npx tap test/fuzz.test.ts
// (FUZZ_MS sets the time budget, default 15000; FUZZ_ONLY=<n> sends only request n of the seed.)
import t from 'tap'
import http from 'node:http'
import type { AddressInfo } from 'node:net'
import { randomInt } from 'node:crypto'
import { setTimeout as sleep } from 'node:timers/promises'
import Fastify from 'fastify'
import maestro from '../app.js'
import { httpServerOptions } from '../services/http/http-server.js'
import { startFleet } from './helpers/gateway.js'
import { rawRequest, type RawResponse } from './helpers/raw-http.js'
import { scrape } from './helpers/prometheus.js'

const SEED = process.env.FUZZ_SEED != null ? Number(process.env.FUZZ_SEED) : randomInt(2 ** 31)
const BUDGET_MS = Number(process.env.FUZZ_MS ?? 15_000)
const ONLY = process.env.FUZZ_ONLY != null ? Number(process.env.FUZZ_ONLY) : undefined
const WORKERS = 6
const BODY_LIMIT = 65_536
const API_KEY = 'fuzz-key'
const ADMIN_TOKEN = 'fuzz-admin'

/** mulberry32: small, fast, and the same sequence for the same seed everywhere. */
function prng (seed: number): () => number {
  let a = seed >>> 0
  return () => {
    a = (a + 0x6d2b79f5) >>> 0
    let x = Math.imul(a ^ (a >>> 15), 1 | a)
    x = (x + Math.imul(x ^ (x >>> 7), 61 | x)) ^ x
    return ((x ^ (x >>> 14)) >>> 0) / 4294967296
  }
}

class Gen {
  constructor (readonly next: () => number) {}
  int (n: number): number { return Math.floor(this.next() * n) }
  chance (p: number): boolean { return this.next() < p }
  pick<T> (items: readonly T[]): T { return items[this.int(items.length)] }
  /** Any UTF-16 text: ASCII, controls, other planes, lone surrogates. */
  /** Percent-encoded text (lone surrogates, which cannot be encoded, become '?'). */
  encoded (max: number): string {
    return encodeURIComponent(this.text(max).replace(/[\ud800-\udfff]/g, '?'))
  }

  text (max: number): string {
    let out = ''
    const length = this.int(max + 1)
    for (let i = 0; i < length; i++) {
      const kind = this.int(6)
      out += kind < 3
        ? String.fromCharCode(0x20 + this.int(95))
        : kind === 3 ? String.fromCharCode(this.int(0x20)) : kind === 4 ? String.fromCodePoint(this.int(0x10ffff)) : this.pick(['"', '\\', '*', '?', '[', ']', '%', '_', ':', '{', '}', "'", '\n', '\u0000'])
    }
    return out
  }

  json (depth: number): unknown {
    const kind = this.int(depth > 0 ? 8 : 6)
    switch (kind) {
      case 0: return null
      case 1: return this.chance(0.5)
      case 2: return this.pick([0, -1, 1e308, -0, 2 ** 53 + 1, 0.1, 1e-300])
      case 3: return this.text(20)
      case 4: return this.pick(['m', 'sd', 'big', ''])
      case 5: return this.int(1000)
      case 6: return Array.from({ length: this.int(4) }, () => this.json(depth - 1))
      default: return Object.fromEntries(Array.from({ length: this.int(4) }, () => [this.pick(['model', 'prompt', 'stream', 'messages', 'options', 'keep_alive', '__proto__', 'input', this.text(8)]), this.json(depth - 1)]))
    }
  }
}

const POST_ROUTES = ['/api/chat', '/api/generate', '/api/embed', '/api/embeddings', '/api/show', '/txt2img', '/img2img', '/upload',
  '/v1/audio/transcriptions', '/v1/chat/completions', '/v1/completions', '/v1/embeddings', '/v1/images/generations', '/gpu/reserve', '/gpu/ping', '/gpu/release']
const GET_ROUTES = ['/', '/api/version', '/api/tags', '/api/ps', '/v1/models', '/v1/models/m', '/v1/models/big', '/health', '/health/live', '/health/ready', '/gpu/status', '/metrics']
const DELETE_ROUTES = ['/gpu/cache', '/cache']
/** "METHOD path" of every route, for the error-format checks. */
const KNOWN = new Set([...POST_ROUTES.map((r) => `POST ${r}`), ...GET_ROUTES.flatMap((r) => [`GET ${r}`, `HEAD ${r}`]), ...DELETE_ROUTES.map((r) => `DELETE ${r}`)])
const MODELS = ['m', 'M:latest', 'big', 'm2', 'sd', 'w', 'nope', '', '*', 'm\u0000', 'x'.repeat(5000), 'x'.repeat(257), 'm'.repeat(256), "m'; --", 'm*', 'sd:latest']
/**
 * Body memory (BODY_MEMORY_LIMIT) just under BODY_LIMIT: of the big bodies made below, those over
 * BODY_LIMIT are 413, those just under it 503 (no room), the rest fit when nothing else is held.
 */
const BODY_MEMORY = BODY_LIMIT - 16
/** Top-level keys Ollama's Go decoder would read as model, stream or keep_alive (as raw JSON text). */
const CASE_VARIANTS = ['"Model"', '"MODEL"', '"mOdEl"', '"\\u004dodel"', '"KEEP_ALIVE"', '"Keep_Alive"', '"\u212Aeep_alive"', '"\\u212aeep_alive"', '"Stream"', '"\u017Ftream"', '"STREAM"']

/** A valid body with one case-variant key added (the gateway must refuse it, never forward it). */
function caseVariantBody (g: Gen, path: string): string {
  const valid = JSON.stringify(validBody(g, path))
  const value = JSON.stringify(g.pick(['big', 'm', 0, false, true, null, '5m']))
  return g.chance(0.5) ? `{${g.pick(CASE_VARIANTS)}:${value},${valid.slice(1)}` : `${valid.slice(0, -1)},${g.pick(CASE_VARIANTS)}:${value}}`
}

/** Routes whose body goes to an upstream (a case variant or a long name must never get there). */
const FORWARDING_ROUTES = new Set(['/api/chat', '/api/generate', '/api/embed', '/api/embeddings', '/api/show', '/txt2img', '/img2img', '/v1/chat/completions', '/v1/completions', '/v1/embeddings', '/v1/images/generations'])

function validBody (g: Gen, path: string): unknown {
  const model = g.pick(MODELS)
  switch (path) {
    case '/api/chat': return { model, messages: [{ role: 'user', content: g.text(20) }], stream: g.pick([true, false, null, undefined, 'yes']), options: { num_predict: g.int(4) } }
    case '/api/generate': return { model, prompt: g.text(30), stream: g.pick([true, false, undefined]), keep_alive: g.pick([undefined, '5m', 0, -1, 'x']) }
    case '/api/embed': return { model, input: g.pick(['a', ['a', 'b'], 42, null]) }
    case '/api/embeddings': return { model, prompt: g.text(10) }
    case '/api/show': return g.chance(0.3) ? { name: model } : { model }
    case '/txt2img': return { model, prompt: g.text(20), num_inference_steps: g.pick([1, 2, 'x', -1]) }
    case '/img2img': return { model, prompt: g.text(10), file_id: g.text(10), strength: 0.5 }
    case '/v1/chat/completions': return { model, messages: [{ role: 'user', content: g.text(20) }], stream: g.pick([true, false, undefined]) }
    case '/v1/completions': return { model, prompt: g.text(20), stream: g.pick([true, false]) }
    case '/v1/embeddings': return { model, input: g.pick(['a', ['a', 'b'], 1]) }
    case '/v1/images/generations': return { model, prompt: g.text(10), n: g.pick([1, 2, 0, -1, 100, 'x']), size: g.pick(['64x64', 'big', undefined]), response_format: g.pick(['b64_json', 'url', undefined]) }
    case '/gpu/reserve': return { outputType: g.pick(['text', 'images', 'speech', 'video', 1]), model }
    // GPU ids as seeded (1..5): a release of GPUs in flight must be refused (409), not obeyed
    default: return g.pick([{ leaseId: g.text(12) }, { gpuIds: [g.text(3)] }, { gpuIds: 'x' }, {}, { leaseId: 'a', gpuIds: ['1'] },
      { gpuIds: [String(1 + g.int(5))] }, { gpuIds: ['1', '2', '3', '4', '5'] }])
  }
}

function mutate (g: Gen, text: string): string {
  let out = text
  for (let n = 1 + g.int(4); n > 0; n--) {
    const at = g.int(out.length + 1)
    const op = g.int(3)
    out = op === 0 ? out.slice(0, at) + g.text(3) + out.slice(at) : op === 1 ? out.slice(0, at) + out.slice(at + 1 + g.int(5)) : out.slice(0, at) + g.pick(['{', '}', '[', ']', '"', ',', ':', '\\']) + out.slice(at + 1)
  }
  return out
}

/** Routes that take a multipart upload, streamed through. */
const UPLOAD_ROUTES = new Set(['/upload', '/v1/audio/transcriptions'])
/** Boundaries of the multipart bodies made here (`b` is also in CONTENT_TYPES). */
const BOUNDARIES = ['b', 'fuzz-boundary']

/**
 * A multipart body, whole or cut short: a `model` field before the file, twice, after the file,
 * on both sides of it, or missing; other fields between; the file with odd names and types.
 */
function multipartBody (g: Gen): string {
  const boundary = g.pick(BOUNDARIES)
  const part = (disposition: string, value: string, type?: string): string =>
    `--${boundary}\r\nContent-Disposition: form-data; ${disposition}\r\n${type != null ? `Content-Type: ${type}\r\n` : ''}\r\n${value}\r\n`
  const model = (): string => part(g.pick(['name="model"', 'name="model"', 'name=model', 'NAME="model"', 'name="model"; filename="m.txt"']), g.pick([...MODELS, ' w ', g.text(8)]))
  const file = (): string => part(`name="file"; filename="${g.pick(['a.wav', 'a.png', '', 'a"b'])}"`, g.pick(['RIFF\u0000\u0000\u0000\u0000WAVE', '\ufffdPNG', '', g.text(40)]), g.pick(['audio/wav', 'image/png', undefined]))
  const field = (): string => part(`name="${g.pick(['language', 'response_format', 'prompt', 'temperature'])}"`, g.pick(['en', 'json', 'text', '0.5', g.text(10)]))
  const layout = g.pick([[model, file], [model, model, file], [file, model], [model, file, model], [field, model, field, file], [model, field, model, file], [file], [model], []])
  // closed, closed without the final CRLF, or cut short
  return layout.map((make) => make()).join('') + g.pick([`--${boundary}--\r\n`, `--${boundary}--`, '', `--${boundary}`])
}

function bodyFor (g: Gen, path: string): string | Buffer | undefined {
  if (UPLOAD_ROUTES.has(path) && g.chance(0.6)) return multipartBody(g)
  const kind = g.int(100)
  if (kind < 45) return JSON.stringify(validBody(g, path))
  if (kind < 60) return mutate(g, JSON.stringify(validBody(g, path)))
  if (kind < 72) return JSON.stringify(g.json(4))
  if (kind < 77) {
    const depth = 1 + g.int(50_000)
    return g.chance(0.5) ? '['.repeat(depth) + ']'.repeat(depth) : `{"model":"m","prompt":"x","context":${'['.repeat(depth) + ']'.repeat(depth)}}`
  }
  if (kind < 83) return `{"model":"${g.pick(['m', 'big', 'sd'])}","prompt":"${'p'.repeat(BODY_LIMIT - 30 + g.int(60))}"}`
  if (kind < 86) return Buffer.from(Array.from({ length: g.int(200) }, () => g.int(256)))
  if (kind < 87) return `{"model":"m","model":"${g.pick(MODELS)}","prompt":"x","stream":false}`
  if (kind < 89) return caseVariantBody(g, path)
  if (kind < 93) return multipartBody(g)
  if (kind < 96) return ''
  return undefined
}

function pathFor (g: Gen, method: string): string {
  const base = method === 'POST' ? g.pick(POST_ROUTES) : method === 'DELETE' ? g.pick(DELETE_ROUTES) : g.pick(GET_ROUTES)
  if (g.chance(0.7)) return base
  return g.pick([
    `${base}?${g.encoded(10)}=${g.encoded(10)}`,
    `${base}/`, `${base}/..`, `${base}/../../etc/passwd`, `/${base}`, `${base}%2F..`, base.toUpperCase(), `${base}%00`, `/api/%2e%2e${base}`,
    `${base}#x`, `${base};x`, '/' + g.encoded(12), `/v1/models/${g.encoded(20)}`, `/api/${g.pick(['pull', 'push', 'delete', 'copy', 'create', 'blobs/sha256:x'])}`,
    `/gpu/${g.text(4).replace(/[^a-z]/g, '')}`, '/*', `${base}?model=m&url=http://127.0.0.1:1/`
  ])
}

const CONTENT_TYPES = ['application/json', 'application/x-www-form-urlencoded', 'text/plain', 'multipart/form-data; boundary=b', ';;;', 'application/json; charset=utf-16', 'image/png', 'a/b; c', '',
  'multipart/form-data', 'multipart/form-data; boundary=', 'multipart/form-data; boundary="b"', 'multipart/form-data;boundary=fuzz-boundary; charset=utf-8', 'MULTIPART/FORM-DATA; BOUNDARY=b',
  'multipart/form-data; boundary=b; boundary=c', 'multipart/form-data; boundary="' + 'b'.repeat(80), 'application/json; boundary=b', 'text/plain; charset=utf-8', '\u00ff\u00fe', 'x'.repeat(4000), '/', '%%%', 'application/json' + ';'.repeat(500)]
/**
 * Origin headers (contract section 18): a loopback page, another site, a sandboxed page (`null`),
 * garbage and a very long one. A disallowed Origin on a POST, PATCH or DELETE may be 403.
 */
const ORIGINS = ['http://localhost:3000', 'https://evil.example', 'null', 'http://127.0.0.1', 'http://[::1]:8080', 'file://', 'app://x', 'http://localhost.evil.example',
  'http://localhost:3000/path', 'HTTPS://EVIL.EXAMPLE', 'https://' + 'a'.repeat(8000) + '.example', '*', 'http://', '://', 'null, null']

function headersFor (g: Gen, method: string, path: string, body: string | Buffer | undefined): Record<string, string> {
  const headers: Record<string, string> = {}
  const admin = ['/gpu/reserve', '/gpu/cache', '/cache', '/gpu/ping', '/gpu/release'].includes(path)
  const auth = g.int(10)
  // The admin token goes with GPU-id releases too: a GPU serving a request in flight answers 409,
  // so an authorised release never frees GPUs under a running request (the overlap check below).
  if (auth < 7) headers.authorization = `Bearer ${admin && g.chance(0.8) ? ADMIN_TOKEN : API_KEY}`
  else if (auth === 7) headers.authorization = g.pick(['Bearer', 'Basic ' + API_KEY, `Bearer ${API_KEY}x`, `bearer ${API_KEY}`, 'Bearer ' + g.text(30).replace(/[^\x21-\x7e]/g, '')])
  const multipart = typeof body === 'string' && body.startsWith('--')
  if (multipart && g.chance(0.6)) headers['content-type'] = `multipart/form-data; boundary=${body.slice(2, body.indexOf('\r\n'))}`
  else if (body !== undefined && g.chance(0.8)) {
    const type = g.pick(CONTENT_TYPES)
    if (type !== '') headers['content-type'] = type
  }
  if (g.chance(0.3)) headers.origin = g.chance(0.2) ? g.text(30).replace(/[^\x21-\x7e]/g, '') : g.pick(ORIGINS)
  if (g.chance(0.3)) headers['x-request-id'] = g.pick(['fuzz-1', 'a b', 'x'.repeat(200), '../..', 'id:1/2'])
  if (g.chance(0.2)) headers.connection = g.pick(['close', 'keep-alive', 'keep-alive, x-hop', 'x-hop'])
  if (g.chance(0.1)) headers['x-hop'] = 'secret'
  if (g.chance(0.1)) headers['x-maestro-gpus'] = '1,2,3'
  if (g.chance(0.1)) headers.te = 'trailers'
  if (g.chance(0.05)) headers.expect = g.pick(['100-continue', 'nonsense'])
  if (g.chance(0.05)) headers['transfer-encoding'] = 'chunked'
  if (g.chance(0.05)) headers['content-encoding'] = 'gzip'
  // over Node's 16 KiB of headers now and then: 431
  if (g.chance(0.05)) headers['x-long'] = 'l'.repeat(g.int(20_000))
  // Node's client frames a DELETE or OPTIONS body only when told its length.
  if (body !== undefined && headers['transfer-encoding'] == null) headers['content-length'] = String(Buffer.byteLength(body))
  return headers
}

/** Mangled raw HTTP: framing the gateway must refuse cleanly, or parse unambiguously. */
function rawFor (g: Gen): string {
  const body = JSON.stringify(validBody(g, '/api/generate'))
  const target = g.pick(['/api/generate', 'http://127.0.0.1:1/api/generate', '//evil/api/generate', '/api/generate?x', '*', 'api/generate', '/api/../api/generate'])
  const auth = `Authorization: Bearer ${API_KEY}\r\n`
  const lines: string[] = [`${g.pick(['POST', 'POST', 'GET', 'PO ST', 'post', 'CONNECT'])} ${target} ${g.pick(['HTTP/1.1', 'HTTP/1.1', 'HTTP/1.0', 'HTTP/2.0', 'HTTP/1.1 x'])}`]
  if (g.chance(0.9)) lines.push(`Host: ${g.pick(['x', 'evil:80', '127.0.0.1:1', ''])}`)
  lines.push(auth.trim(), 'Connection: close')
  const framing = g.int(10)
  let payload = body
  if (framing === 0) lines.push(`Content-Length: ${body.length}`, 'Transfer-Encoding: chunked')
  else if (framing === 1) lines.push(`Content-Length: ${body.length}`, `Content-Length: ${body.length + 1}`)
  else if (framing === 2) { lines.push('Transfer-Encoding: chunked'); payload = `${g.pick([body.length.toString(16), 'zz', '-1', '1;ext'])}\r\n${body}\r\n0\r\n\r\n` }
  else if (framing === 3) lines.push(`Content-Length: ${body.length + g.int(20)}`) // body ends early: the request timeout ends it
  else if (framing === 4) lines.push(`Content-Length: ${g.pick(['-1', '1e2', '0x10', ' ', 'abc', '99999999999999999999'])}`)
  else if (framing === 5) lines.push(`Transfer-Encoding: ${g.pick(['gzip', 'chunked, gzip', 'identity', 'xchunked'])}`)
  else lines.push(`Content-Length: ${body.length}`)
  if (g.chance(0.3)) lines.push(g.pick(['X-Null: a\u0000b', 'Bad Header: 1', ': empty', 'X-Fold: a\r\n folded', 'X-Lf: a\nX-Other: b', `X-Big: ${'b'.repeat(70_000)}`]))
  return lines.join('\r\n') + '\r\n\r\n' + payload
}

interface Outcome {
  /** undefined: the connection closed before an answer */
  status: number | undefined
  headers: Record<string, string | string[] | undefined>
  body: string
  error?: string
}

async function viaHttp (url: string, agent: http.Agent, method: string, path: string, headers: Record<string, string>, body: string | Buffer | undefined): Promise<Outcome | 'client-refused'> {
  return await new Promise((resolve, reject) => {
    let req: http.ClientRequest
    try {
      // host and path apart: a URL string would have Node resolve `%2e%2e` before sending
      const { hostname, port } = new URL(url)
      req = http.request({ host: hostname, port, path, method, headers, agent, timeout: 20_000 })
    } catch {
      resolve('client-refused') // Node's client will not even send it (bad header value, unescaped path)
      return
    }
    req.on('timeout', () => { req.destroy(new Error('no answer within 20 s')) })
    req.on('response', (res) => {
      const chunks: Buffer[] = []
      res.on('data', (c: Buffer) => chunks.push(c))
      res.on('end', () => resolve({ status: res.statusCode, headers: res.headers, body: Buffer.concat(chunks).toString('utf8') }))
      res.on('error', reject)
      res.on('aborted', () => resolve({ status: res.statusCode, headers: res.headers, body: Buffer.concat(chunks).toString('utf8') }))
    })
    req.on('error', (err: NodeJS.ErrnoException) => {
      // The server may close a connection it refused (413, 401 with a body) before all was sent.
      if (err.code === 'ECONNRESET' || err.code === 'EPIPE') resolve({ status: undefined, headers: {}, body: '', error: err.code })
      else reject(err)
    })
    try {
      req.end(body)
    } catch {
      resolve('client-refused')
    }
  })
}

/**
 * Statuses the gateway itself may answer with here: section 8 and what Node's HTTP parser answers.
 * Not 502 or 504: every upstream of this fleet is up and fast, so those would mean the gateway
 * broke a request on its way (as it did with a forwarded `Expect` header).
 */
const GATEWAY_STATUSES = new Set([200, 400, 401, 404, 408, 413, 417, 431, 503])
/** What the gateway may answer on one route only. */
const ROUTE_STATUSES: Record<string, number[]> = { '/gpu/release': [409] }
/** Routes forwarded without a lease: the upstream's own answers come back as they are. */
const FORWARDED_WITHOUT_LEASE = new Set(['/api/show', '/upload'])
/** The model-store routes the gateway refuses for the whole fleet (501, contract section 14). */
const REFUSED = new Set(['/api/delete', '/api/copy', '/api/create', '/api/push'])

/**
 * An answer that came from an upstream (every one healthy and fast here): never a 5xx, and a 200
 * is whole and in its route's format, so a gateway that garbled or cut an answer is caught.
 */
function upstreamProblem (route: string, method: string, status: number, headers: Outcome['headers'], body: string): string | undefined {
  if (status >= 500) return `upstream answered ${status} through the gateway: ${body.slice(0, 200)}`
  if (status !== 200 || method === 'HEAD') return undefined
  const type = String(headers['content-type'] ?? '')
  const json = (text: string): any => { try { return JSON.parse(text) } catch { return undefined } }
  if (['/api/chat', '/api/generate'].includes(route)) {
    const lines = body.trim().split('\n').map(json)
    if (lines.some((l) => l === undefined)) return `a ${route} answer that is not JSON lines: ${body.slice(0, 200)}`
    if (lines.at(-1)?.done !== true) return `a ${route} answer without its done line: ${body.slice(-200)}`
    if (lines.length > 1 && !/^application\/x-ndjson/.test(type)) return `a streamed ${route} answer as ${type}`
  } else if (route === '/v1/audio/transcriptions') {
    // `response_format=text`: the transcript as text/plain; otherwise {"text"}
    const text = /^text\/plain/.test(type) ? body : json(body)?.text
    if (typeof text !== 'string' || !text.startsWith('transcript of ')) return `a transcription answer that is not the transcript: ${body.slice(0, 200)}`
  } else if (['/api/embed', '/api/embeddings', '/api/show', '/v1/embeddings', '/v1/images/generations'].includes(route) || (route.startsWith('/v1/') && !/event-stream/.test(type))) {
    if (json(body) === undefined) return `a ${route} answer that is not JSON: ${body.slice(0, 200)}`
  } else if (route.startsWith('/v1/')) {
    if (!body.trimEnd().endsWith('data: [DONE]')) return `an SSE ${route} answer without its [DONE]: ${body.slice(-200)}`
  } else if (['/txt2img', '/img2img'].includes(route)) {
    if (type !== 'image/png' || !body.startsWith('\ufffdPNG')) return `a ${route} answer that is not a PNG (${type})`
  }
  return undefined
}

/**
 * GET (and HEAD) of a catalogue or status route, exactly as listed, with the API key and nothing
 * odd in the request: the gateway has every part up, so that is a 200.
 */
function getProblem (method: string, path: string, headers: Record<string, string>, body: unknown, outcome: Outcome): string | undefined {
  if ((method !== 'GET' && method !== 'HEAD') || !GET_ROUTES.includes(path) || body !== undefined) return undefined
  if (headers.authorization !== `Bearer ${API_KEY}` || headers.expect != null || headers['x-long'] != null || headers['transfer-encoding'] != null) return undefined
  return outcome.status === 200 ? undefined : `${method} ${path} with the key answered ${outcome.status ?? 'nothing'}`
}

function check (path: string, method: string, outcome: Outcome, raw: boolean, origin = false): string | undefined {
  const { status, headers, body } = outcome
  if (status === undefined) return undefined
  const fromUpstream = headers['x-maestro-assignment'] != null
  const route = path.split('?')[0].split('#')[0]
  const known = KNOWN.has(`${method} ${route}`)
  if (status === 500 && !fromUpstream) return `gateway error 500: ${body.slice(0, 200)}`
  // Node's HTTP parser answers broken requests itself, before any route is known.
  if (status === 417 && body === '') return undefined
  const refused = status === 501 && (REFUSED.has(route) || route.startsWith('/api/blobs/'))
  const refusedOrigin = status === 403 && origin && ['POST', 'PATCH', 'DELETE'].includes(method)
  if (!fromUpstream && !refused && !refusedOrigin && !GATEWAY_STATUSES.has(status) && !(ROUTE_STATUSES[route] ?? []).includes(status) && !(FORWARDED_WITHOUT_LEASE.has(route) && status < 500)) return `status ${status} is not one of the gateway's`
  // a gateway's 503 is a queue or memory limit: it says when to come back
  if (status === 503 && !fromUpstream && !route.startsWith('/health') && headers['retry-after'] == null) return `503 without Retry-After: ${body.slice(0, 200)}`
  if (fromUpstream) return upstreamProblem(route, method, status, headers, body)
  if (status < 400 || method === 'HEAD') return undefined
  if (body === '' && raw && status === 400) return undefined // Node's own answer to a request without Host
  let parsed: any
  try { parsed = JSON.parse(body) } catch { return FORWARDED_WITHOUT_LEASE.has(route) ? undefined : `error body is not JSON: ${body.slice(0, 200)}` }
  // Node's parser answers these before any route is known, so in the plain format.
  if (typeof parsed?.error === 'string' && /^(request headers too large|request not received in time|malformed HTTP request)/.test(parsed.error)) return undefined
  if (typeof parsed?.error === 'string') {
    if (known && route.startsWith('/v1/')) return `ollama-style error on an OpenAI route: ${body.slice(0, 200)}`
    if (known && ['/txt2img', '/img2img', '/upload'].includes(route) && parsed.detail !== parsed.error) return `diffusion error without detail: ${body.slice(0, 200)}`
    return undefined
  }
  if (typeof parsed?.error?.message === 'string' && route.startsWith('/v1/')) return undefined
  if (FORWARDED_WITHOUT_LEASE.has(route)) return undefined
  return `error body not in the contract's format: ${body.slice(0, 200)}`
}

/** A body the gateway must refuse (a case-variant key, a model over 256 characters) that an upstream answered anyway. */
function forwardedWhatItMustNot (path: string, method: string, outcome: Outcome, body: string | Buffer | undefined): string | undefined {
  const route = path.split('?')[0].split('#')[0]
  if (method !== 'POST' || !FORWARDING_ROUTES.has(route) || typeof body !== 'string' || outcome.headers['x-maestro-assignment'] == null) return undefined
  let parsed: unknown
  try { parsed = JSON.parse(body) } catch { return undefined }
  if (parsed == null || typeof parsed !== 'object' || Array.isArray(parsed)) return undefined
  const keys = Object.keys(parsed)
  if (keys.some((k) => ['model', 'stream', 'keep_alive'].includes(k.replace(/\u212a/g, 'k').replace(/\u017f/g, 's').toLowerCase()) && !['model', 'stream', 'keep_alive'].includes(k))) {
    return 'a body with a case-variant key reached an upstream'
  }
  const { model, name } = parsed as { model?: unknown, name?: unknown }
  if ((typeof model === 'string' && model.length > 256) || (typeof name === 'string' && name.length > 256)) return 'a model name over 256 characters reached an upstream'
  return undefined
}

t.test(`fuzz: generated requests for ${BUDGET_MS} ms leave the gateway serving, every answer in the contract, every GPU free`, async (t) => {
  t.comment(`seed ${SEED} (replay: FUZZ_SEED=${SEED} npx tap test/fuzz.test.ts)`)
  const fleet = await startFleet(t, {
    gpus: [1, 1, 1, 1, 1, 1],
    upstreams: [
      { model: 'm', gpus: [0], simulator: { tokens: 3, tokenDelayMs: 5, models: ['m:latest'] } },
      { model: 'big', gpus: [1, 2], simulator: { tokens: 3, tokenDelayMs: 5 } },
      { model: 'm2', gpus: [2], simulator: { tokens: 3, tokenDelayMs: 5 } },
      { model: 'sd', kind: 'diffusor', gpus: [3], simulator: { imageDelayMs: 5 } },
      { model: 'w', kind: 'speech', gpus: [4], simulator: { tokenDelayMs: 5 } },
      // answers slowly: still in flight when the release below arrives, however loaded the machine
      { model: 'slow', gpus: [5], simulator: { tokens: 3, tokenDelayMs: 1000 } }
    ],
    options: { API_KEYS: API_KEY, ADMIN_TOKEN, BODY_LIMIT, BODY_MEMORY_LIMIT: BODY_MEMORY, QUEUE_TIMEOUT_MS: 4000, UPSTREAM_HEADERS_TIMEOUT_MS: 5000 }
  })
  // The standalone server's own timeouts, shortened, so requests cut short end within the budget.
  const app = Fastify({ logger: false, ...httpServerOptions({ headersTimeoutMs: 2000, requestTimeoutMs: 3000, checkIntervalMs: 200 }) })
  await app.register(maestro, { dotenv: false, ...fleet.options })
  await app.listen({ port: 0, host: '127.0.0.1' })
  t.teardown(async () => await app.close())
  const url = `http://127.0.0.1:${(app.server.address() as AddressInfo).port}`
  const agent = new http.Agent({ keepAlive: true, maxSockets: WORKERS })
  t.teardown(() => agent.destroy())

  const failures: string[] = []
  const statuses = new Map<string, number>()
  let tried = 0
  let refusedByClient = 0
  let next = ONLY ?? 0
  const deadline = performance.now() + BUDGET_MS

  /** What request n was, for failures that surface as exceptions. */
  const described = new Map<number, string>()
  const one = async (index: number): Promise<void> => {
    const g = new Gen(prng(SEED ^ Math.imul(index + 1, 0x9e3779b1)))
    if (g.chance(0.15)) {
      const request = rawFor(g)
      const sentAt = performance.now()
      const answer = await rawRequest(url, Buffer.from(request, 'latin1'), { timeoutMs: 10_000 })
      if (process.env.FUZZ_DEBUG != null) process.stderr.write(`FUZZ #${index} ${sentAt.toFixed(0)}-${performance.now().toFixed(0)} RAW ${JSON.stringify(request.slice(0, 300))} → ${answer.responses.map((r) => r.status).join(',')}\n`)
      tried++
      const label = `#${index} raw ${JSON.stringify(request.slice(0, 80))}`
      if (!answer.closed) failures.push(`${label}: no answer and not closed within 10 s`)
      // Node closes a CONNECT without a word (no tunnels here); everything else gets an answer.
      if (answer.responses.length === 0 && !request.startsWith('CONNECT ')) failures.push(`${label}: no answer ${JSON.stringify(answer.raw.slice(0, 120))}`)
      for (const res of answer.responses.slice(0, 1) as RawResponse[]) {
        statuses.set(`raw ${res.status}`, (statuses.get(`raw ${res.status}`) ?? 0) + 1)
        const problem = check('/api/generate', 'POST', { status: res.status, headers: res.headers, body: res.body }, true)
        if (problem != null) failures.push(`${label}: ${problem}`)
      }
      return
    }
    const method = g.pick(['POST', 'POST', 'POST', 'POST', 'GET', 'GET', 'HEAD', 'DELETE', 'PUT', 'OPTIONS', 'PATCH'])
    const path = pathFor(g, method)
    // GET with a body now and then (a declared length must come with that many bytes, or the
    // next request on the connection would be read as its body)
    const body = method === 'HEAD' || (method === 'GET' && !g.chance(0.1)) ? undefined : bodyFor(g, path.split('?')[0])
    const headers = headersFor(g, method, path.split('?')[0], body)
    described.set(index, `${method} ${path.slice(0, 60)} ${JSON.stringify(headers).slice(0, 200)} ${JSON.stringify(typeof body === 'string' ? body.slice(0, 60) : body)}`)
    const sentAt = performance.now()
    const outcome = await viaHttp(url, agent, method, path, headers, body)
    if (process.env.FUZZ_DEBUG != null) process.stderr.write(`FUZZ #${index} ${sentAt.toFixed(0)}-${performance.now().toFixed(0)} ${method} ${path.slice(0, 80)} ${JSON.stringify(headers).slice(0, 300)} ${JSON.stringify(typeof body === 'string' ? body.slice(0, 200) : body)} → ${outcome === 'client-refused' ? outcome : `${outcome.status ?? `closed (${outcome.error ?? ''})`}`}\n`)
    if (outcome === 'client-refused') { refusedByClient++; return }
    tried++
    // Only a body the gateway refuses unread (too large, no key) may meet a closed connection
    // while it is still being sent; anything else must get an answer.
    if (outcome.status === undefined && (body === undefined || Buffer.byteLength(body) < 16_384) && headers['transfer-encoding'] == null && headers['x-long'] == null) {
      failures.push(`#${index} ${described.get(index) ?? ''}: connection closed without an answer (${outcome.error ?? ''})`)
    }
    statuses.set(String(outcome.status ?? 'closed'), (statuses.get(String(outcome.status ?? 'closed')) ?? 0) + 1)
    const problem = check(path, method, outcome, false, headers.origin != null) ?? getProblem(method, path, headers, body, outcome) ?? forwardedWhatItMustNot(path, method, outcome, body)
    if (problem != null) failures.push(`#${index} ${method} ${path.slice(0, 60)} ${JSON.stringify(typeof body === 'string' ? body.slice(0, 60) : body)} → ${outcome.status}: ${problem}`)
    // A reservation the fuzz made is handed back, as a client of the lease API would.
    if (method === 'POST' && path.split(/[?#]/)[0] === '/gpu/reserve' && outcome.status === 200) {
      const { leaseId } = JSON.parse(outcome.body) as { leaseId: string }
      const released = await fetch(url + '/gpu/release', { method: 'POST', headers: { authorization: `Bearer ${ADMIN_TOKEN}` }, body: JSON.stringify({ leaseId }) })
      if (released.status !== 200) failures.push(`#${index}: could not release reservation ${leaseId}: ${released.status}`)
    }
  }

  await Promise.all(Array.from({ length: ONLY != null ? 1 : WORKERS }, async () => {
    while (performance.now() < deadline) {
      const index = next++
      try {
        await one(index)
      } catch (err) {
        failures.push(`#${index} ${described.get(index) ?? ''}: ${(err as Error).message}`)
      }
      described.delete(index)
      if (ONLY != null) return
    }
  }))

  t.comment(`${tried} requests tried in ${BUDGET_MS} ms (${refusedByClient} more that Node's client would not send); statuses ${JSON.stringify(Object.fromEntries([...statuses].sort()))}`)
  t.ok(tried > (ONLY != null ? 0 : 100), 'a meaningful number of requests')
  t.same(failures.slice(0, 25), [], `${failures.length} answers outside the contract (first 25 shown; seed ${SEED})`)

  const health = await fetch(url + '/health')
  t.equal(health.status, 200, 'the gateway still answers')
  const served = await fetch(url + '/api/generate', { method: 'POST', headers: { authorization: `Bearer ${API_KEY}` }, body: '{"model":"big","prompt":"x","stream":false}' })
  t.equal(served.status, 200, 'and still serves')
  // The authorised release by GPU ids the fuzz sends, once for certain: GPUs in flight are refused.
  const inFlight = await fetch(url + '/api/generate', { method: 'POST', headers: { authorization: `Bearer ${API_KEY}` }, body: '{"model":"slow","prompt":"x"}' })
  const gpu = inFlight.headers.get('x-maestro-gpus') ?? ''
  const refused = await fetch(url + '/gpu/release', { method: 'POST', headers: { authorization: `Bearer ${ADMIN_TOKEN}`, 'content-type': 'application/json' }, body: JSON.stringify({ gpuIds: [gpu] }) })
  t.equal(refused.status, 409, `releasing GPU ${gpu} under a request in flight is refused`)
  t.match(await inFlight.text(), /"done":true/, 'and the request runs to its end')
  let held = await fleet.heldGpus()
  for (let i = 0; i < 100 && held.length > 0; i++) {
    await sleep(100)
    held = await fleet.heldGpus()
  }
  t.same(held, [], 'every GPU free')
  const store = await scrape(url)
  t.equal(store.value('maestro_slots_in_use'), 0, 'no slot in use')
  t.same(store.find('maestro_queue_depth').filter((s) => s.value !== 0), [], 'no request left in a queue')
  const bodyMemory = (await (await fetch(url + '/metrics')).text()).split('\n').find((l) => l.startsWith('maestro_body_memory_bytes '))
  t.equal(bodyMemory, 'maestro_body_memory_bytes 0', 'every request body given back to BODY_MEMORY_LIMIT')
  await fleet.recorder.whenIdle()
  t.same(fleet.recorder.overlaps, [], 'no GPU ran two requests at once')
  for (const overlap of fleet.recorder.overlaps.slice(0, 3)) {
    // What the upstreams received around it, to tell which requests ran together.
    const near = fleet.upstreams.flatMap((u) => u.requests.filter((r) => Math.abs(r.at - overlap.at) < 300)
      .map((r) => `${r.at.toFixed(0)} ${u.host} ${r.method} ${r.url} ${JSON.stringify(r.headers)} ${r.rawBody.slice(0, 120)}`))
    t.comment(`overlap on GPU ${overlap.gpuId} at ${overlap.at.toFixed(0)}:\n${near.sort().join('\n')}`)
  }
})

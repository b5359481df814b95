/**
 * Simulators of the upstreams the gateway leases, for the tests, the benchmark and `npm run demo`:
 * an Ollama server (native + OpenAI-compatible routes) and a stablediffusion-fastapi-multigpu server. Plain node:http, so the bytes on the wire
 * are exactly what is written here. Behaviour follows the project's notes on the upstream wire
 * formats (Ollama v0.33, FastAPI/uvicorn).
 *
 * Every POST that does model work is recorded on a GpuRecorder: `enter` when the request's headers
 * and body have arrived, `exit` (exactly once) just before `res.end()` or when the socket closes.
 */
import http from 'node:http'
import type { IncomingMessage, ServerResponse, OutgoingHttpHeaders } from 'node:http'
import type { AddressInfo, Socket } from 'node:net'
import { isIP } from 'node:net'
import os from 'node:os'
import { performance } from 'node:perf_hooks'
import { createHash, randomUUID, randomInt } from 'node:crypto'
import zlib from 'node:zlib'
import { GpuRecorder } from './gpu-recorder.js'
import { OLLAMA_EXTRA_ROUTES } from './ollama-extras.js'
import type { EnterOptions } from './gpu-recorder.js'

export { GpuRecorder }
export type { GpuOverlap, GpuEvent, GpuTogether } from './gpu-recorder.js'

export type Behaviour =
  | { kind: 'normal' }
  /**
   * stream `afterLines` lines (non-streamed bodies: headers and half the body, or nothing if 0) then
   * close the socket; `midLine`: first half of the next line too, so the cut falls inside a line
   */
  | { kind: 'die-mid-stream', afterLines: number, midLine?: boolean }
  /** accept the request and never send a status line, until the client or close() ends it */
  | { kind: 'stall-headers' }
  /** answer with that status and JSON body */
  | { kind: 'error', status: number, body: unknown }
  /** like die-mid-stream, but stall without ending instead of closing */
  | { kind: 'slow-body', afterLines: number, midLine?: boolean }
  /** Ollama only: stream `afterLines` lines then write `{"error":message}` and end the stream, status staying 200 */
  | { kind: 'error-mid-stream', afterLines: number, message: string }

export interface SimulatorOptions {
  /** 0 = random (default) */
  port?: number
  /** which GPUs this server owns; its work is recorded on them. Default: one GPU named after the server's host (`127.0.0.1:PORT`). */
  gpuIds?: string[]
  /** default: a recorder of its own (see Simulator.recorder) */
  recorder?: GpuRecorder
  /** what GET /api/tags, /api/ps and /v1/models list (default ['llama3.2:latest']) */
  models?: string[]
  /** tokens per generate/chat answer (default 5) */
  tokens?: number
  /** delay before each token (default 10) */
  tokenDelayMs?: number
  /** default 768 (nomic-embed-text's size; with 4-byte floats, far over Go's 2 KB before chunking) */
  embedDims?: number
  /** default '0.33.0' */
  version?: string
  /** default true: an empty 403 unless Host is localhost, loopback, a private IP, ... like Ollama on loopback */
  hostCheck?: boolean
  /** time a txt2img / img2img takes (default 20) */
  imageDelayMs?: number
  /** Ollama: OLLAMA_NUM_PARALLEL, requests one loaded model runs at once (default 1); more wait inside the server */
  numParallel?: number
  /** Ollama: time a model that is not resident takes to load before its first token (default 20) */
  loadMs?: number
  /** Ollama: OLLAMA_MAX_LOADED_MODELS (default 3); loading one more evicts the least recently used idle model */
  maxLoadedModels?: number
  /** Ollama: OLLAMA_KEEP_ALIVE, how long a model stays resident after its last request when the request names none (default 5 min) */
  keepAliveMs?: number
  /** Ollama: models resident when the server starts (default none, like a fresh `ollama serve`) */
  resident?: string[]
  /** Ollama: routes tried before the built-in ones (see OllamaRoute) */
  routes?: OllamaRoute[]
  /**
   * How long a request whose client went away keeps its GPU before the server notices (Ollama's
   * runner at its next token: default tokenDelayMs; the diffusion pipeline finishes its image:
   * default imageDelayMs). Settable later as `sim.cancelDelayMs`.
   */
  cancelDelayMs?: number
}

/** A model load (or unload) on an Ollama simulator. */
export interface ResidencyEvent {
  model: string
  /** performance.now() when the load finished / the model was dropped */
  at: number
}

export interface RecordedRequest {
  method: string
  /** path without the query string */
  path: string
  /** the request target as sent, with query string */
  url: string
  headers: Record<string, string | string[] | undefined>
  rawBody: string
  /** parsed JSON (undefined when not JSON); for multipart: `{ fields, files: [{ name, filename, contentType, size }] }` */
  body: any
  /** performance.now() when headers and body had arrived */
  at: number
}

export interface UploadedFile {
  filename: string
  contentType: string
  data: Buffer
}

export interface Simulator {
  url: string
  host: string
  port: number
  gpuIds: string[]
  recorder: GpuRecorder
  requests: RecordedRequest[]
  /** The gateway's background polls (User-Agent ending `upstream-poll`), kept apart from `requests`. */
  polls: RecordedRequest[]
  /** settable; applies to the lease-worthy POST routes */
  behaviour: Behaviour
  /** settable; see SimulatorOptions.cancelDelayMs */
  cancelDelayMs: number
  /** Stable Diffusion only: files received by /upload, by file_id */
  uploads: Map<string, UploadedFile>
  /** Ollama: every model load so far (its name as first requested), in order */
  loads: ResidencyEvent[]
  /** Ollama: every unload (keep_alive 0, expiry, eviction), in order */
  unloads: ResidencyEvent[]
  /** Ollama: the resident models' names (what /api/ps lists) */
  resident: () => string[]
  /** requests doing model work right now (not counting those waiting inside the server for a slot) */
  running: () => number
  activeConnections: () => number
  close: () => Promise<void>
}

// ---------------------------------------------------------------------------------------------
// shared plumbing

export interface Ctx {
  sim: Simulator
  req: IncomingMessage
  res: ServerResponse
  method: string
  path: string
  query: URLSearchParams
  raw: Buffer
  text: string
}

const sleep = async (ms: number): Promise<void> => await new Promise(resolve => setTimeout(resolve, ms))

/** Tracks one lease-worthy request on the recorder: exits exactly once. */
class Work {
  private id: number | null
  private readonly after: Array<() => void> = []
  constructor (private readonly recorder: GpuRecorder, gpuIds: string[], label: string, opts: EnterOptions) {
    this.id = recorder.enter(gpuIds, label, opts)
  }

  /** Run `fn` when the work is done (at once if it is). */
  onDone (fn: () => void): void {
    if (this.id === null) fn()
    else this.after.push(fn)
  }

  done (): void {
    if (this.id === null) return
    const id = this.id
    this.id = null
    this.recorder.exit(id)
    for (const fn of this.after.splice(0)) fn()
  }
}

/** One request/response, with the simulator's behaviour applied to successful answers. */
export class Exchange {
  closed = false
  /** complete answers longer than this go out chunked (Go's net/http); uvicorn/Starlette always sends a Content-Length */
  chunkedOver = GO_BUFFER
  private stopped = false
  private lines = 0
  private streamType = ''

  constructor (readonly res: ServerResponse, readonly behaviour: Behaviour, private readonly work: Work | null, cancelDelayMs = 0) {
    res.once('close', () => {
      this.closed = true
      // a client gone mid-answer: the server notices a little later, its GPU busy until then
      const work = this.work
      if (work !== null && cancelDelayMs > 0 && !res.writableFinished) setTimeout(() => work.done(), cancelDelayMs)
      else work?.done()
    })
  }

  get alive (): boolean {
    return !this.closed && !this.stopped && !this.res.writableEnded
  }

  /** Run `fn` when the model work is over (at once for an exchange that does none). */
  onDone (fn: () => void): void {
    if (this.work === null) fn()
    else this.work.onDone(fn)
  }

  /** A complete answer that is not subject to behaviours (errors). */
  plain (status: number, headers: OutgoingHttpHeaders, body: Buffer | string): void {
    if (!this.alive) return
    const buf = typeof body === 'string' ? Buffer.from(body) : body
    this.work?.done()
    this.res.writeHead(status, this.framed(headers, buf))
    if (buf.length > this.chunkedOver) this.res.write(buf) // written before end(): chunked, as Go sends it
    this.res.end(buf.length > this.chunkedOver ? undefined : buf)
  }

  /** The answer's framing as the server chooses it: Content-Length up to `chunkedOver` bytes, chunked beyond. */
  private framed (headers: OutgoingHttpHeaders, body: Buffer): OutgoingHttpHeaders {
    return body.length > this.chunkedOver ? headers : { ...headers, 'Content-Length': body.length }
  }

  /** A complete successful answer: die-mid-stream / slow-body cut it in half. */
  send (status: number, headers: OutgoingHttpHeaders, body: Buffer | string): void {
    if (!this.alive) return
    const buf = typeof body === 'string' ? Buffer.from(body) : body
    const b = this.behaviour
    if (b.kind === 'die-mid-stream' || b.kind === 'slow-body') {
      this.res.writeHead(status, this.framed(headers, buf))
      if (b.afterLines > 0) this.res.write(buf.subarray(0, Math.floor(buf.length / 2)))
      else this.res.flushHeaders()
      this.stop()
      return
    }
    this.plain(status, headers, buf)
  }

  /**
   * A stream's status and headers, written with its first line (as Ollama does: nothing reaches the
   * client before the first token), or at once when the behaviour cuts the stream before any line.
   */
  beginStream (contentType: string): boolean {
    if (!this.alive) return false
    this.streamType = contentType
    this.res.statusCode = 200
    this.res.setHeader('Content-Type', contentType)
    this.check()
    return this.alive
  }

  /** Writes one line (or SSE event); false once the stream must not go on. */
  line (chunk: string): boolean {
    if (!this.alive) return false
    const b = this.behaviour
    if ((b.kind === 'die-mid-stream' || b.kind === 'slow-body') && b.midLine === true && this.lines >= b.afterLines) {
      this.res.write(chunk.slice(0, Math.max(1, Math.floor(chunk.length / 2))))
      this.stop()
      return false
    }
    this.res.write(chunk)
    this.lines++
    this.check()
    return this.alive
  }

  endStream (last?: string): void {
    if (!this.alive) return
    this.work?.done()
    // written before end(): a stream stays chunked even when this is its only line
    if (last !== undefined) this.res.write(last)
    this.res.end()
  }

  private check (): void {
    const b = this.behaviour
    if ((b.kind === 'die-mid-stream' || b.kind === 'slow-body' || b.kind === 'error-mid-stream') && this.lines >= b.afterLines) {
      if (b.kind !== 'error-mid-stream' && b.midLine === true) return // cut inside the next line
      if (!this.res.headersSent) this.res.flushHeaders()
      if (b.kind === 'error-mid-stream') {
        this.work?.done()
        this.stopped = true
        this.res.end(this.streamType === SSE_TYPE
          ? `data: ${JSON.stringify(openAiError(500, b.message))}\n\n`
          : JSON.stringify({ error: b.message }) + '\n')
        return
      }
      this.stop()
    }
  }

  private stop (): void {
    this.stopped = true
    if (this.behaviour.kind !== 'die-mid-stream') return // slow-body: stay open, silent
    this.work?.done()
    // after what was written has been flushed, close the connection without ending the HTTP message
    const socket = this.res.socket as (Socket & { destroySoon?: () => void }) | null
    if (socket === null) return
    if (typeof socket.destroySoon === 'function') socket.destroySoon()
    else socket.end(() => socket.destroy())
  }
}

/** Go's net/http buffers this much of an answer: a longer one without Content-Length goes out chunked. */
const GO_BUFFER = 2048

function pathOf (url: string): { path: string, query: URLSearchParams } {
  const q = url.indexOf('?')
  return q < 0 ? { path: url, query: new URLSearchParams() } : { path: url.slice(0, q), query: new URLSearchParams(url.slice(q + 1)) }
}

function tryJson (text: string): unknown {
  try {
    return JSON.parse(text)
  } catch {
    return undefined
  }
}

async function startServer (
  opts: SimulatorOptions,
  parseBody: (ctx: Ctx) => unknown,
  route: (ctx: Ctx) => void
): Promise<Simulator> {
  const sockets = new Set<Socket>()
  const server = http.createServer({ noDelay: true })
  let sim: Simulator | null = null

  server.on('connection', (socket: Socket) => {
    sockets.add(socket)
    socket.once('close', () => sockets.delete(socket))
  })
  server.on('request', (req: IncomingMessage, res: ServerResponse) => {
    const chunks: Buffer[] = []
    req.on('data', (c: Buffer) => chunks.push(c))
    req.on('error', () => {})
    res.on('error', () => {})
    req.on('end', () => {
      const at = performance.now()
      if (sim === null) return
      const raw = Buffer.concat(chunks)
      const url = req.url ?? '/'
      const { path, query } = pathOf(url)
      const ctx: Ctx = { sim, req, res, method: req.method ?? 'GET', path, query, raw, text: raw.toString('utf8') }
      const poll = /upstream-poll$/.test(req.headers['user-agent'] ?? '')
      ;(poll ? sim.polls : sim.requests).push({ method: ctx.method, path, url, headers: req.headers, rawBody: ctx.text, body: parseBody(ctx), at })
      try {
        route(ctx)
      } catch (err) {
        if (!res.headersSent) {
          res.writeHead(500, { 'Content-Type': 'text/plain' })
          res.end(String(err))
        } else res.destroy()
      }
    })
  })

  await new Promise<void>((resolve, reject) => {
    server.once('error', reject)
    server.listen(opts.port ?? 0, '127.0.0.1', () => {
      server.off('error', reject)
      resolve()
    })
  })
  const port = (server.address() as AddressInfo).port
  const host = `127.0.0.1:${port}`
  let closing: Promise<void> | null = null
  sim = {
    url: `http://${host}`,
    host,
    port,
    gpuIds: opts.gpuIds ?? [host],
    recorder: opts.recorder ?? new GpuRecorder(),
    requests: [],
    polls: [],
    behaviour: { kind: 'normal' },
    cancelDelayMs: opts.cancelDelayMs ?? 0,
    uploads: new Map(),
    loads: [],
    unloads: [],
    resident: () => [],
    running: () => 0,
    activeConnections: () => [...sockets].filter(s => !s.destroyed).length,
    close: async () => {
      closing ??= new Promise<void>(resolve => {
        server.close(() => setImmediate(resolve)) // let the sockets' 'close' handlers (recorder exits) run first
        for (const s of sockets) s.destroy()
      })
      await closing
    }
  }
  return sim
}

let workSeq = 0

function beginWork (ctx: Ctx, route: string, model: string, capacity = 1): Exchange {
  const { sim } = ctx
  const behaviour = sim.behaviour
  const work = new Work(sim.recorder, sim.gpuIds, `${sim.host} ${route} ${model === '' ? '-' : model} #${++workSeq}`, { model, capacity })
  return new Exchange(ctx.res, behaviour, work, sim.cancelDelayMs)
}

/** Applies error / stall-headers; true when the request has been dealt with. */
function preempted (ex: Exchange, jsonType: string): boolean {
  const b = ex.behaviour
  if (b.kind === 'error') {
    ex.plain(b.status, { 'Content-Type': jsonType }, JSON.stringify(b.body))
    return true
  }
  return b.kind === 'stall-headers' // held open until the client or close() ends it
}

// ---------------------------------------------------------------------------------------------
// Ollama

const JSON_TYPE = 'application/json; charset=utf-8'
const NDJSON_TYPE = 'application/x-ndjson'
const SSE_TYPE = 'text/event-stream'
const MODIFIED_AT = '2025-01-01T00:00:00.000000000Z'

/** Ollama's model-name matching: case-insensitive, default host/namespace and tag `latest` implied. */
function modelKey (name: string): string {
  let n = name.toLowerCase()
  if (n.startsWith('registry.ollama.ai/')) n = n.slice('registry.ollama.ai/'.length)
  if (n.startsWith('library/')) n = n.slice('library/'.length)
  if (n.endsWith(':latest')) n = n.slice(0, -':latest'.length)
  return n
}

function displayName (name: string): string {
  const last = name.slice(name.lastIndexOf('/') + 1)
  return last.includes(':') ? name : `${name}:latest`
}

function digestOf (s: string): string {
  return createHash('sha256').update(s).digest('hex')
}

function modelDetails (name: string): Record<string, unknown> {
  const family = modelKey(name).replace(/^.*\//, '').replace(/[^a-z].*$/, '') || 'llama'
  return { parent_model: '', format: 'gguf', family, families: [family], parameter_size: '3.2B', quantization_level: 'Q4_K_M' }
}

function modelSize (name: string): number {
  return 1_000_000_000 + (parseInt(digestOf(name).slice(0, 6), 16) % 1_000_000_000)
}

/** Go's encoding/json type word for a JSON value. */
function goKind (v: unknown): string {
  if (Array.isArray(v)) return 'array'
  if (v === null) return 'null'
  switch (typeof v) {
    case 'number': return 'number'
    case 'string': return 'string'
    case 'boolean': return 'bool'
    default: return 'object'
  }
}

/** Something like the message Go's JSON decoder gives for text that does not parse. */
function goJsonError (text: string): string {
  try {
    JSON.parse(text)
    return 'invalid JSON'
  } catch (err) {
    const msg = (err as Error).message
    if (/end of JSON input/i.test(msg)) return 'unexpected EOF'
    const pos = /position (\d+)/.exec(msg)
    const p = pos !== null ? Number(pos[1]) : -1
    if (/non-whitespace character after JSON/i.test(msg) && p >= 0) return `invalid character '${text[p]}' after top-level value`
    if (/Expected property name/i.test(msg) && p >= 0) return `invalid character '${text[p]}' looking for beginning of object key string`
    let ch = p >= 0 ? text[p] : undefined
    if (ch === undefined) ch = /Unexpected token '?(.)'?/.exec(msg)?.[1]
    if (ch === undefined) ch = text.trim()[0] ?? ' '
    return `invalid character '${ch}' looking for beginning of value`
  }
}

/** Go's time.ParseDuration: the duration in ms, or an error message. */
function goDuration (s: string): { ms: number } | { error: string } {
  const quoted = JSON.stringify(s)
  let rest = s
  let sign = 1
  if (rest.startsWith('-') || rest.startsWith('+')) {
    if (rest[0] === '-') sign = -1
    rest = rest.slice(1)
  }
  if (rest === '0') return { ms: 0 }
  if (rest === '') return { error: `time: invalid duration ${quoted}` }
  const units: Record<string, number> = { ns: 1e-6, us: 1e-3, 'µs': 1e-3, 'μs': 1e-3, ms: 1, s: 1000, m: 60_000, h: 3_600_000 }
  let total = 0
  while (rest !== '') {
    const num = /^(\d*)(?:\.(\d*))?/.exec(rest)
    if (num === null || num[0] === '' || num[0] === '.' || (num[1] === '' && (num[2] ?? '') === '')) return { error: `time: invalid duration ${quoted}` }
    rest = rest.slice(num[0].length)
    const unit = /^[^0-9.]*/.exec(rest)?.[0] ?? ''
    if (unit === '') return { error: `time: missing unit in duration ${quoted}` }
    const factor = units[unit]
    if (factor === undefined) return { error: `time: unknown unit ${JSON.stringify(unit)} in duration ${quoted}` }
    total += Number(num[0]) * factor
    rest = rest.slice(unit.length)
  }
  return { ms: sign * total }
}

type FieldSpec = Record<string, ['string' | 'bool' | 'array' | 'object' | 'number' | 'duration' | 'any', string]>

const COMMON_FIELDS: FieldSpec = {
  model: ['string', 'string'],
  keep_alive: ['duration', '*api.Duration'],
  stream: ['bool', '*bool'],
  options: ['object', 'map[string]interface {}']
}

/** Mimics gin's ShouldBindJSON into an Ollama request struct: the body, or an error message. */
function bindGo (text: string, struct: string, fields: FieldSpec): { body: Record<string, any> } | { error: string, eof?: boolean } {
  if (text.trim() === '') return { error: 'EOF', eof: true }
  let v: unknown
  try {
    v = JSON.parse(text)
  } catch {
    return { error: goJsonError(text) }
  }
  if (v === null) v = {}
  if (typeof v !== 'object' || Array.isArray(v)) return { error: `json: cannot unmarshal ${goKind(v)} into Go value of type ${struct}` }
  const body = v as Record<string, any>
  const shortStruct = struct.replace(/^.*\./, '')
  for (const [field, [kind, goType]] of Object.entries({ ...COMMON_FIELDS, ...fields })) {
    const value = body[field]
    if (value === undefined || value === null || kind === 'any') continue
    if (kind === 'duration') {
      if (typeof value === 'number') continue
      if (typeof value === 'string') {
        const d = goDuration(value)
        if ('error' in d) return { error: d.error }
        continue
      }
      return { error: `Unsupported type: '${Array.isArray(value) ? '[]interface {}' : typeof value === 'boolean' ? 'bool' : 'map[string]interface {}'}'` }
    }
    if (goKind(value) !== kind) return { error: `json: cannot unmarshal ${goKind(value)} into Go struct field ${shortStruct}.${field} of type ${goType}` }
  }
  return { body }
}

/** keep_alive in ms; undefined when absent (server default). Negative = forever. */
function keepAliveMs (v: unknown): number | undefined {
  if (typeof v === 'number') return v * 1000
  if (typeof v === 'string') {
    const d = goDuration(v)
    return 'ms' in d ? d.ms : undefined
  }
  return undefined
}

/** The token ids of a generate's prompt template and answer: hundreds of ints, as a real `context` is. */
function contextTokens (prompt: string, answered: number): number[] {
  const n = 256 + promptTokens(prompt) + answered
  const h = createHash('sha256').update(prompt).digest()
  return Array.from({ length: n }, (_, i) => 128000 + ((h[i % h.length] * 257 + i * 7919) % 100000))
}

const WORDS = ['The', ' sky', ' is', ' blue', ' because', ' of', ' Rayleigh', ' scattering', ' of', ' sunlight', '.']

function tokensFor (limit: number | undefined, total: number): { words: string[], reason: 'stop' | 'length' } {
  const n = limit !== undefined && limit >= 0 && limit < total ? limit : total
  const words: string[] = []
  for (let i = 0; i < n; i++) words.push(WORDS[i % WORDS.length])
  return { words, reason: n < total ? 'length' : 'stop' }
}

/** A deterministic unit vector for a text, exactly representable as float32. */
export function embedVector (text: string, dims: number): number[] {
  const raw: number[] = []
  let block = 0
  while (raw.length < dims) {
    const h = createHash('sha256').update(`${block++}:${text}`).digest()
    for (let i = 0; i + 1 < h.length && raw.length < dims; i += 2) raw.push(h.readUInt16LE(i) / 32767.5 - 1)
  }
  const norm = Math.sqrt(raw.reduce((s, x) => s + x * x, 0)) || 1
  return raw.map(x => Math.fround(x / norm))
}

function float32Base64 (v: number[]): string {
  const buf = Buffer.alloc(v.length * 4)
  v.forEach((x, i) => buf.writeFloatLE(x, i * 4))
  return buf.toString('base64')
}

function promptTokens (s: unknown): number {
  const text = typeof s === 'string' ? s : JSON.stringify(s ?? '')
  return Math.max(1, Math.ceil(text.length / 4))
}

/** Ollama's allowedHostsMiddleware for a server listening on loopback. */
function allowedHost (hostHeader: string | undefined): boolean {
  if (hostHeader === undefined || hostHeader === '') return true
  let host = hostHeader.toLowerCase()
  const bracket = /^\[([^\]]+)\](?::\d+)?$/.exec(host)
  if (bracket !== null) host = bracket[1]
  else if (/^[^:]+:\d*$/.test(host)) host = host.slice(0, host.lastIndexOf(':'))
  if (isIP(host) !== 0) return isLocalIp(host)
  if (host === 'localhost' || host === os.hostname().toLowerCase()) return true
  return ['.localhost', '.local', '.internal'].some(tld => host.endsWith(tld))
}

function isLocalIp (ip: string): boolean {
  if (isIP(ip) === 4) {
    const [a, b] = ip.split('.').map(Number)
    if (a === 127 || a === 10 || ip === '0.0.0.0') return true
    if (a === 172 && b >= 16 && b <= 31) return true
    if (a === 192 && b === 168) return true
  } else {
    const v6 = ip.toLowerCase()
    if (v6 === '::1' || v6 === '::') return true
    if (/^f[cd][0-9a-f]{2}:/.test(v6)) return true
    const mapped = /^::ffff:(\d+\.\d+\.\d+\.\d+)$/.exec(v6)
    if (mapped !== null) return isLocalIp(mapped[1])
  }
  for (const addrs of Object.values(os.networkInterfaces())) {
    for (const a of addrs ?? []) if (a.address.toLowerCase() === ip.toLowerCase()) return true
  }
  return false
}

export interface OllamaState {
  models: string[]
  tokens: number
  tokenDelayMs: number
  embedDims: number
  version: string
  hostCheck: boolean
  numParallel: number
  loadMs: number
  maxLoadedModels: number
  keepAliveMs: number
  /** by modelKey */
  resident: Map<string, Resident>
  loading: Map<string, Promise<void>>
  loads: ResidencyEvent[]
  unloads: ResidencyEvent[]
  /** woken whenever a runner frees a slot or a model leaves */
  waiters: Array<() => void>
}

interface Resident {
  name: string
  /** Date.now() ms after which an idle model is unloaded; Infinity = never */
  expiresAt: number
  contextLength: number
  /** requests running on it now (at most numParallel) */
  busy: number
  lastUsed: number
}

/** What a route's handler gets: the request, its exchange, and the server's model runners. */
export interface OllamaRouteKit {
  st: OllamaState
  ctx: Ctx
  ex: Exchange
  /** the model is one this server has (case-insensitive, `:latest` implied) */
  known: (model: string) => boolean
  /**
   * Waits for a slot on the model's runner, loading the model first when it is not resident (load
   * time, eviction); the slot and the keep-alive are handled when the exchange's work is over.
   * False when the client left meanwhile.
   */
  run: (model: string, body: Record<string, any>) => Promise<boolean>
  /** keep_alive 0: drop the model now, or when its running requests end */
  unload: (model: string) => void
  /** the wire helpers of the built-in routes, for routes defined in other modules */
  wire: typeof WIRE
}

/**
 * One route of the Ollama simulator. Modules with more routes export a list of these (importing
 * only types from this file, so there is no import cycle) and are added to EXTRA_OLLAMA_ROUTES.
 */
export interface OllamaRoute {
  /** one method or several (Ollama answers HEAD on some GET routes only) */
  method: string | string[]
  path: string | RegExp
  /** model work: recorded on the GPU recorder and subject to the simulator's `behaviour` */
  work: boolean
  handle: (kit: OllamaRouteKit) => Promise<void> | void
}

/** Routes from other modules, tried before the built-in ones (they may replace one). */
const EXTRA_OLLAMA_ROUTES: OllamaRoute[] = [...OLLAMA_EXTRA_ROUTES]

export async function startSimulator (opts: SimulatorOptions = {}): Promise<Simulator> {
  const st: OllamaState = {
    models: [...(opts.models ?? ['llama3.2:latest'])],
    tokens: opts.tokens ?? 5,
    tokenDelayMs: opts.tokenDelayMs ?? 10,
    embedDims: opts.embedDims ?? 768,
    version: opts.version ?? '0.33.0',
    hostCheck: opts.hostCheck ?? true,
    numParallel: Math.max(1, opts.numParallel ?? 1),
    loadMs: opts.loadMs ?? 20,
    maxLoadedModels: Math.max(1, opts.maxLoadedModels ?? 3),
    keepAliveMs: opts.keepAliveMs ?? 5 * 60_000,
    resident: new Map(),
    loading: new Map(),
    loads: [],
    unloads: [],
    waiters: []
  }
  for (const m of opts.resident ?? []) st.resident.set(modelKey(m), { name: residentName(st, m), expiresAt: Infinity, contextLength: 4096, busy: 0, lastUsed: 0 })
  const routes = [...(opts.routes ?? []), ...EXTRA_OLLAMA_ROUTES, ...OLLAMA_ROUTES]
  const sim = await startServer({ ...opts, cancelDelayMs: opts.cancelDelayMs ?? st.tokenDelayMs }, ctx => tryJson(ctx.text), ctx => ollamaRoute(st, routes, ctx))
  sim.loads = st.loads
  sim.unloads = st.unloads
  sim.resident = () => { expire(st); return [...st.resident.values()].map(r => r.name) }
  sim.running = () => [...st.resident.values()].reduce((n, r) => n + r.busy, 0)
  return sim
}

/** The name a resident model is listed under: the server's own spelling of it. */
function residentName (st: OllamaState, model: string): string {
  return displayName(st.models.find(m => modelKey(m) === modelKey(model)) ?? model)
}

function wake (st: OllamaState): void {
  for (const w of st.waiters.splice(0)) w()
}

function drop (st: OllamaState, key: string): void {
  const r = st.resident.get(key)
  if (r === undefined) return
  st.resident.delete(key)
  st.unloads.push({ model: r.name, at: performance.now() })
  wake(st)
}

/** Unloads the idle models whose keep-alive has run out. */
function expire (st: OllamaState): void {
  const now = Date.now()
  for (const [key, r] of st.resident) if (r.busy === 0 && r.expiresAt <= now) drop(st, key)
}

/** A slot on the model's runner, loading (and evicting) first if needed; the runner's busy count is raised. */
async function acquireRunner (st: OllamaState, model: string, contextLength: number): Promise<Resident> {
  const key = modelKey(model)
  for (;;) {
    expire(st)
    const r = st.resident.get(key)
    if (r !== undefined) {
      if (r.busy < st.numParallel) {
        r.busy++
        r.lastUsed = performance.now()
        return r
      }
    } else {
      const loading = st.loading.get(key)
      if (loading !== undefined) {
        await loading
        continue
      }
      if (st.resident.size + st.loading.size >= st.maxLoadedModels) {
        const idle = [...st.resident].filter(([, x]) => x.busy === 0).sort(([, a], [, b]) => a.lastUsed - b.lastUsed)[0]
        if (idle !== undefined) drop(st, idle[0])
      }
      if (st.resident.size + st.loading.size < st.maxLoadedModels) {
        const load = sleep(st.loadMs).then(() => {
          st.loading.delete(key)
          st.resident.set(key, { name: residentName(st, model), expiresAt: Infinity, contextLength, busy: 0, lastUsed: performance.now() })
          st.loads.push({ model: residentName(st, model), at: performance.now() })
          wake(st)
        })
        st.loading.set(key, load)
        await load
        continue
      }
    }
    await new Promise<void>(resolve => st.waiters.push(resolve))
  }
}

function keepAliveUntil (st: OllamaState, keepAlive: unknown): number {
  const ms = keepAliveMs(keepAlive) ?? st.keepAliveMs
  return ms < 0 ? Infinity : Date.now() + ms
}

function kitFor (st: OllamaState, ctx: Ctx, ex: Exchange): OllamaRouteKit {
  const known = (m: string): boolean => st.models.some(x => modelKey(x) === modelKey(m))
  const unload = (model: string): void => {
    const r = st.resident.get(modelKey(model))
    if (r === undefined) return
    r.expiresAt = 0
    if (r.busy === 0) drop(st, modelKey(model))
  }
  const run = async (model: string, body: Record<string, any>): Promise<boolean> => {
    const numCtx = typeof body.options?.num_ctx === 'number' ? body.options.num_ctx : 4096
    const r = await acquireRunner(st, model, numCtx)
    ex.onDone(() => {
      r.busy--
      r.lastUsed = performance.now()
      r.expiresAt = keepAliveUntil(st, body.keep_alive)
      if (r.expiresAt <= Date.now() && r.busy === 0) drop(st, modelKey(model))
      wake(st)
    })
    return ex.alive
  }
  return { st, ctx, ex, known, run, unload, wire: WIRE }
}

const pathMatches = (route: OllamaRoute, path: string): boolean => typeof route.path === 'string' ? route.path === path : route.path.test(path)
const methodMatches = (route: OllamaRoute, method: string): boolean => Array.isArray(route.method) ? route.method.includes(method) : route.method === method

function ollamaRoute (st: OllamaState, routes: OllamaRoute[], ctx: Ctx): void {
  const { res, method, path } = ctx
  if (st.hostCheck && !allowedHost(ctx.req.headers.host)) {
    res.writeHead(403, { 'Content-Length': 0 })
    res.end()
    return
  }
  const route = routes.find(r => pathMatches(r, path) && methodMatches(r, method))
  if (route === undefined) {
    // gin with HandleMethodNotAllowed (as Ollama sets it), then its NoRoute
    const text = routes.some(r => pathMatches(r, path)) ? '405 method not allowed' : '404 page not found'
    res.writeHead(text.startsWith('405') ? 405 : 404, { 'Content-Type': 'text/plain', 'Content-Length': text.length })
    res.end(text)
    return
  }
  let ex: Exchange
  if (route.work) {
    const parsed = tryJson(ctx.text) as Record<string, unknown> | undefined
    const model = parsed !== null && typeof parsed === 'object' && typeof parsed.model === 'string' ? parsed.model : ''
    ex = beginWork(ctx, path, model, st.numParallel)
    if (preempted(ex, JSON_TYPE)) return
  } else ex = new Exchange(ctx.res, { kind: 'normal' }, null)
  Promise.resolve(route.handle(kitFor(st, ctx, ex))).catch((err: unknown) => {
    if (ex.res.headersSent) ex.res.destroy()
    else ex.plain(500, { 'Content-Type': JSON_TYPE }, JSON.stringify({ error: String(err) }))
  })
}

/** An answer outside the exchange's behaviour (info routes). */
function infoJson (ex: Exchange, status: number, obj: unknown): void {
  ex.plain(status, { 'Content-Type': JSON_TYPE }, JSON.stringify(obj))
}

const OLLAMA_INFO_ROUTES: OllamaRoute[] = [
  {
    method: ['GET', 'HEAD'],
    path: '/',
    work: false,
    handle: ({ ex }) => ex.plain(200, { 'Content-Type': 'text/plain; charset=utf-8' }, 'Ollama is running')
  },
  { method: ['GET', 'HEAD'], path: '/api/version', work: false, handle: ({ st, ex }) => infoJson(ex, 200, { version: st.version }) },
  {
    method: ['GET', 'HEAD'],
    path: '/api/tags',
    work: false,
    handle: ({ st, ex }) => infoJson(ex, 200, {
      models: st.models.map(m => ({ name: displayName(m), model: displayName(m), modified_at: MODIFIED_AT, size: modelSize(m), digest: digestOf(m), details: modelDetails(m) }))
    })
  },
  {
    method: 'GET',
    path: '/api/ps',
    work: false,
    handle: ({ st, ex }) => {
      expire(st)
      infoJson(ex, 200, {
        models: [...st.resident.values()].map(r => ({
          name: r.name,
          model: r.name,
          size: modelSize(r.name),
          digest: digestOf(r.name),
          details: modelDetails(r.name),
          // a running model expires keep-alive after its requests end; until then, as of now
          expires_at: new Date(Number.isFinite(r.expiresAt) ? r.expiresAt : Date.now() + 292 * 365 * 86_400_000).toISOString(),
          size_vram: modelSize(r.name),
          context_length: r.contextLength
        }))
      })
    }
  },
  {
    method: 'POST',
    path: '/api/show',
    work: false,
    handle: ({ st, ctx, ex, known }) => {
      const bound = bindGo(ctx.text, 'api.ShowRequest', { name: ['string', 'string'], verbose: ['bool', 'bool'] })
      if ('error' in bound) return infoJson(ex, 400, { error: bound.eof === true ? 'missing request body' : bound.error })
      const model: string = bound.body.model ?? bound.body.name ?? ''
      if (model === '') return infoJson(ex, 400, { error: 'model is required' })
      if (!known(model)) return infoJson(ex, 404, { error: `model '${model}' not found` })
      infoJson(ex, 200, {
        license: 'Simulated license',
        modelfile: `# Modelfile generated by the simulator\nFROM ${displayName(model)}\n`,
        parameters: 'stop "<|eot_id|>"',
        template: '{{ .Prompt }}',
        details: modelDetails(model),
        model_info: { 'general.architecture': 'llama', 'general.parameter_count': 3_212_749_888, 'llama.context_length': 131072, 'llama.embedding_length': st.embedDims },
        capabilities: ['completion', 'tools'],
        modified_at: MODIFIED_AT
      })
    }
  },
  {
    method: ['GET', 'HEAD'],
    path: '/v1/models',
    work: false,
    handle: ({ st, ex }) => infoJson(ex, 200, { object: 'list', data: st.models.map(m => ({ id: displayName(m), object: 'model', created: 1735689600, owned_by: 'library' })) })
  },
  {
    method: 'GET',
    path: /^\/v1\/models\/[^/]+$/,
    work: false,
    handle: ({ ctx, ex, known }) => {
      let model = ctx.path.slice('/v1/models/'.length)
      try { model = decodeURIComponent(model) } catch {}
      if (!known(model)) return infoJson(ex, 404, openAiError(404, `model '${model}' not found`))
      infoJson(ex, 200, { id: model, object: 'model', created: 1735689600, owned_by: 'library' })
    }
  }
]

type Handler = (kit: OllamaRouteKit) => Promise<void>

function errorJson (ex: Exchange, status: number, message: string): void {
  ex.plain(status, { 'Content-Type': JSON_TYPE }, JSON.stringify({ error: message }))
}

function okJson (ex: Exchange, obj: unknown): void {
  ex.send(200, { 'Content-Type': JSON_TYPE }, JSON.stringify(obj))
}

function bindNative (ex: Exchange, text: string, struct: string, fields: FieldSpec): Record<string, any> | undefined {
  const bound = bindGo(text, struct, fields)
  if ('error' in bound) {
    errorJson(ex, 400, bound.eof === true ? 'missing request body' : bound.error)
    return undefined
  }
  return bound.body
}

function durations (st: OllamaState, evalCount: number, promptCount: number): Record<string, number> {
  const evalNs = Math.round(evalCount * st.tokenDelayMs * 1e6)
  return {
    total_duration: evalNs + 2_000_000,
    load_duration: 1_000_000,
    prompt_eval_count: promptCount,
    prompt_eval_duration: 1_000_000,
    eval_count: evalCount,
    eval_duration: evalNs
  }
}

const numPredict = (body: Record<string, any>): number | undefined =>
  typeof body.options?.num_predict === 'number' ? body.options.num_predict : undefined

const generate: Handler = async (kit) => {
  const { st, ctx, ex, known } = kit
  const body = bindNative(ex, ctx.text, 'api.GenerateRequest', {
    prompt: ['string', 'string'], suffix: ['string', 'string'], system: ['string', 'string'], template: ['string', 'string'],
    raw: ['bool', 'bool'], images: ['array', '[]api.ImageData'], context: ['array', '[]int']
  })
  if (body === undefined) return
  const model: string = body.model ?? ''
  if (model === '') return errorJson(ex, 404, "model '' not found")
  if (!known(model)) return errorJson(ex, 404, `model '${model}' not found`)
  const prompt: string = body.prompt ?? ''
  if (prompt === '' && !(Array.isArray(body.images) && body.images.length > 0)) {
    // nothing to generate: only load the model, or with keep_alive 0 unload it
    if (keepAliveMs(body.keep_alive) === 0) kit.unload(model)
    else if (!await kit.run(model, body)) return
    const reason = keepAliveMs(body.keep_alive) === 0 ? 'unload' : 'load'
    return okJson(ex, { model, created_at: new Date().toISOString(), response: '', done: true, done_reason: reason })
  }
  if (!await kit.run(model, body)) return
  const { words, reason } = tokensFor(numPredict(body), st.tokens)
  const final = (): Record<string, unknown> => ({
    model,
    created_at: new Date().toISOString(),
    response: '',
    done: true,
    done_reason: reason,
    context: contextTokens(prompt, words.length),
    ...durations(st, words.length, promptTokens(prompt))
  })
  if (body.stream === false) {
    await sleep(st.tokenDelayMs * words.length)
    return okJson(ex, { ...final(), response: words.join('') })
  }
  if (!ex.beginStream(NDJSON_TYPE)) return
  for (const w of words) {
    await sleep(st.tokenDelayMs)
    if (!ex.line(JSON.stringify({ model, created_at: new Date().toISOString(), response: w, done: false }) + '\n')) return
  }
  ex.endStream(JSON.stringify(final()) + '\n')
}

const chat: Handler = async (kit) => {
  const { st, ctx, ex, known } = kit
  const body = bindNative(ex, ctx.text, 'api.ChatRequest', { messages: ['array', '[]api.Message'], tools: ['array', 'api.Tools'] })
  if (body === undefined) return
  const model: string = body.model ?? ''
  if (model === '') return errorJson(ex, 400, 'model is required')
  if (!known(model)) return errorJson(ex, 404, `model '${model}' not found`)
  const messages: unknown[] = body.messages ?? []
  if (messages.length === 0) {
    if (keepAliveMs(body.keep_alive) === 0) kit.unload(model)
    else if (!await kit.run(model, body)) return
    const reason = keepAliveMs(body.keep_alive) === 0 ? 'unload' : 'load'
    return okJson(ex, { model, created_at: new Date().toISOString(), message: { role: 'assistant', content: '' }, done: true, done_reason: reason })
  }
  if (!await kit.run(model, body)) return
  const { words, reason } = tokensFor(numPredict(body), st.tokens)
  const final = (content: string): Record<string, unknown> => ({
    model,
    created_at: new Date().toISOString(),
    message: { role: 'assistant', content },
    done: true,
    done_reason: reason,
    ...durations(st, words.length, promptTokens(messages))
  })
  if (body.stream === false) {
    await sleep(st.tokenDelayMs * words.length)
    return okJson(ex, final(words.join('')))
  }
  if (!ex.beginStream(NDJSON_TYPE)) return
  for (const w of words) {
    await sleep(st.tokenDelayMs)
    if (!ex.line(JSON.stringify({ model, created_at: new Date().toISOString(), message: { role: 'assistant', content: w }, done: false }) + '\n')) return
  }
  ex.endStream(JSON.stringify(final('')) + '\n')
}

const embed: Handler = async (kit) => {
  const { st, ctx, ex, known } = kit
  const body = bindNative(ex, ctx.text, 'api.EmbedRequest', { input: ['any', 'any'], truncate: ['bool', '*bool'], dimensions: ['number', 'int'] })
  if (body === undefined) return
  const input: unknown = body.input
  let inputs: string[]
  if (typeof input === 'string') inputs = input === '' ? [] : [input]
  else if (Array.isArray(input) && input.every(x => typeof x === 'string')) inputs = input
  else if (input === undefined || input === null) inputs = []
  else return errorJson(ex, 400, 'invalid input type')
  const model: string = body.model ?? ''
  if (model === '') return errorJson(ex, 404, "model '' not found")
  if (!known(model)) return errorJson(ex, 404, `model '${model}' not found`)
  if (!await kit.run(model, body)) return
  if (inputs.length === 0) return okJson(ex, { model, embeddings: [] })
  const dims = typeof body.dimensions === 'number' && body.dimensions > 0 ? body.dimensions : st.embedDims
  await sleep(st.tokenDelayMs)
  okJson(ex, {
    model,
    embeddings: inputs.map(s => embedVector(s, dims)),
    total_duration: Math.round(st.tokenDelayMs * 1e6) + 1_000_000,
    load_duration: 1_000_000,
    prompt_eval_count: inputs.reduce((n, s) => n + promptTokens(s), 0)
  })
}

const embeddings: Handler = async (kit) => {
  const { st, ctx, ex, known } = kit
  const body = bindNative(ex, ctx.text, 'api.EmbeddingRequest', { prompt: ['string', 'string'] })
  if (body === undefined) return
  const model: string = body.model ?? ''
  if (model === '') return errorJson(ex, 400, 'model is required')
  if (!known(model)) return errorJson(ex, 404, `model '${model}' not found`)
  const prompt: string = body.prompt ?? ''
  if (!await kit.run(model, body)) return
  if (prompt === '') return okJson(ex, { embedding: [] })
  await sleep(st.tokenDelayMs)
  okJson(ex, { embedding: embedVector(prompt, st.embedDims) })
}

// --- OpenAI-compatible routes

function openAiError (status: number, message: string): { error: { message: string, type: string, param: null, code: null } } {
  const type = status === 400 ? 'invalid_request_error' : status === 404 ? 'not_found_error' : 'api_error'
  return { error: { message, type, param: null, code: null } }
}

function v1Error (ex: Exchange, status: number, message: string): void {
  ex.plain(status, { 'Content-Type': JSON_TYPE }, JSON.stringify(openAiError(status, message)))
}

function bindOpenAi (ex: Exchange, text: string, struct: string, fields: FieldSpec): Record<string, any> | undefined {
  const bound = bindGo(text, struct, { ...fields, keep_alive: ['any', 'any'], options: ['any', 'any'] })
  if ('error' in bound) {
    v1Error(ex, 400, bound.error)
    return undefined
  }
  return bound.body
}

function sse (obj: unknown): string {
  return `data: ${JSON.stringify(obj)}\n\n`
}

const created = (): number => Math.floor(Date.now() / 1000)

const v1Chat: Handler = async (kit) => {
  const { st, ctx, ex, known } = kit
  const body = bindOpenAi(ex, ctx.text, 'openai.ChatCompletionRequest', { messages: ['array', '[]openai.Message'], max_tokens: ['number', '*int'], stream_options: ['object', '*openai.StreamOptions'] })
  if (body === undefined) return
  const messages: unknown[] = body.messages ?? []
  if (messages.length === 0) return v1Error(ex, 400, "[] is too short - 'messages'")
  const model: string = body.model ?? ''
  if (model === '') return v1Error(ex, 400, 'model is required')
  if (!known(model)) return v1Error(ex, 404, `model '${model}' not found`)
  if (!await kit.run(model, body)) return
  const { words, reason } = tokensFor(typeof body.max_tokens === 'number' ? body.max_tokens : undefined, st.tokens)
  const id = `chatcmpl-${randomInt(1000)}`
  const usage = { prompt_tokens: promptTokens(messages), completion_tokens: words.length, total_tokens: promptTokens(messages) + words.length }
  const base = (): Record<string, unknown> => ({ id, object: 'chat.completion.chunk', created: created(), model, system_fingerprint: 'fp_ollama' })
  if (body.stream !== true) {
    await sleep(st.tokenDelayMs * words.length)
    return okJson(ex, {
      ...base(),
      object: 'chat.completion',
      choices: [{ index: 0, message: { role: 'assistant', content: words.join('') }, finish_reason: reason }],
      usage
    })
  }
  if (!ex.beginStream(SSE_TYPE)) return
  for (const w of words) {
    await sleep(st.tokenDelayMs)
    if (!ex.line(sse({ ...base(), choices: [{ index: 0, delta: { role: 'assistant', content: w }, finish_reason: null }] }))) return
  }
  if (!ex.line(sse({ ...base(), choices: [{ index: 0, delta: { role: 'assistant', content: '' }, finish_reason: reason }] }))) return
  if (body.stream_options?.include_usage === true && !ex.line(sse({ ...base(), choices: [], usage }))) return
  ex.endStream('data: [DONE]\n\n')
}

const v1Completions: Handler = async (kit) => {
  const { st, ctx, ex, known } = kit
  const body = bindOpenAi(ex, ctx.text, 'openai.CompletionRequest', { prompt: ['string', 'string'], max_tokens: ['number', '*int'], stream_options: ['object', '*openai.StreamOptions'] })
  if (body === undefined) return
  const model: string = body.model ?? ''
  if (model === '') return v1Error(ex, 404, "model '' not found")
  if (!known(model)) return v1Error(ex, 404, `model '${model}' not found`)
  if (!await kit.run(model, body)) return
  const { words, reason } = tokensFor(typeof body.max_tokens === 'number' ? body.max_tokens : undefined, st.tokens)
  const id = `cmpl-${randomInt(1000)}`
  const usage = { prompt_tokens: promptTokens(body.prompt), completion_tokens: words.length, total_tokens: promptTokens(body.prompt) + words.length }
  const base = (): Record<string, unknown> => ({ id, object: 'text_completion', created: created(), model, system_fingerprint: 'fp_ollama' })
  if (body.stream !== true) {
    await sleep(st.tokenDelayMs * words.length)
    return okJson(ex, { ...base(), choices: [{ text: words.join(''), index: 0, finish_reason: reason }], usage })
  }
  if (!ex.beginStream(SSE_TYPE)) return
  for (const w of words) {
    await sleep(st.tokenDelayMs)
    if (!ex.line(sse({ ...base(), choices: [{ text: w, index: 0, finish_reason: null }] }))) return
  }
  if (!ex.line(sse({ ...base(), choices: [{ text: '', index: 0, finish_reason: reason }] }))) return
  if (body.stream_options?.include_usage === true && !ex.line(sse({ ...base(), choices: [], usage }))) return
  ex.endStream('data: [DONE]\n\n')
}

const v1Embeddings: Handler = async (kit) => {
  const { st, ctx, ex, known } = kit
  const body = bindOpenAi(ex, ctx.text, 'openai.EmbedRequest', { input: ['any', 'any'], encoding_format: ['string', 'string'], dimensions: ['number', 'int'] })
  if (body === undefined) return
  const input: unknown = body.input
  let inputs: string[]
  if (typeof input === 'string' && input !== '') inputs = [input]
  else if (Array.isArray(input) && input.length > 0 && input.every(x => typeof x === 'string')) inputs = input
  else return v1Error(ex, 400, 'invalid input')
  const model: string = body.model ?? ''
  if (model === '') return v1Error(ex, 404, "model '' not found")
  if (!known(model)) return v1Error(ex, 404, `model '${model}' not found`)
  if (!await kit.run(model, body)) return
  const dims = typeof body.dimensions === 'number' && body.dimensions > 0 ? body.dimensions : st.embedDims
  const base64 = body.encoding_format === 'base64'
  await sleep(st.tokenDelayMs)
  const tokens = inputs.reduce((n, s) => n + promptTokens(s), 0)
  okJson(ex, {
    object: 'list',
    data: inputs.map((s, index) => {
      const v = embedVector(s, dims)
      return { object: 'embedding', embedding: base64 ? float32Base64(v) : v, index }
    }),
    model,
    usage: { prompt_tokens: tokens, total_tokens: tokens }
  })
}

const work = (path: string, handle: Handler): OllamaRoute => ({ method: 'POST', path, work: true, handle })

const OLLAMA_ROUTES: OllamaRoute[] = [
  ...OLLAMA_INFO_ROUTES,
  work('/api/generate', generate),
  work('/api/chat', chat),
  work('/api/embed', embed),
  work('/api/embeddings', embeddings),
  work('/v1/chat/completions', v1Chat),
  work('/v1/completions', v1Completions),
  work('/v1/embeddings', v1Embeddings)
]

/** The built-in routes' wire helpers, handed to routes from other modules through their kit. */
const WIRE = {
  JSON_TYPE,
  NDJSON_TYPE,
  SSE_TYPE,
  sleep,
  errorJson,
  okJson,
  infoJson,
  v1Error,
  openAiError,
  sse,
  bindNative,
  bindOpenAi,
  tokensFor,
  promptTokens,
  durations,
  keepAliveMs,
  created,
  embedVector,
  displayName,
  modelKey,
  modelDetails,
  modelSize,
  digestOf
}

// ---------------------------------------------------------------------------------------------
// Stable Diffusion (FastAPI / uvicorn)

const CRC_TABLE = (() => {
  const t = new Uint32Array(256)
  for (let n = 0; n < 256; n++) {
    let c = n
    for (let k = 0; k < 8; k++) c = (c & 1) !== 0 ? 0xedb88320 ^ (c >>> 1) : c >>> 1
    t[n] = c >>> 0
  }
  return t
})()

export function crc32 (buf: Buffer): number {
  let c = 0xffffffff
  for (const byte of buf) c = CRC_TABLE[(c ^ byte) & 0xff] ^ (c >>> 8)
  return (c ^ 0xffffffff) >>> 0
}

function pngChunk (type: string, data: Buffer): Buffer {
  const len = Buffer.alloc(4)
  len.writeUInt32BE(data.length)
  const td = Buffer.concat([Buffer.from(type, 'ascii'), data])
  const crc = Buffer.alloc(4)
  crc.writeUInt32BE(crc32(td))
  return Buffer.concat([len, td, crc])
}

export const PNG_SIGNATURE = Buffer.from([0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a])

/** A valid 8x8 RGB PNG whose pixels are derived from the seed. */
export function makePng (seed: string | Buffer, size = 8): Buffer {
  const h = createHash('sha256').update(seed).digest()
  const ihdr = Buffer.alloc(13)
  ihdr.writeUInt32BE(size, 0)
  ihdr.writeUInt32BE(size, 4)
  ihdr[8] = 8 // bit depth
  ihdr[9] = 2 // colour type RGB
  ihdr[10] = 0
  ihdr[11] = 0
  ihdr[12] = 0
  const raw = Buffer.alloc(size * (1 + size * 3))
  for (let y = 0; y < size; y++) {
    const row = y * (1 + size * 3)
    raw[row] = 0 // filter: none
    for (let x = 0; x < size; x++) {
      const p = row + 1 + x * 3
      raw[p] = (h[0] + x * 16) & 0xff
      raw[p + 1] = (h[1] + y * 16) & 0xff
      raw[p + 2] = h[2 + ((x + y) % 30)]
    }
  }
  return Buffer.concat([PNG_SIGNATURE, pngChunk('IHDR', ihdr), pngChunk('IDAT', zlib.deflateSync(raw)), pngChunk('IEND', Buffer.alloc(0))])
}

/** Decodes what makePng writes (and checks signature and CRCs); throws when the PNG is broken. */
export function readPng (buf: Buffer): { width: number, height: number, bitDepth: number, colorType: number, chunks: string[], pixels: Buffer } {
  if (buf.length < 8 || !buf.subarray(0, 8).equals(PNG_SIGNATURE)) throw new Error('not a PNG: bad signature')
  let pos = 8
  const chunks: string[] = []
  const idat: Buffer[] = []
  let ihdr: Buffer | null = null
  while (pos < buf.length) {
    if (pos + 12 > buf.length) throw new Error('truncated PNG chunk')
    const len = buf.readUInt32BE(pos)
    const type = buf.toString('ascii', pos + 4, pos + 8)
    if (pos + 12 + len > buf.length) throw new Error(`truncated PNG chunk ${type}`)
    const data = buf.subarray(pos + 8, pos + 8 + len)
    if (crc32(buf.subarray(pos + 4, pos + 8 + len)) !== buf.readUInt32BE(pos + 8 + len)) throw new Error(`bad CRC in ${type}`)
    chunks.push(type)
    if (type === 'IHDR') ihdr = data
    if (type === 'IDAT') idat.push(data)
    pos += 12 + len
    if (type === 'IEND') break
  }
  if (ihdr === null) throw new Error('no IHDR')
  if (chunks[chunks.length - 1] !== 'IEND') throw new Error('no IEND')
  const pixels = zlib.inflateSync(Buffer.concat(idat))
  return { width: ihdr.readUInt32BE(0), height: ihdr.readUInt32BE(4), bitDepth: ihdr[8], colorType: ihdr[9], chunks, pixels }
}

interface MultipartPart {
  name: string
  filename?: string
  contentType?: string
  data: Buffer
}

/** Enough of multipart/form-data for /upload. null when the body is not valid multipart. */
export function parseMultipart (buf: Buffer, contentType: string): MultipartPart[] | null {
  const m = /boundary=(?:"([^"]+)"|([^;\s]+))/i.exec(contentType)
  if (m === null) return null
  const boundary = Buffer.from(`--${m[1] ?? m[2]}`)
  const delimiter = Buffer.concat([Buffer.from('\r\n'), boundary])
  const parts: MultipartPart[] = []
  let pos = buf.indexOf(boundary)
  if (pos < 0) return null
  for (;;) {
    pos += boundary.length
    if (buf[pos] === 0x2d && buf[pos + 1] === 0x2d) return parts // closing delimiter
    if (buf[pos] === 0x0d && buf[pos + 1] === 0x0a) pos += 2
    else return null
    const headEnd = buf.indexOf('\r\n\r\n', pos)
    if (headEnd < 0) return null
    const head = buf.toString('utf8', pos, headEnd)
    const next = buf.indexOf(delimiter, headEnd + 4)
    if (next < 0) return null
    const part: MultipartPart = { name: '', data: Buffer.from(buf.subarray(headEnd + 4, next)) }
    for (const line of head.split('\r\n')) {
      const colon = line.indexOf(':')
      if (colon < 0) continue
      const key = line.slice(0, colon).trim().toLowerCase()
      const value = line.slice(colon + 1).trim()
      if (key === 'content-disposition') {
        part.name = /;\s*name="([^"]*)"/i.exec(value)?.[1] ?? /;\s*name=([^;]+)/i.exec(value)?.[1]?.trim() ?? ''
        const fn = /;\s*filename="([^"]*)"/i.exec(value)?.[1] ?? /;\s*filename=([^;]+)/i.exec(value)?.[1]?.trim()
        if (fn !== undefined) part.filename = fn
      } else if (key === 'content-type') part.contentType = value
    }
    parts.push(part)
    pos = next + 2
  }
}

interface PydanticError {
  type: string
  loc: Array<string | number>
  msg: string
  input: unknown
  ctx?: Record<string, unknown>
}

/** FastAPI's reading of a JSON body: the object, or the 422 detail list. */
function fastApiJson (ctx: Ctx): { body: Record<string, unknown> } | { detail: PydanticError[] } {
  const ct = ctx.req.headers['content-type']
  const isJson = ct === undefined || /^application\/([a-z0-9.-]+\+)?json\b/i.test(ct.trim())
  let value: unknown = null
  if (ctx.raw.length > 0) {
    if (!isJson) value = ctx.text
    else {
      try {
        value = JSON.parse(ctx.text)
      } catch (err) {
        const msg = (err as Error).message
        const p = /position (\d+)/.exec(msg)
        const pos = p !== null ? Number(p[1]) : ctx.text.length
        const error = /non-whitespace character after JSON/i.test(msg)
          ? 'Extra data'
          : /Expected property name/i.test(msg) ? 'Expecting property name enclosed in double quotes' : 'Expecting value'
        return { detail: [{ type: 'json_invalid', loc: ['body', pos], msg: 'JSON decode error', input: {}, ctx: { error } }] }
      }
    }
  }
  if (value === null) return { detail: [{ type: 'missing', loc: ['body'], msg: 'Field required', input: null }] }
  if (typeof value !== 'object' || Array.isArray(value)) {
    return { detail: [{ type: 'model_attributes_type', loc: ['body'], msg: 'Input should be a valid dictionary or object to extract fields from', input: value }] }
  }
  return { body: value as Record<string, unknown> }
}

type SdField = [name: string, kind: 'str' | 'int' | 'float', required: boolean]

/** Pydantic v2 (lax mode) validation of the request model. */
function validate (body: Record<string, unknown>, fields: SdField[]): PydanticError[] {
  const errors: PydanticError[] = []
  for (const [name, kind, required] of fields) {
    const loc = ['body', name]
    if (!(name in body)) {
      if (required) errors.push({ type: 'missing', loc, msg: 'Field required', input: body })
      continue
    }
    const v = body[name]
    if (kind === 'str' && typeof v !== 'string') errors.push({ type: 'string_type', loc, msg: 'Input should be a valid string', input: v })
    if (kind === 'int') {
      if (typeof v === 'number' && !Number.isInteger(v)) errors.push({ type: 'int_from_float', loc, msg: 'Input should be a valid integer, got a number with a fractional part', input: v })
      else if (typeof v === 'string' && !/^\s*[-+]?\d+\s*$/.test(v)) errors.push({ type: 'int_parsing', loc, msg: 'Input should be a valid integer, unable to parse string as an integer', input: v })
      else if (typeof v !== 'number' && typeof v !== 'string' && typeof v !== 'boolean') errors.push({ type: 'int_type', loc, msg: 'Input should be a valid integer', input: v })
    }
    if (kind === 'float') {
      if (typeof v === 'string' && (v.trim() === '' || Number.isNaN(Number(v)))) errors.push({ type: 'float_parsing', loc, msg: 'Input should be a valid number, unable to parse string as a number', input: v })
      else if (typeof v !== 'number' && typeof v !== 'string' && typeof v !== 'boolean') errors.push({ type: 'float_type', loc, msg: 'Input should be a valid number', input: v })
    }
  }
  return errors
}

const SD_JSON = 'application/json'

export async function startDiffusionSimulator (opts: SimulatorOptions = {}): Promise<Simulator> {
  const imageDelayMs = opts.imageDelayMs ?? 20
  opts = { ...opts, cancelDelayMs: opts.cancelDelayMs ?? imageDelayMs }
  let queue: Promise<unknown> = Promise.resolve()
  /** the pipeline: one image at a time */
  const serialised = async <T>(job: () => Promise<T>): Promise<T> => {
    const p = queue.then(job)
    queue = p.catch(() => {})
    return await p
  }
  const parseBody = (ctx: Ctx): unknown => {
    const ct = ctx.req.headers['content-type'] ?? ''
    if (/^multipart\/form-data/i.test(ct)) {
      const parts = parseMultipart(ctx.raw, ct)
      if (parts === null) return undefined
      return {
        fields: Object.fromEntries(parts.filter(p => p.filename === undefined).map(p => [p.name, p.data.toString('utf8')])),
        files: parts.filter(p => p.filename !== undefined).map(p => ({ name: p.name, filename: p.filename, contentType: p.contentType, size: p.data.length }))
      }
    }
    return tryJson(ctx.text)
  }
  return await startServer(opts, parseBody, ctx => {
    const { res, method, path, sim } = ctx
    const json = (status: number, obj: unknown, headers: OutgoingHttpHeaders = {}): void => {
      const body = JSON.stringify(obj)
      res.writeHead(status, { server: 'uvicorn', 'Content-Type': SD_JSON, 'Content-Length': Buffer.byteLength(body), ...headers })
      res.end(body)
    }
    if (path !== '/txt2img' && path !== '/img2img' && path !== '/upload') return json(404, { detail: 'Not Found' })
    if (method !== 'POST') return json(405, { detail: 'Method Not Allowed' }, { allow: 'POST' })

    if (path === '/upload') {
      const parts = parseMultipart(ctx.raw, ctx.req.headers['content-type'] ?? '') ?? []
      const file = parts.find(p => p.name === 'file')
      if (file === undefined) return json(422, { detail: [{ type: 'missing', loc: ['body', 'file'], msg: 'Field required', input: null }] })
      if (file.filename === undefined) {
        const text = file.data.toString('utf8')
        return json(422, { detail: [{ type: 'value_error', loc: ['body', 'file'], msg: "Value error, Expected UploadFile, received: <class 'str'>", input: text, ctx: { error: {} } }] })
      }
      const id = randomUUID()
      sim.uploads.set(id, { filename: file.filename, contentType: file.contentType ?? 'application/octet-stream', data: file.data })
      return json(200, { file_id: id })
    }

    // txt2img / img2img: model work
    const parsed = tryJson(ctx.text) as Record<string, unknown> | undefined
    const model = parsed !== null && typeof parsed === 'object' && typeof parsed.model === 'string' ? parsed.model : 'sd'
    const ex = beginWork(ctx, path, model)
    ex.chunkedOver = Infinity
    const detail = (status: number, d: unknown): void => ex.plain(status, { server: 'uvicorn', 'Content-Type': SD_JSON }, JSON.stringify({ detail: d }))
    if (preempted(ex, SD_JSON)) return
    const read = fastApiJson(ctx)
    if ('detail' in read) return detail(422, read.detail)
    const body = read.body
    const fields: SdField[] = path === '/txt2img'
      ? [['prompt', 'str', true], ['num_inference_steps', 'int', false]]
      : [['prompt', 'str', true], ['file_id', 'str', true], ['num_inference_steps', 'int', false], ['strength', 'float', false]]
    const errors = validate(body, fields)
    if (errors.length > 0) return detail(422, errors)
    let seed: Buffer = Buffer.from(String(body.prompt))
    if (path === '/img2img') {
      const file = sim.uploads.get(String(body.file_id))
      if (file === undefined) return detail(404, 'File not found')
      seed = Buffer.concat([seed, Buffer.from(`|${String(body.strength ?? 0.5)}|`), file.data])
    }
    serialised(async () => {
      if (!ex.alive) return
      await sleep(imageDelayMs)
      if (!ex.alive) return
      ex.send(200, { server: 'uvicorn', 'Content-Type': 'image/png', 'Content-Disposition': `attachment; filename=${randomUUID()}.png` }, makePng(seed))
    }).catch((err: unknown) => detail(500, String(err)))
  })
}

/**
 * The HTTP plumbing the simulators share: a plain node:http server (so the bytes on the wire are
 * exactly what the simulator writes), every request recorded on the handle (`requests`, or `polls`
 * for the gateway's background polls), and the start of a request's model work on the GPU recorder.
 */
import http from 'node:http'
import type { IncomingMessage, ServerResponse } from 'node:http'
import type { AddressInfo, Socket } from 'node:net'
import { performance } from 'node:perf_hooks'
import { GpuRecorder } from './gpu-recorder.js'
import { Exchange, Work, type Behaviour } from './behaviour.js'
import type { CostStats, ResidencyEvent } from './ollama-costs.js'

/** What every simulator's server takes (the simulators' own options extend it: see SimulatorOptions). */
export interface ServerOptions {
  /** 0 = random (default) */
  port?: number
  /** which GPUs this server owns; its work is recorded on them. Default: one GPU named after the server's host (`127.0.0.1:PORT`). */
  gpuIds?: string[]
  /** default: a recorder of its own (see Simulator.recorder) */
  recorder?: GpuRecorder
  /**
   * How long a request whose client went away keeps its GPU before the server notices (Ollama's
   * runner at its next token: default tokenDelayMs; the diffusion pipeline finishes its image:
   * default imageDelayMs). Settable later as `sim.cancelDelayMs`.
   */
  cancelDelayMs?: number
}

export type { ResidencyEvent, CostStats }

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
  /**
   * Ollama: prompt tokens computed and taken from the cache, loads per model, and each request's
   * counts and time to first token (the token counters stay 0 without SimulatorOptions.cost)
   */
  costs: () => CostStats
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

function pathOf (url: string): { path: string, query: URLSearchParams } {
  const q = url.indexOf('?')
  return q < 0 ? { path: url, query: new URLSearchParams() } : { path: url.slice(0, q), query: new URLSearchParams(url.slice(q + 1)) }
}

export function tryJson (text: string): unknown {
  try {
    return JSON.parse(text)
  } catch {
    return undefined
  }
}

export async function startServer (
  opts: ServerOptions,
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
    costs: () => ({ computedPromptTokens: 0, cachedPromptTokens: 0, loads: {}, requests: [] }),
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

export function beginWork (ctx: Ctx, route: string, model: string, capacity = 1): Exchange {
  const { sim } = ctx
  const behaviour = sim.behaviour
  const work = new Work(sim.recorder, sim.gpuIds, `${sim.host} ${route} ${model === '' ? '-' : model} #${++workSeq}`, { model, capacity })
  return new Exchange(ctx.res, behaviour, work, sim.cancelDelayMs)
}

export interface MultipartPart {
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

/**
 * What the simulated servers share beyond HTTP: the faults a test can switch on (`Behaviour`,
 * applied to an answer by `Exchange`), the GPU recorder hook (`Work`: enter when a request's body
 * has arrived, exit exactly once), delays, and the deterministic text and vectors they answer with.
 */
import type { ServerResponse, OutgoingHttpHeaders } from 'node:http'
import type { Socket } from 'node:net'
import { createHash } from 'node:crypto'
import type { GpuRecorder, EnterOptions } from './gpu-recorder.js'

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

export const sleep = async (ms: number): Promise<void> => await new Promise(resolve => setTimeout(resolve, ms))

export const SSE_TYPE = 'text/event-stream'

/** OpenAI's error shape, as Ollama's OpenAI-compatible routes send it (also the last event of a failing SSE stream). */
export function openAiError (status: number, message: string): { error: { message: string, type: string, param: null, code: null } } {
  const type = status === 400 ? 'invalid_request_error' : status === 404 ? 'not_found_error' : 'api_error'
  return { error: { message, type, param: null, code: null } }
}

/** Tracks one lease-worthy request on the recorder: exits exactly once. */
export class Work {
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
export const GO_BUFFER = 2048

/** Applies error / stall-headers; true when the request has been dealt with. */
export function preempted (ex: Exchange, jsonType: string): boolean {
  const b = ex.behaviour
  if (b.kind === 'error') {
    ex.plain(b.status, { 'Content-Type': jsonType }, JSON.stringify(b.body))
    return true
  }
  return b.kind === 'stall-headers' // held open until the client or close() ends it
}

// ---------------------------------------------------------------------------------------------
// deterministic answers

export const WORDS = ['The', ' sky', ' is', ' blue', ' because', ' of', ' Rayleigh', ' scattering', ' of', ' sunlight', '.']

export function tokensFor (limit: number | undefined, total: number): { words: string[], reason: 'stop' | 'length' } {
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

export function float32Base64 (v: number[]): string {
  const buf = Buffer.alloc(v.length * 4)
  v.forEach((x, i) => buf.writeFloatLE(x, i * 4))
  return buf.toString('base64')
}

export function promptTokens (s: unknown): number {
  const text = typeof s === 'string' ? s : JSON.stringify(s ?? '')
  return Math.max(1, Math.ceil(text.length / 4))
}


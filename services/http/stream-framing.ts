import { PassThrough, pipeline, Transform, type Readable, type TransformCallback } from 'node:stream'
import { StringDecoder } from 'node:string_decoder'

/**
 * How an upstream's answer is passed on to the client so that the GPUs are released when the
 * upstream is done (not when a slow client has read it), and a broken stream ends in its own
 * format rather than a silent truncation.
 *
 * `release` is called at the answer's last byte (known length) and again, harmlessly, at the
 * upstream stream's end or close: it must be idempotent.
 */
export function frameAnswer (
  upstream: Readable,
  headers: Record<string, unknown>,
  release: () => void,
  streamError?: (message: string) => string
): Readable {
  upstream.once('end', release)
  upstream.once('close', release)
  if (streamError == null || !recordFramed(headers)) {
    releaseAtLastByte(upstream, headers['content-length'], release)
    return upstream
  }
  return withStreamError(upstream, streamError)
}

/** Answers whose own format has records (NDJSON lines, SSE events). */
const RECORD_TYPES = /^\s*(application\/x-ndjson|text\/event-stream)\s*(;|$)/i

/**
 * Whether a broken answer can end with an error record: only a stream of records (NDJSON, SSE)
 * of open length. Any other answer (JSON, an image) is cut off, so the client sees a broken
 * response, chunked or not: Ollama sends every JSON answer over 2 KB chunked. An error record
 * appended to an answer with a Content-Length would leave it short (the client waits for the rest)
 * or long (it misreads the next answer).
 */
function recordFramed (headers: Record<string, unknown>): boolean {
  return headers['content-length'] == null && RECORD_TYPES.test(String(headers['content-type'] ?? ''))
}

/**
 * An answer of known length is over when its last byte arrives: release its GPUs then, before that
 * byte is written on to the client and before the stream's 'end' (a tick later), so the next
 * waiter's grant is on its way sooner. Answers of open length keep releasing at 'end'.
 * The listener is added once the response pipe has started the stream ('resume'): a 'data'
 * listener added earlier would start the flow before the pipe is there, and lose the data.
 * Prepended, it sees each chunk before the pipe writes it on.
 */
function releaseAtLastByte (upstream: Readable, contentLength: unknown, release: () => void): void {
  let left = Number(contentLength)
  if (!(left > 0)) return
  const onData = (chunk: Buffer): void => {
    left -= chunk.length
    if (left > 0) return
    upstream.off('data', onData)
    release()
  }
  upstream.once('resume', () => upstream.prependListener('data', onData))
}

/**
 * Pass a stream through; if the upstream breaks off, end it with one error record in the stream's
 * own format (Ollama: one `{"error":...}` line) instead of a silent truncation.
 */
function withStreamError (upstream: Readable, format: (message: string) => string): Readable {
  const out = new PassThrough()
  let lastByte = 10
  upstream.on('data', (chunk: Buffer) => {
    if (chunk.length > 0) lastByte = chunk[chunk.length - 1]
    if (!out.write(chunk)) upstream.pause()
  })
  out.on('drain', () => upstream.resume())
  upstream.once('end', () => out.end())
  upstream.once('error', (err) => {
    if (out.writableEnded) return
    out.end((lastByte === 10 ? '' : '\n') + format(`upstream failed mid-stream: ${err.message}`))
  })
  // Client gone: stop the upstream too, so its GPU work stops with it.
  out.once('close', () => { if (!upstream.destroyed) upstream.destroy() })
  return out
}

/** An alias's answer: the upstream names the target (`from`), the client is shown the alias (`to`). */
export interface ModelRename { from: string, to: string }

/**
 * The answer with every JSON `"model":"<from>"` member written as `"model":"<to>"` (CONTRACT 17:
 * the answer's `model` is the alias the client asked for), in JSON answers and in every NDJSON line
 * and SSE event (`message.model` of Anthropic's `message_start`, `response.model` of the
 * Responses API: nested members match too). Chunk by chunk, never buffering the answer: only a
 * chunk's last few characters that may begin a match wait for the next chunk. Text inside a JSON
 * string has its quotes escaped, so a model's output that spells such a member never matches.
 * The answer's length changes: the caller drops its Content-Length.
 */
export function renameModel (answer: Readable, rename: ModelRename): Readable {
  const out = new ModelRenamer(rename)
  // Either side ending early ends the other: a client gone stops the upstream, as withStreamError does.
  pipeline(answer, out, () => {})
  return out
}

class ModelRenamer extends Transform {
  private readonly decoder = new StringDecoder('utf8')
  private readonly patterns: Array<[string, string]> = []
  private readonly longest: number
  private held = ''

  constructor ({ from, to }: ModelRename) {
    super()
    const names = [from]
    // Ollama answers a name without a tag with `:latest` added.
    if (!from.includes(':')) names.push(from + ':latest')
    for (const name of names) {
      for (const colon of [':', ': ']) this.patterns.push([`"model"${colon}${JSON.stringify(name)}`, `"model"${colon}${JSON.stringify(to)}`])
    }
    this.longest = Math.max(...this.patterns.map(([p]) => p.length))
  }

  override _transform (chunk: Buffer, _encoding: BufferEncoding, done: TransformCallback): void {
    const text = this.held + this.decoder.write(chunk)
    let out = ''
    let i = 0
    for (;;) {
      const at = text.indexOf('"model"', i)
      if (at === -1) break
      const found = this.patterns.find(([p]) => text.startsWith(p, at))
      if (found !== undefined) {
        out += text.slice(i, at) + found[1]
        i = at + found[0].length
        continue
      }
      // Cut off by the chunk's end: kept below for the next chunk.
      if (this.patterns.some(([p]) => p.startsWith(text.slice(at)))) break
      out += text.slice(i, at + 1)
      i = at + 1
    }
    // The tail that may begin a match waits (a line's or an event's end never does).
    let hold = text.length
    for (let q = Math.max(i, text.length - this.longest + 1); q < text.length; q++) {
      if (text.charCodeAt(q) === 0x22 && this.patterns.some(([p]) => p.startsWith(text.slice(q)))) { hold = q; break }
    }
    out += text.slice(i, hold)
    this.held = text.slice(hold)
    done(null, out === '' ? undefined : Buffer.from(out, 'utf8'))
  }

  override _flush (done: TransformCallback): void {
    const rest = this.held + this.decoder.end()
    done(null, rest === '' ? undefined : Buffer.from(rest, 'utf8'))
  }
}

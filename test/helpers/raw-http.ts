/**
 * HTTP/1.1 at the byte level, for requests no well-behaved client would send: absolute-form and odd
 * request targets, conflicting framing headers, headers or bodies trickled byte by byte. The
 * response parser understands Content-Length, chunked and read-to-close bodies, and pipelined answers.
 */
import net from 'node:net'
import { setTimeout as sleep } from 'node:timers/promises'

export interface RawResponse {
  status: number
  /** lower-case names; repeated headers joined with ', ' */
  headers: Record<string, string>
  body: string
}

export interface RawExchange {
  responses: RawResponse[]
  /** the server closed the connection before `timeoutMs` */
  closed: boolean
  /** milliseconds from the first byte sent to the close (or the timeout) */
  elapsedMs: number
  /** everything received, as text */
  raw: string
}

export interface RawOptions {
  /** give up waiting for the close after this long (default 10000) */
  timeoutMs?: number
  /** the requests were HEAD: their answers have no body */
  head?: boolean
  /** pause between the pieces of `data` (default 0) */
  pauseMs?: number
}

/** Sends `data` (piece by piece when it is an array), then reads until the server closes or `timeoutMs`. */
export async function rawRequest (url: string, data: string | Buffer | Array<string | Buffer>, opts: RawOptions = {}): Promise<RawExchange> {
  const { hostname, port } = new URL(url)
  const socket = net.connect(Number(port), hostname)
  socket.setNoDelay(true)
  const chunks: Buffer[] = []
  let closed = false
  const started = performance.now()
  socket.on('data', (c: Buffer) => chunks.push(c))
  const ended = new Promise<void>((resolve) => {
    socket.once('close', () => { closed = true; resolve() })
  })
  socket.on('error', () => {}) // a reset by the server is an answer too
  await new Promise<void>((resolve, reject) => { socket.once('connect', resolve); socket.once('error', reject) })
  const pieces = Array.isArray(data) ? data : [data]
  for (const piece of pieces) {
    if (closed) break
    socket.write(piece)
    if ((opts.pauseMs ?? 0) > 0) await sleep(opts.pauseMs)
  }
  let timer: NodeJS.Timeout | undefined
  await Promise.race([ended, new Promise<void>((resolve) => { timer = setTimeout(resolve, opts.timeoutMs ?? 10000) })])
  clearTimeout(timer)
  const elapsedMs = performance.now() - started
  socket.destroy()
  const buffer = Buffer.concat(chunks)
  return { responses: parseResponses(buffer, opts.head === true), closed, elapsedMs, raw: buffer.toString('latin1') }
}

/** The complete responses in `buffer`, in order (an incomplete last one is left out). */
export function parseResponses (buffer: Buffer, head = false): RawResponse[] {
  const out: RawResponse[] = []
  let at = 0
  while (at < buffer.length) {
    const end = buffer.indexOf('\r\n\r\n', at)
    if (end < 0) break
    const lines = buffer.subarray(at, end).toString('latin1').split('\r\n')
    const status = Number(/^HTTP\/1\.[01] (\d{3})/.exec(lines[0])?.[1])
    if (!Number.isInteger(status)) break
    const headers: Record<string, string> = {}
    for (const line of lines.slice(1)) {
      const colon = line.indexOf(':')
      if (colon <= 0) continue
      const name = line.slice(0, colon).trim().toLowerCase()
      const value = line.slice(colon + 1).trim()
      headers[name] = headers[name] == null ? value : `${headers[name]}, ${value}`
    }
    let cursor = end + 4
    let body: Buffer = Buffer.alloc(0)
    const bodiless = head || status === 204 || status === 304 || (status >= 100 && status < 200)
    if (!bodiless && /chunked/i.test(headers['transfer-encoding'] ?? '')) {
      const parts: Buffer[] = []
      for (;;) {
        const lineEnd = buffer.indexOf('\r\n', cursor)
        if (lineEnd < 0) return out
        const size = parseInt(buffer.subarray(cursor, lineEnd).toString('latin1'), 16)
        if (!Number.isFinite(size)) return out
        cursor = lineEnd + 2
        if (size === 0) {
          const trailerEnd = buffer.indexOf('\r\n', cursor)
          cursor = trailerEnd < 0 ? buffer.length : trailerEnd + 2
          break
        }
        parts.push(buffer.subarray(cursor, cursor + size))
        cursor += size + 2
      }
      body = Buffer.concat(parts)
    } else if (!bodiless && headers['content-length'] != null) {
      const length = Number(headers['content-length'])
      if (cursor + length > buffer.length) break
      body = buffer.subarray(cursor, cursor + length)
      cursor += length
    } else if (!bodiless) {
      body = buffer.subarray(cursor)
      cursor = buffer.length
    }
    out.push({ status, headers, body: body.toString('utf8') })
    at = cursor
  }
  return out
}

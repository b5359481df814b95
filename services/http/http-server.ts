import { STATUS_CODES } from 'node:http'

/**
 * Options for the standalone server's HTTP listener (Fastify server options).
 *
 * The timeouts bound how long a client may take to SEND its request, never how long an answer
 * takes: a streamed answer can last minutes, and each silent phase of it already has its own bound
 * (QUEUE_TIMEOUT_MS while waiting for a lease, UPSTREAM_HEADERS_TIMEOUT_MS for the upstream's
 * headers and between its body chunks, and for a client that stops reading).
 */
export interface HttpServerOptions {
  /** Request line and headers must arrive within this (slow-header attacks). Default 30 s. */
  headersTimeoutMs?: number
  /** The whole request, body included, must arrive within this (never-ending bodies). Default 120 s. */
  requestTimeoutMs?: number
  /** How often Node looks for connections past those limits. Default 1 s (Node's own is 30 s). */
  checkIntervalMs?: number
}

export interface HttpServerSettings {
  requestTimeout: number
  connectionTimeout: number
  keepAliveTimeout: number
  http: { headersTimeout: number, connectionsCheckingInterval: number }
  clientErrorHandler: typeof answerClientError
}

export function httpServerOptions (opts: HttpServerOptions = {}): HttpServerSettings {
  const requestTimeout = opts.requestTimeoutMs ?? 120_000
  return {
    requestTimeout,
    // Node wants the headers' limit within the request's.
    http: {
      headersTimeout: Math.min(opts.headersTimeoutMs ?? 30_000, requestTimeout),
      connectionsCheckingInterval: opts.checkIntervalMs ?? 1000
    },
    // No idle-socket limit: it would cut answers that are silent while waiting for a lease or for
    // a model to load. Requests are bounded above; answers by the lease and upstream timeouts.
    connectionTimeout: 0,
    // Longer than the usual load balancer's 60 s idle limit, so the balancer closes first.
    keepAliveTimeout: 72_000,
    clientErrorHandler: answerClientError
  }
}

interface ParseFailure extends Error {
  code?: string
  /** what had arrived when parsing failed (Node sets it on parser errors) */
  rawPacket?: unknown
}

interface RawSocket {
  destroyed: boolean
  writable: boolean
  write: (data: string) => unknown
  destroy: (err?: Error) => unknown
}

/**
 * Node's HTTP parser refused a request (malformed or conflicting framing, headers too large, too
 * slow): answer in the gateway's error format, and say that the connection closes, as it does;
 * Fastify's own answer leaves that out, and a keep-alive client then sends its next request into
 * a closed socket.
 */
export function answerClientError (err: ParseFailure, socket: RawSocket): void {
  if (err.code === 'ECONNRESET' || socket.destroyed) return
  const [status, message] = err.code === 'ERR_HTTP_REQUEST_TIMEOUT'
    ? [408, 'request not received in time']
    : err.code === 'HPE_HEADER_OVERFLOW'
      ? [431, 'request headers too large']
      : [400, `malformed HTTP request${err.code != null ? ` (${err.code})` : ''}`]
  // A HEAD request's answer has no body, even this one (when the failing packet shows the method).
  const head = Buffer.isBuffer(err.rawPacket) && err.rawPacket.subarray(0, 5).toString('latin1') === 'HEAD '
  const body = head ? '' : JSON.stringify({ error: message })
  if (socket.writable) {
    socket.write(`HTTP/1.1 ${status} ${STATUS_CODES[status] ?? ''}\r\nContent-Type: application/json; charset=utf-8\r\n` +
      `Content-Length: ${Buffer.byteLength(JSON.stringify({ error: message }))}\r\nConnection: close\r\n\r\n${body}`)
  }
  socket.destroy(err)
}

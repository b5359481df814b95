import type { IncomingHttpHeaders } from 'node:http'

/** Headers that describe one connection, never forwarded in either direction (RFC 9110 §7.6.1). */
const HOP_BY_HOP = new Set([
  'connection', 'keep-alive', 'proxy-connection', 'proxy-authenticate', 'proxy-authorization', 'te', 'trailer',
  'transfer-encoding', 'upgrade', 'http2-settings'
])

const NONE: ReadonlySet<string> = new Set()

/** The headers a `Connection` header names (hop-by-hop too); most messages name none. */
function connectionNamed (value: unknown): ReadonlySet<string> {
  // what almost every client sends: names a header that is hop-by-hop anyway
  if (typeof value !== 'string' || value === 'keep-alive' || value === 'close') return NONE
  return new Set(value.split(',').map((s) => s.trim().toLowerCase()).filter(Boolean))
}

export interface UpstreamHeaderOptions {
  /** `host:port` of the upstream: Ollama on loopback refuses any other Host. */
  host: string
  requestId: string
  /** Drop the client's Authorization: it carries the gateway's own API key. */
  dropAuthorization: boolean
  /** With tracing on: the upstream exchange span's `traceparent` (and `tracestate`), instead of the client's. */
  trace?: Record<string, string>
}

/** The client's end-to-end headers, made fit for the upstream. */
export function upstreamRequestHeaders (headers: IncomingHttpHeaders, opts: UpstreamHeaderOptions): Record<string, string | string[] | undefined> {
  const drop = connectionNamed(headers.connection)
  const out: Record<string, string | string[] | undefined> = {}
  for (const [name, value] of Object.entries(headers)) {
    if (HOP_BY_HOP.has(name) || drop.has(name) || name === 'host' || name === 'x-request-id') continue
    // `Expect: 100-continue` was for the gateway, which has answered it and read the body (curl sends
    // it with large bodies; undici refuses to send it at all).
    if (name === 'expect') continue
    if (name === 'authorization' && opts.dropAuthorization) continue
    out[name] = value
  }
  out.host = opts.host
  out['x-request-id'] = opts.requestId
  if (opts.trace != null) {
    delete out.traceparent
    delete out.tracestate
    Object.assign(out, opts.trace)
  }
  return out
}

/** The upstream's end-to-end headers for the client; the gateway's own `x-maestro-*` cannot be forged. */
export function clientResponseHeaders (headers: Record<string, unknown>): IncomingHttpHeaders {
  const drop = connectionNamed(headers.connection)
  const out: IncomingHttpHeaders = {}
  for (const [name, value] of Object.entries(headers)) {
    const lower = name.toLowerCase()
    if (HOP_BY_HOP.has(lower) || drop.has(lower) || lower.startsWith('x-maestro-') || lower === 'x-request-id') continue
    out[lower] = value as string
  }
  return out
}

/** A header-safe rendering of a name from the inventory (which may hold any text). */
export function headerValue (text: string): string {
  return /^[\x20-\x7e]*$/.test(text) ? text : encodeURIComponent(text)
}

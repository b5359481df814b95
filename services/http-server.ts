/**
 * Timeouts of the standalone server's HTTP listener (Fastify server options). They bound how long
 * a client may take to SEND its request, never how long an answer takes: a streamed answer can
 * last minutes, and each silent phase of it already has its own bound (QUEUE_TIMEOUT_MS while
 * waiting for a lease, UPSTREAM_HEADERS_TIMEOUT_MS for the upstream's headers and between its
 * body chunks).
 */
export interface ServerTimeoutOptions {
  /** Request line and headers must arrive within this (slow-header attacks). Default 30 s. */
  headersTimeoutMs?: number
  /** The whole request, body included, must arrive within this (never-ending bodies). Default 120 s. */
  requestTimeoutMs?: number
  /** How often Node looks for connections past those limits. Default 1 s (Node's own is 30 s). */
  checkIntervalMs?: number
}

export interface ServerTimeouts {
  requestTimeout: number
  connectionTimeout: number
  keepAliveTimeout: number
  http: { headersTimeout: number, connectionsCheckingInterval: number }
}

export function serverTimeouts (opts: ServerTimeoutOptions = {}): ServerTimeouts {
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
    keepAliveTimeout: 72_000
  }
}

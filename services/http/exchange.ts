import { randomUUID } from 'node:crypto'
import { performance } from 'node:perf_hooks'
import type { RequestTrace } from '../tracing/request-trace.js'

/** How an upstream failed: before it saw the request, with no headers in time, otherwise, or after its stream began. */
export type UpstreamFailureReason = 'unreachable' | 'timeout' | 'failed' | 'mid-stream'

/** The upstream an exchange was leased, for its log line and metrics. */
export interface UpstreamUse {
  assignment: string
  gpuIds: string[]
  queuedMs: number
  /** performance.now() when the lease was granted, and when it was released (the upstream's work ended). */
  startedAt: number
  endedAt?: number
}

/**
 * The reason every exchange's signal aborts with. One for all: an AbortError made per request
 * (what `abort()` without a reason does) captures a stack trace, which cost more than the rest of
 * ending the exchange, on every request.
 */
const EXCHANGE_ENDED = new DOMException('the exchange has ended', 'AbortError')

/**
 * One client exchange, from its first byte to the close of its response. The response's 'close'
 * event is the one signal that fires however an exchange ends (completed, client gone, upstream
 * died, timed out), so leases hang their release on it.
 */
const noop = (): void => {}

export class Exchange {
  /** Made when someone asks for the signal (few do: an AbortController per request had a cost). */
  private controller?: AbortController
  private readonly cleanups: Array<() => void> = []
  closed = false
  /** The model the request named, once the inventory has a candidate for it. */
  model?: string
  /** The last upstream leased for this exchange (a retry replaces an unreachable one). */
  upstream?: UpstreamUse
  readonly upstreamFailures: Array<{ assignment: string, reason: UpstreamFailureReason }> = []
  /** The request's spans, when tracing is on (OTEL_EXPORTER_OTLP_ENDPOINT); told what happens below. */
  trace?: RequestTrace

  constructor (readonly requestId: string) {}

  /** A lease on `assignment` was granted; the request goes there now. */
  leased (assignment: string, gpuIds: string[], queuedMs: number): void {
    this.upstream = { assignment, gpuIds, queuedMs, startedAt: performance.now() }
    this.trace?.leased(assignment, gpuIds, queuedMs)
  }

  /** The lease was released: the upstream's part is over. */
  released (): void {
    if (this.upstream != null) this.upstream.endedAt ??= performance.now()
    this.trace?.released()
  }

  upstreamFailed (assignment: string, reason: UpstreamFailureReason): void {
    this.upstreamFailures.push({ assignment, reason })
    this.trace?.upstreamFailed(reason)
  }

  /** Aborts when the exchange ends, for whatever reason. */
  get signal (): AbortSignal {
    if (this.controller == null) {
      this.controller = new AbortController()
      if (this.closed) this.controller.abort(EXCHANGE_ENDED)
    }
    return this.controller.signal
  }

  /** Run `fn` once the exchange has ended (at once if it already has); returns what takes `fn` back. */
  onClose (fn: () => void): () => void {
    if (this.closed) {
      fn()
      return noop
    }
    this.cleanups.push(fn)
    // what a waiter that got its lease calls: its "client left" no longer matters
    return () => {
      const i = this.cleanups.indexOf(fn)
      if (i >= 0) this.cleanups.splice(i, 1)
    }
  }

  close (): void {
    if (this.closed) return
    this.closed = true
    this.controller?.abort(EXCHANGE_ENDED)
    for (const fn of this.cleanups.splice(0)) fn()
  }
}

/** The status an exchange ended with, for logs and metrics: 499 when the client left before any answer was sent. */
export function exchangeStatus (statusCode: number, headersSent: boolean): number {
  return headersSent ? statusCode : 499
}

const REQUEST_ID = /^[A-Za-z0-9._:@=+/-]{1,128}$/

/** The client's `x-request-id` when it is a sane token, else a new one. */
export function requestIdFrom (header: string | string[] | undefined): string {
  return typeof header === 'string' && REQUEST_ID.test(header) ? header : randomUUID()
}

/**
 * Fastify's `genReqId` for a server of the gateway's own: the request id in its log lines is the
 * one the gateway answers with and sends upstream (the exchange reads it back from the header).
 */
export function gatewayRequestId (req: { headers: Record<string, string | string[] | undefined> }): string {
  const id = requestIdFrom(req.headers['x-request-id'])
  req.headers['x-request-id'] = id
  return id
}

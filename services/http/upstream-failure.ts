import { GatewayError } from './errors.js'

/** How a failed upstream call is read: from undici's and @fastify/reply-from's error codes. */

interface UpstreamError { code?: string, name?: string, cause?: { code?: string } }

const UNREACHABLE = new Set(['ECONNREFUSED', 'ECONNRESET', 'EHOSTUNREACH', 'ENETUNREACH', 'ENOTFOUND', 'EAI_AGAIN', 'UND_ERR_CONNECT_TIMEOUT',
  'UND_ERR_SOCKET', 'FST_REPLY_FROM_SERVICE_UNAVAILABLE', 'FST_REPLY_FROM_CONNECTION_RESET_ERROR',
  'FST_REPLY_FROM_CONNECT_TIMEOUT', 'FST_REPLY_FROM_UNDICI_SOCKET_ERROR'])

/** Failures that happened before the upstream saw the request: safe to try another server. */
export function unreachable (error: unknown): boolean {
  const e = error as UpstreamError
  return UNREACHABLE.has(e.cause?.code ?? e.code ?? '')
}

export function timedOut (error: unknown): boolean {
  const e = error as UpstreamError
  return e.code === 'FST_REPLY_FROM_GATEWAY_TIMEOUT' || e.cause?.code === 'UND_ERR_HEADERS_TIMEOUT' || e.name === 'TimeoutError'
}

export function failureCode (error: unknown): string {
  const e = error as UpstreamError
  return e.cause?.code ?? e.code ?? 'failed'
}

/** A request body cut off at BODY_LIMIT while it was streamed on: the client's fault, not the upstream's. */
export function bodyTooLarge (error: unknown): boolean {
  return (error as UpstreamError).cause?.code === 'FST_ERR_CTP_BODY_TOO_LARGE'
}

/**
 * The client's streamed body refused on its way by a rule of its content (a second `model` field):
 * the error to answer with, from the upstream call's failure or from the body stream itself (it
 * may have failed before the call began), else undefined.
 */
export function refusedBody (error: unknown, body: unknown): GatewayError | undefined {
  const cause = (error as { cause?: unknown } | null)?.cause
  if (cause instanceof GatewayError) return cause
  const errored = (body as { errored?: unknown } | null)?.errored
  return errored instanceof GatewayError ? errored : undefined
}

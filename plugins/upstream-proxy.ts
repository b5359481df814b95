import { PassThrough, type Readable } from 'node:stream'
import fp from 'fastify-plugin'
import replyFrom from '@fastify/reply-from'
import type { FastifyReply, FastifyRequest } from 'fastify'
import { GatewayError } from '../services/errors.js'
import { Exchange, requestIdFrom } from '../services/exchange.js'
import { clientResponseHeaders, headerValue, upstreamRequestHeaders } from '../services/http-headers.js'
import type { Assignment, ModelKind } from '../services/inventory.js'
import { LeaseError, type Lease } from '../services/lease-manager.js'
import { candidatesOf, queueName } from '../services/lease-store.js'
import { modelKey } from '../services/model-name.js'

/** How long an assignment that refused a connection sits out before it is tried first again. */
const COOLDOWN_MS = 5000

export interface LeaseTarget {
  kind: ModelKind
  model: string
  /** Restrict the choice (e.g. the server that holds an uploaded file); default: every assignment of the model. */
  candidates?: Assignment[]
}

export interface LeasedForward extends LeaseTarget {
  /** The upstream path: always the route's own, never taken from the client's URL. */
  path: string
  body: string
  /** What a broken stream ends with, in the stream's own format. */
  streamError?: (message: string) => string
}

declare module 'fastify' {
  interface FastifyRequest {
    exchange: Exchange
  }
  interface FastifyInstance {
    /** Lease a GPU server for the model, forward the body to it, stream the answer back. */
    forwardLeased: (request: FastifyRequest, reply: FastifyReply, target: LeasedForward) => Promise<FastifyReply>
    /**
     * Lease a GPU server for the model and run `work` against it (several upstream calls under one
     * lease); the lease is released when `work` settles or the client leaves. For answers that are
     * not one proxied response.
     */
    withLease: <T>(request: FastifyRequest, reply: FastifyReply, target: LeaseTarget, work: (upstream: LeasedUpstream) => Promise<T>) => Promise<T>
    /** Forward to a chosen upstream without a lease (model info, uploads). */
    forwardTo: (request: FastifyRequest, reply: FastifyReply, assignment: Assignment, path: string, opts?: ForwardOptions) => FastifyReply
  }
}

export interface ForwardOptions {
  /** A JSON body to send instead of the client's (which is then streamed through as it comes). */
  body?: string
  /** Read a small JSON answer before it is passed on (e.g. to remember where an upload went). */
  onJsonAnswer?: (answer: unknown, statusCode: number) => Promise<void>
}

/** Largest answer `onJsonAnswer` reads; anything bigger is passed on unread. */
const INSPECT_LIMIT = 64 * 1024

/** The upstream a `withLease` work runs against. */
export interface LeasedUpstream {
  assignment: Assignment
  /** Aborts when the client leaves or the lease is lost: stop the work. */
  signal: AbortSignal
  /** POST a JSON body to `path` on the leased upstream (each call bounded by UPSTREAM_HEADERS_TIMEOUT_MS). */
  post: (path: string, body: unknown) => Promise<Response>
}

interface UpstreamError { code?: string, name?: string, cause?: { code?: string } }

/** Failures that happened before the upstream saw the request: safe to try another server. */
function unreachable (error: unknown): boolean {
  const e = error as UpstreamError
  const code = e.cause?.code ?? e.code
  return ['ECONNREFUSED', 'ECONNRESET', 'EHOSTUNREACH', 'ENETUNREACH', 'ENOTFOUND', 'EAI_AGAIN', 'UND_ERR_CONNECT_TIMEOUT',
    'UND_ERR_SOCKET', 'FST_REPLY_FROM_SERVICE_UNAVAILABLE', 'FST_REPLY_FROM_CONNECTION_RESET_ERROR',
    'FST_REPLY_FROM_CONNECT_TIMEOUT', 'FST_REPLY_FROM_UNDICI_SOCKET_ERROR'].includes(code ?? '')
}

function timedOut (error: unknown): boolean {
  const e = error as UpstreamError
  return e.code === 'FST_REPLY_FROM_GATEWAY_TIMEOUT' || e.cause?.code === 'UND_ERR_HEADERS_TIMEOUT' || e.name === 'TimeoutError'
}

/** The upstream path is always the route's own: the client's query string is not passed on. */
const noQueryString = (): string => ''

function failureCode (error: unknown): string {
  const e = error as UpstreamError
  return e.cause?.code ?? e.code ?? 'failed'
}

export default fp(async function upstreamProxy (fastify) {
  const config = fastify.maestroConfig
  await fastify.register(replyFrom, {
    undici: {
      headersTimeout: config.upstreamHeadersTimeoutMs,
      // a stream that sends nothing for this long is dead: free its GPUs
      bodyTimeout: config.upstreamHeadersTimeoutMs,
      keepAliveTimeout: 4000,
      connect: { timeout: 5000 }
    },
    disableRequestLogging: true
  })

  const cooling = new Map<string, number>()
  // The client's Authorization carries the gateway's own key or token: never pass it on.
  const dropAuthorization = config.apiKeys.length > 0 || config.adminToken != null

  fastify.decorateRequest('exchange', null as unknown as Exchange)
  fastify.addHook('onRequest', async (request, reply) => {
    // Attached before any await: attached after the client has gone, 'close' never fires.
    const exchange = new Exchange(requestIdFrom(request.headers['x-request-id']))
    request.exchange = exchange
    reply.raw.once('close', () => exchange.close())
    reply.header('x-request-id', exchange.requestId)
  })

  // A client that stops reading would keep a streamed answer's GPUs for ever (backpressure pauses
  // the upstream, so it never ends). Once an answer streams, a connection on which nothing moves
  // for as long as a silent upstream is allowed is closed; that ends the exchange and its lease.
  fastify.addHook('onSend', async (_request, reply, payload) => {
    if (typeof (payload as { pipe?: unknown } | null)?.pipe === 'function') {
      reply.raw.setTimeout(config.upstreamHeadersTimeoutMs, () => reply.raw.destroy())
    }
    return payload
  })

  function requestHeaders (request: FastifyRequest, assignment: Assignment) {
    return (_req: unknown, headers: Record<string, any>) => upstreamRequestHeaders(headers, {
      host: assignment.host,
      requestId: request.exchange.requestId,
      dropAuthorization
    })
  }

  fastify.decorate('forwardTo', function (request: FastifyRequest, reply: FastifyReply, assignment: Assignment, path: string, opts: ForwardOptions = {}) {
    const { body, onJsonAnswer } = opts
    return reply.from(assignment.url + path, {
      body,
      // the body was parsed as JSON, whatever Content-Type the client sent (curl -d sends form encoding)
      contentType: body != null ? 'application/json' : undefined,
      queryString: noQueryString,
      rewriteRequestHeaders: requestHeaders(request, assignment),
      rewriteHeaders: clientResponseHeaders,
      onResponse: onJsonAnswer == null
        ? undefined
        : (_request, reply, raw) => {
            const res = raw as unknown as { statusCode: number, headers: Record<string, unknown>, stream: Readable }
            if (Number(res.headers['content-length'] ?? INSPECT_LIMIT + 1) > INSPECT_LIMIT) {
              reply.send(res.stream)
              return
            }
            readAll(res.stream).then(async (bytes) => {
              let answer: unknown
              try { answer = JSON.parse(bytes.toString('utf8')) } catch { answer = undefined }
              if (answer !== undefined) await onJsonAnswer(answer, res.statusCode)
              reply.send(bytes)
            }).catch((err) => reply.send(err))
          },
      onError: (reply, { error }) => {
        // A streamed body (upload) cut off at BODY_LIMIT: the client's fault, not the upstream's.
        if ((error as UpstreamError).cause?.code === 'FST_ERR_CTP_BODY_TOO_LARGE') return reply.sendError(413, 'request body is too large')
        fastify.log.warn({ err: error, assignment: assignment.name }, 'upstream failed')
        request.exchange.upstreamFailed(assignment.name, unreachable(error) ? 'unreachable' : timedOut(error) ? 'timeout' : 'failed')
        if (timedOut(error)) reply.sendError(504, `upstream '${assignment.name}' sent no answer in time`)
        else reply.sendError(502, `upstream '${assignment.name}' is unreachable`)
      }
    })
  })

  interface Held {
    assignment: Assignment
    lease: Lease
    /** Release once; also bound to the end of the exchange. */
    release: () => void
  }

  /**
   * One request's way through the model's candidates: lease the best untried one (those in
   * cooldown only when nothing else is left), remember those found unreachable. Shared by every
   * leased route, so choice, queueing, headers and release work the same everywhere.
   */
  function candidateLeases (request: FastifyRequest, reply: FastifyReply, target: LeaseTarget) {
    const all = target.candidates ?? fastify.inventory.current.candidates(target.model, target.kind)
    if (all.length === 0) {
      // Every server of the model drained by an operator: it exists, it is just not taking work.
      if (fastify.inventory.current.candidates(target.model, target.kind, { drained: true }).length > 0) {
        throw new GatewayError(503, `every server of model '${target.model}' is drained`, 5)
      }
      throw new GatewayError(404, `model '${target.model}' not found`)
    }
    request.exchange.model = target.model
    const queue = queueName(target.kind, modelKey(target.model))
    const tried = new Set<string>()
    let lastFailure = ''
    return {
      /** The next lease, or undefined when every candidate has been found unreachable. */
      async next (): Promise<Held | undefined> {
        const now = Date.now()
        // (the filters copy the list; most requests have tried nothing and nothing is cooling)
        const untried = tried.size === 0 ? all : all.filter((a) => !tried.has(a.id))
        if (untried.length === 0) return undefined
        const fresh = cooling.size === 0 ? untried : untried.filter((a) => (cooling.get(a.id) ?? 0) <= now)
        const choice = fresh.length > 0 ? fresh : untried
        const lease = await fastify.leases.acquire({
          queue,
          candidates: candidatesOf(choice),
          info: { model: target.model, kind: target.kind, purpose: 'proxy' },
          signal: request.exchange.signal
        })
        const assignment = choice[lease.candidateIndex]
        request.exchange.leased(assignment.name, lease.gpuIds, lease.queuedMs)
        let released = false
        const release = (): void => {
          if (released) return
          released = true
          request.exchange.released()
          void fastify.leases.release(lease)
        }
        // Not released when the client leaves: the upstream may still be working on the GPUs
        // (a non-streamed answer, an image). Each way of using the lease says when it is done.
        reply.header('x-maestro-assignment', headerValue(assignment.name))
        reply.header('x-maestro-gpus', lease.gpuIds.join(','))
        reply.header('x-maestro-queue-ms', lease.queuedMs.toFixed(1))
        return { assignment, lease, release }
      },
      /** The upstream was unreachable before it saw the request: sit it out, try the next. */
      unreachable (assignment: Assignment, error: unknown): void {
        tried.add(assignment.id)
        const now = Date.now()
        for (const [id, until] of cooling) if (until <= now) cooling.delete(id)
        cooling.set(assignment.id, now + COOLDOWN_MS)
        lastFailure = ` (last: '${assignment.name}' ${failureCode(error)})`
        request.exchange.upstreamFailed(assignment.name, 'unreachable')
        fastify.log.warn({ err: error, assignment: assignment.name }, 'upstream unreachable; trying the next candidate')
      },
      exhausted (): string {
        return `no upstream for model '${target.model}' is reachable${lastFailure}`
      }
    }
  }

  fastify.decorate('forwardLeased', async function (request: FastifyRequest, reply: FastifyReply, target: LeasedForward) {
    const leases = candidateLeases(request, reply, target)

    const forward = async (): Promise<FastifyReply> => {
      const held = await leases.next()
      if (held == null) return reply.sendError(502, leases.exhausted())
      return send(held)
    }

    const send = ({ assignment, lease, release }: Held): FastifyReply => {
      // The client left while the lease was on its way: nothing to send.
      if (request.exchange.closed) {
        release()
        return reply
      }
      lease.lost.addEventListener('abort', () => reply.raw.destroy(), { once: true })
      // A client gone before the upstream's headers does not stop the upstream (reply-from has no
      // way to): its GPUs stay leased until the headers come (the upstream then learns it is alone),
      // or the headers timeout; a fallback timer bounds it whatever happens.
      let answered = false
      request.exchange.onClose(() => {
        if (!answered) setTimeout(release, config.upstreamHeadersTimeoutMs + 5000).unref()
      })
      return reply.from(assignment.url + target.path, {
        body: target.body,
        contentType: 'application/json',
        queryString: noQueryString,
        rewriteRequestHeaders: requestHeaders(request, assignment),
        rewriteHeaders: (headers) => {
          // From here, the client leaving ends the upstream answer too (its stream is destroyed).
          answered = true
          request.exchange.onClose(release)
          return clientResponseHeaders(headers)
        },
        onResponse: (_request, reply, raw) => {
          const res = raw as unknown as { statusCode: number, headers: Record<string, unknown>, stream: Readable }
          const upstream = res.stream
          // The GPU is done when the upstream's answer has ended, not when a slow client has read it.
          upstream.once('end', release)
          upstream.once('close', release)
          upstream.once('error', () => request.exchange.upstreamFailed(assignment.name, 'mid-stream'))
          // An error record can only end an answer of open length (NDJSON, SSE: chunked). Appended to
          // one with a Content-Length it would leave the answer short (the client waits for the rest)
          // or long (it misreads the next answer): such an answer is cut off instead.
          if (target.streamError == null || res.headers['content-length'] != null) {
            releaseAtLastByte(upstream, res.headers['content-length'], release)
            reply.send(upstream)
            return
          }
          reply.send(withStreamError(upstream, target.streamError))
        },
        onError: (reply, { error }) => {
          release()
          if (unreachable(error) && !reply.sent && !request.exchange.closed) {
            leases.unreachable(assignment, error)
            forward().catch((err) => reply.send(err))
            return
          }
          if (!request.exchange.closed) request.exchange.upstreamFailed(assignment.name, timedOut(error) ? 'timeout' : 'failed')
          if (timedOut(error)) reply.sendError(504, `upstream '${assignment.name}' sent no headers within ${config.upstreamHeadersTimeoutMs} ms`)
          else reply.sendError(502, `upstream '${assignment.name}' failed: ${(error as Error).message}`)
        }
      })
    }

    return await forward()
  })

  fastify.decorate('withLease', async function <T> (request: FastifyRequest, reply: FastifyReply, target: LeaseTarget, work: (upstream: LeasedUpstream) => Promise<T>): Promise<T> {
    const leases = candidateLeases(request, reply, target)
    for (;;) {
      const held = await leases.next()
      if (held == null) throw new GatewayError(502, leases.exhausted())
      const { assignment, lease, release } = held
      const signal = AbortSignal.any([request.exchange.signal, lease.lost])
      // A call under way is not aborted when the client leaves (the upstream would work on, on GPUs
      // released under it): it runs to its end, and no further call is made.
      const post = async (path: string, body: unknown): Promise<Response> => {
        if (request.exchange.closed) throw new LeaseError('client closed request', 499)
        return await fetch(assignment.url + path, {
          method: 'POST',
          headers: { 'content-type': 'application/json', 'x-request-id': request.exchange.requestId },
          body: JSON.stringify(body),
          signal: AbortSignal.any([lease.lost, AbortSignal.timeout(config.upstreamHeadersTimeoutMs)])
        })
      }
      try {
        return await work({ assignment, signal, post })
      } catch (error) {
        if (error instanceof GatewayError || error instanceof LeaseError) throw error
        if (unreachable(error) && !request.exchange.closed) {
          leases.unreachable(assignment, error)
          continue
        }
        if (!request.exchange.closed && !lease.lost.aborted) request.exchange.upstreamFailed(assignment.name, timedOut(error) ? 'timeout' : 'failed')
        if (timedOut(error)) throw new GatewayError(504, `upstream '${assignment.name}' sent no answer within ${config.upstreamHeadersTimeoutMs} ms`)
        if (lease.lost.aborted) throw lease.lost.reason
        throw new GatewayError(502, `upstream '${assignment.name}' failed: ${(error as Error).message}`)
      } finally {
        release()
      }
    }
  })
}, { name: 'upstream-proxy', dependencies: ['config', 'errors', 'gpu-lease', 'inventory'], fastify: '5.x' })

async function readAll (stream: Readable): Promise<Buffer> {
  const chunks: Buffer[] = []
  for await (const chunk of stream) chunks.push(chunk as Buffer)
  return Buffer.concat(chunks)
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

import type { Readable } from 'node:stream'
import fp from 'fastify-plugin'
import replyFrom from '@fastify/reply-from'
import type { FastifyInstance, FastifyReply, FastifyRequest } from 'fastify'
import { CandidateRound, Cooldowns } from '../services/candidate-choice.js'
import { GatewayError } from '../services/errors.js'
import { clientResponseHeaders, headerValue, upstreamRequestHeaders } from '../services/http-headers.js'
import type { Assignment, ModelKind } from '../services/inventory.js'
import { LeaseError, lostSignal, type Lease } from '../services/lease-manager.js'
import { candidatesOf, queueName } from '../services/lease-store.js'
import { modelKey } from '../services/model-name.js'
import type { ClientPass } from './clients.js'
import { frameAnswer } from '../services/stream-framing.js'
import { SlowReaderLimit } from '../services/slow-reader.js'
import { bodyTooLarge, refusedBody, timedOut, unreachable } from '../services/upstream-failure.js'

export interface LeaseTarget {
  kind: ModelKind
  model: string
  /** Restrict the choice (e.g. the server that holds an uploaded file); default: every assignment of the model. */
  candidates?: readonly Assignment[]
}

export interface LeasedForward extends LeaseTarget {
  /** The upstream path: always the route's own, never taken from the client's URL. */
  path: string
  /**
   * The JSON body to send; absent: the client's own body is streamed through as it arrives, with
   * its Content-Type (an upload: it can be sent once only, so no other candidate is tried).
   */
  body?: string
  /** What a broken stream ends with, in the stream's own format. */
  streamError?: (message: string) => string
}

declare module 'fastify' {
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
    /** The assignments this replica found unreachable lately and sits out (the console shows them cooling down). */
    upstreamCooldowns: Cooldowns
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

/** How much longer than UPSTREAM_HEADERS_TIMEOUT_MS a streamed answer's client connection may stay idle. */
const CLIENT_IDLE_MARGIN_MS = 2000

/** The upstream path is always the route's own: the client's query string is not passed on. */
const noQueryString = (): string => ''

/** What the proxy's functions share: the gateway, its configuration, the cooldowns of its upstreams. */
interface Proxy {
  fastify: FastifyInstance
  config: FastifyInstance['maestroConfig']
  cooldowns: Cooldowns
  /** The client's Authorization carries the gateway's own key or token: never pass it on. */
  dropAuthorization: () => boolean
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
  const proxy: Proxy = { fastify, config, cooldowns: new Cooldowns(), dropAuthorization: () => config.adminToken != null || fastify.apiKeys.configured }
  fastify.decorate('upstreamCooldowns', proxy.cooldowns)

  // A client that stops reading would keep a streamed answer's GPUs for ever (backpressure pauses
  // the upstream, so it never ends). Once an answer streams, a connection on which nothing moves
  // for longer than a silent upstream is allowed is closed; so is one whose writer has been held
  // back by the client that long in all (one reading a little now and then is never silent).
  // Either ends the exchange and its lease. Longer by a margin: a silent upstream must be given
  // up first (undici's body timeout, whose timers are coarse), so that its stream can still end
  // with an error record on this connection.
  const slowReaders = new SlowReaderLimit(config.upstreamHeadersTimeoutMs + CLIENT_IDLE_MARGIN_MS)
  fastify.addHook('onSend', async (_request, reply, payload) => {
    if (typeof (payload as { pipe?: unknown } | null)?.pipe === 'function') {
      reply.raw.setTimeout(config.upstreamHeadersTimeoutMs + CLIENT_IDLE_MARGIN_MS, () => reply.raw.destroy())
      slowReaders.watch(reply.raw)
    }
    return payload
  })

  fastify.decorate('forwardTo', function (request: FastifyRequest, reply: FastifyReply, assignment: Assignment, path: string, opts: ForwardOptions = {}) {
    return forwardTo(proxy, request, reply, assignment, path, opts)
  })
  fastify.decorate('forwardLeased', async function (request: FastifyRequest, reply: FastifyReply, target: LeasedForward) {
    return await forwardLeased(proxy, request, reply, target)
  })
  fastify.decorate('withLease', async function <T> (request: FastifyRequest, reply: FastifyReply, target: LeaseTarget, work: (upstream: LeasedUpstream) => Promise<T>): Promise<T> {
    return await withLease(proxy, request, reply, target, work)
  })
}, { name: 'upstream-proxy', dependencies: ['config', 'errors', 'exchange', 'gpu-lease', 'inventory', 'upstream-poller'], fastify: '5.x' })

function requestHeaders (proxy: Proxy, request: FastifyRequest, assignment: Assignment) {
  return (_req: unknown, headers: Record<string, any>) => upstreamRequestHeaders(headers, {
    host: assignment.host,
    requestId: request.exchange.requestId,
    dropAuthorization: proxy.dropAuthorization()
  })
}

/** Forward to a chosen upstream without a lease (model info, uploads). */
function forwardTo (proxy: Proxy, request: FastifyRequest, reply: FastifyReply, assignment: Assignment, path: string, opts: ForwardOptions): FastifyReply {
  const { body, onJsonAnswer } = opts
  return reply.from(assignment.url + path, {
    body,
    // the body was parsed as JSON, whatever Content-Type the client sent (curl -d sends form encoding)
    contentType: body != null ? 'application/json' : undefined,
    queryString: noQueryString,
    rewriteRequestHeaders: requestHeaders(proxy, request, assignment),
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
      // A streamed body (upload) cut off at BODY_LIMIT, or refused on its way: the client's fault, not the upstream's.
      if (bodyTooLarge(error)) return reply.sendError(413, 'request body is too large')
      const refused = refusedBody(error, request.body)
      if (refused != null) return reply.header('connection', 'close').sendError(refused.statusCode, refused.message)
      proxy.fastify.log.warn({ err: error, assignment: assignment.name }, 'upstream failed')
      request.exchange.upstreamFailed(assignment.name, unreachable(error) ? 'unreachable' : timedOut(error) ? 'timeout' : 'failed')
      if (timedOut(error)) reply.sendError(504, `upstream '${assignment.name}' sent no answer in time`)
      else reply.sendError(502, `upstream '${assignment.name}' is unreachable`)
    }
  })
}

interface Held {
  assignment: Assignment
  lease: Lease
  /** Release once; also bound to the end of the exchange. */
  release: () => void
}

/**
 * One request's way through the model's candidates (services/candidate-choice.ts says which to
 * try next), leasing each in turn. Shared by every leased route, so choice, queueing, headers and
 * release work the same everywhere.
 */
type CandidateLeases = ReturnType<typeof candidateLeases>

const isDrained = (proxy: Proxy, a: Assignment): boolean => proxy.fastify.inventory.current.assignment(a.id)?.drained === true

function candidateLeases (proxy: Proxy, request: FastifyRequest, reply: FastifyReply, target: LeaseTarget) {
  const inventory = proxy.fastify.inventory.current
  const all = target.candidates ?? inventory.candidateList(target.model, target.kind)
  if (all.length === 0) {
    // Every server of the model drained by an operator: it exists, it is just not taking work.
    if (inventory.candidateList(target.model, target.kind, { drained: true }).length > 0) {
      throw new GatewayError(503, `every server of model '${target.model}' is drained`, 5)
    }
    throw new GatewayError(404, `model '${target.model}' not found`)
  }
  request.exchange.model = target.model
  const queue = queueName(target.kind, modelKey(target.model))
  const round = new CandidateRound(all, proxy.cooldowns, target.model)
  let admitted: Promise<ClientPass> | undefined
  return {
    /** The next lease, or undefined when every candidate has been found unreachable. */
    async next (): Promise<Held | undefined> {
      let choice = round.next()
      if (choice === undefined) return undefined
      // the client's limits (403/429), checked once per request, held until the exchange ends
      const pass = await (admitted ??= proxy.fastify.admitClient(request, target.model))
      let lease: Lease
      let assignment: Assignment
      for (;;) {
        lease = await proxy.fastify.leases.acquire({
          queue,
          candidates: candidatesOf(choice),
          info: { model: target.model, kind: target.kind, purpose: 'proxy' as const },
          requester: request.exchange,
          client: { id: request.client.id, priority: request.client.priority },
          // warm servers first among the free ones (the background poll and the gateway's own traffic)
          preferred: target.kind === 'llm' ? proxy.fastify.upstreams.preferredAmong(choice, target.model) : undefined
        })
        assignment = choice[lease.candidateIndex]
        // Drained while this request waited (its candidates were chosen before): give the lease
        // back unused and wait for the others.
        if (!isDrained(proxy, assignment)) break
        void proxy.fastify.leases.release(lease)
        choice = choice.filter((a) => !isDrained(proxy, a))
        if (choice.length === 0) throw new GatewayError(503, `every server of model '${target.model}' is drained`, 5)
      }
      pass.granted(lease.queuedMs)
      request.exchange.leased(assignment.name, lease.gpuIds, lease.queuedMs)
      let released = false
      const release = (): void => {
        if (released) return
        released = true
        request.exchange.released()
        void proxy.fastify.leases.release(lease)
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
      round.unreachable(assignment, error)
      request.exchange.upstreamFailed(assignment.name, 'unreachable')
      proxy.fastify.log.warn({ err: error, assignment: assignment.name }, 'upstream unreachable; trying the next candidate')
    },
    exhausted: () => round.exhausted()
  }
}

/** Lease a GPU server for the model, forward the body to it, stream the answer back. */
async function forwardLeased (proxy: Proxy, request: FastifyRequest, reply: FastifyReply, target: LeasedForward): Promise<FastifyReply> {
  const leases = candidateLeases(proxy, request, reply, target)

  const forward = async (): Promise<FastifyReply> => {
    const held = await leases.next()
    if (held == null) return reply.sendError(502, leases.exhausted())
    return sendOnLease(proxy, request, reply, target, held, leases, forward)
  }

  return await forward()
}

/**
 * Forward the body on a held lease and pass the answer on; the lease is released when the
 * upstream's answer has ended (services/stream-framing.ts), or when it fails (then an upstream
 * unreachable before it saw the request is sat out and `next` tries the next candidate).
 */
function sendOnLease (proxy: Proxy, request: FastifyRequest, reply: FastifyReply, target: LeasedForward, { assignment, lease, release }: Held,
  leases: CandidateLeases, next: () => Promise<FastifyReply>): FastifyReply {
  // The client left while the lease was on its way: nothing to send.
  if (request.exchange.closed) {
    release()
    return reply
  }
  lease.onLost(() => reply.raw.destroy())
  // A client gone before the upstream's headers does not stop the upstream (reply-from has no
  // way to): its GPUs stay leased until the headers come (the upstream then learns it is alone),
  // or the headers timeout; a fallback timer bounds it whatever happens.
  let answered = false
  request.exchange.onClose(() => {
    if (!answered) setTimeout(release, proxy.config.upstreamHeadersTimeoutMs + 5000).unref()
  })
  // A client gone mid-answer destroys the upstream's stream, but the upstream goes on computing
  // until it notices (Ollama's runner: at its next token): its GPUs stay leased a little longer.
  let complete = false
  let graced = false
  const releaseAnswered = (): void => {
    if (complete || !request.exchange.closed) return release()
    if (graced) return
    graced = true
    setTimeout(release, proxy.config.upstreamCancelGraceMs).unref()
  }
  return reply.from(assignment.url + target.path, {
    body: target.body,
    contentType: target.body != null ? 'application/json' : undefined,
    queryString: noQueryString,
    rewriteRequestHeaders: requestHeaders(proxy, request, assignment),
    rewriteHeaders: (headers) => {
      // From here, the client leaving ends the upstream answer too (its stream is destroyed).
      answered = true
      request.exchange.onClose(releaseAnswered)
      return clientResponseHeaders(headers)
    },
    onResponse: (_request, reply, raw) => {
      const res = raw as unknown as { statusCode: number, headers: Record<string, unknown>, stream: Readable }
      res.stream.once('end', () => { complete = true })
      res.stream.once('error', () => request.exchange.upstreamFailed(assignment.name, 'mid-stream'))
      // The model answered on that server: it is loaded there now (the scheduler's warm preference).
      if (target.kind === 'llm' && res.statusCode === 200) proxy.fastify.upstreams.noteServed(assignment, target.model)
      reply.send(frameAnswer(res.stream, res.headers, releaseAnswered, target.streamError))
    },
    onError: (reply, { error }) => {
      // An upstream that never saw the request (or never a whole body) frees its GPUs at once; one
      // that had it (no headers in time, broken off) computes on until it notices the cut
      // connection, as after a client left.
      const refused = refusedBody(error, request.body)
      if (unreachable(error) || bodyTooLarge(error) || refused != null) release()
      else setTimeout(release, proxy.config.upstreamCancelGraceMs).unref()
      if (bodyTooLarge(error)) return reply.sendError(413, 'request body is too large')
      if (refused != null) return reply.header('connection', 'close').sendError(refused.statusCode, refused.message)
      if (unreachable(error) && target.body != null && !reply.sent && !request.exchange.closed) {
        leases.unreachable(assignment, error)
        next().catch((err) => reply.send(err))
        return
      }
      if (!request.exchange.closed) request.exchange.upstreamFailed(assignment.name, timedOut(error) ? 'timeout' : 'failed')
      if (timedOut(error)) return reply.sendError(504, `upstream '${assignment.name}' sent no headers within ${proxy.config.upstreamHeadersTimeoutMs} ms`)
      // The error's own text (it may name ip:port) goes to the log only.
      proxy.fastify.log.warn({ err: error, assignment: assignment.name }, 'upstream failed')
      reply.sendError(502, `upstream '${assignment.name}' failed`)
    }
  })
}

/** Lease a GPU server for the model and run `work` against it; released when `work` settles. */
async function withLease<T> (proxy: Proxy, request: FastifyRequest, reply: FastifyReply, target: LeaseTarget, work: (upstream: LeasedUpstream) => Promise<T>): Promise<T> {
  const leases = candidateLeases(proxy, request, reply, target)
  for (;;) {
    const held = await leases.next()
    if (held == null) throw new GatewayError(502, leases.exhausted())
    const { assignment, lease, release } = held
    const lost = lostSignal(lease)
    const signal = AbortSignal.any([request.exchange.signal, lost])
    // A call under way is not aborted when the client leaves (the upstream would work on, on GPUs
    // released under it): it runs to its end, and no further call is made.
    const post = async (path: string, body: unknown): Promise<Response> => {
      if (request.exchange.closed) throw new LeaseError('client closed request', 499)
      const res = await fetch(assignment.url + path, {
        method: 'POST',
        headers: { 'content-type': 'application/json', 'x-request-id': request.exchange.requestId },
        body: JSON.stringify(body),
        // A redirect is never followed (it could point anywhere): it is this upstream's failure.
        redirect: 'manual',
        signal: AbortSignal.any([lost, AbortSignal.timeout(proxy.config.upstreamHeadersTimeoutMs)])
      })
      if (res.status >= 300 && res.status < 400) {
        await res.body?.cancel()
        request.exchange.upstreamFailed(assignment.name, 'failed')
        throw new GatewayError(502, `upstream '${assignment.name}' answered with a redirect, which the gateway does not follow`)
      }
      return res
    }
    try {
      return await work({ assignment, signal, post })
    } catch (error) {
      if (error instanceof GatewayError || error instanceof LeaseError) throw error
      if (unreachable(error) && !request.exchange.closed) {
        leases.unreachable(assignment, error)
        continue
      }
      if (!request.exchange.closed && !lost.aborted) request.exchange.upstreamFailed(assignment.name, timedOut(error) ? 'timeout' : 'failed')
      if (timedOut(error)) throw new GatewayError(504, `upstream '${assignment.name}' sent no answer within ${proxy.config.upstreamHeadersTimeoutMs} ms`)
      if (lost.aborted) throw lost.reason
      proxy.fastify.log.warn({ err: error, assignment: assignment.name }, 'upstream failed')
      throw new GatewayError(502, `upstream '${assignment.name}' failed`)
    } finally {
      release()
    }
  }
}

async function readAll (stream: Readable): Promise<Buffer> {
  const chunks: Buffer[] = []
  for await (const chunk of stream) chunks.push(chunk as Buffer)
  return Buffer.concat(chunks)
}

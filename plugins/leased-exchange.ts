import type { Readable } from 'node:stream'
import fp from 'fastify-plugin'
import type { FastifyInstance, FastifyReply, FastifyRequest } from 'fastify'
import type { CandidateLeases, HeldCandidate, LeaseTarget } from '../services/leases/candidate-leases.js'
import { GatewayError } from '../services/http/errors.js'
import { clientResponseHeaders } from '../services/http/http-headers.js'
import type { Assignment } from '../services/fleet/inventory.js'
import { LeaseError, lostSignal } from '../services/leases/lease-manager.js'
import { frameAnswer, renameModel } from '../services/http/stream-framing.js'
import { withModel } from '../services/http/ollama-normalizer.js'
import type { AnswerMeter } from '../services/usage/usage-capture.js'
import { bodyTooLarge, refusedBody, timedOut, unreachable } from '../services/http/upstream-failure.js'
import { fingerprints } from '../services/scheduling/prefix-fingerprint.js'

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

/** The upstream a `withLease` work runs against. */
export interface LeasedUpstream {
  assignment: Assignment
  /** The model leased (an alias's target, or a fallback): the one a body sent upstream names. */
  model: string
  /** Aborts when the client leaves or the lease is lost: stop the work. */
  signal: AbortSignal
  /** POST a JSON body to `path` on the leased upstream (each call bounded by UPSTREAM_HEADERS_TIMEOUT_MS). */
  post: (path: string, body: unknown) => Promise<Response>
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
  }
}

/** A leased exchange: take a lease among the model's candidates, use it, free it when the exchange ends. */
export default fp(async function leasedExchange (fastify) {
  fastify.decorate('forwardLeased', async function (request: FastifyRequest, reply: FastifyReply, target: LeasedForward) {
    return await forwardLeased(fastify, request, reply, target)
  })
  fastify.decorate('withLease', async function <T> (request: FastifyRequest, reply: FastifyReply, target: LeaseTarget, work: (upstream: LeasedUpstream) => Promise<T>): Promise<T> {
    return await withLease(fastify, request, reply, target, work)
  })
}, { name: 'leased-exchange', dependencies: ['config', 'errors', 'exchange', 'candidate-leases', 'upstream-poller', 'upstream-proxy'], fastify: '5.x' })

/** Lease a GPU server for the model, forward the body to it, stream the answer back. */
async function forwardLeased (fastify: FastifyInstance, request: FastifyRequest, reply: FastifyReply, target: LeasedForward): Promise<FastifyReply> {
  // Scheduler v3: the prompt's fingerprints, taken from the parsed body when the route forgot it
  if (target.kind === 'llm' && target.prompt === undefined && target.body != null && fingerprints(target.path)) {
    // (each route passes an object of its own: completed in place, a copy per request cost more)
    target.prompt = request.promptFingerprint
  }
  const leases = fastify.candidateLeases(request, reply, target)

  const forward = async (): Promise<FastifyReply> => {
    const held = await leases.next()
    if (held == null) return reply.sendError(502, leases.exhausted())
    return sendOnLease(fastify, request, reply, target, held, leases, forward)
  }

  return await forward()
}

/**
 * Forward the body on a held lease and pass the answer on; the lease is released when the
 * upstream's answer has ended (services/http/stream-framing.ts), or when it fails (then an upstream
 * unreachable before it saw the request is sat out and `next` tries the next candidate).
 */
function sendOnLease (fastify: FastifyInstance, request: FastifyRequest, reply: FastifyReply, target: LeasedForward, { assignment, model, alias, lease, release: releaseLease }: HeldCandidate,
  leases: CandidateLeases, next: () => Promise<FastifyReply>): FastifyReply {
  const config = fastify.maestroConfig
  // The request's usage is recorded once its lease is released (its GPU-seconds end there).
  const release = (): void => {
    releaseLease()
    request.usage?.released()
  }
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
    if (!answered) setTimeout(release, config.upstreamHeadersTimeoutMs + 5000).unref()
  })
  // A client gone mid-answer destroys the upstream's stream, but the upstream goes on computing
  // until it notices (Ollama's runner: at its next token): its GPUs stay leased a little longer.
  let complete = false
  let graced = false
  const releaseAnswered = (): void => {
    if (complete || !request.exchange.closed) return release()
    if (graced) return
    graced = true
    setTimeout(release, config.upstreamCancelGraceMs).unref()
  }
  // An alias's target or a fallback: the body names the model whose server it goes to (CONTRACT 17).
  const body = target.body != null && model !== target.model ? withModel(target.body, model) : target.body
  const upstream = fastify.upstreamRequestOptions(request, assignment)
  return reply.from(assignment.url + target.path, {
    body,
    contentType: target.body != null ? 'application/json' : undefined,
    queryString: upstream.queryString,
    rewriteRequestHeaders: upstream.rewriteRequestHeaders,
    rewriteHeaders: (headers) => {
      // From here, the client leaving ends the upstream answer too (its stream is destroyed).
      answered = true
      request.exchange.onClose(releaseAnswered)
      const answerHeaders = clientResponseHeaders(headers)
      // An alias's answer is renamed on its way (its length changes): sent chunked.
      if (alias !== undefined) delete answerHeaders['content-length']
      return answerHeaders
    },
    onResponse: (_request, reply, raw) => {
      const res = raw as unknown as { statusCode: number, headers: Record<string, unknown>, stream: Readable }
      const usage = request.usage
      const meter = usage?.answer(target.path, String(res.headers['content-type'] ?? ''), res.statusCode)
      // the answer's end, when the client is sent the upstream's stream itself (not renamed)
      let onAnswerEnd: (() => void) | undefined
      res.stream.once('end', () => {
        complete = true
        usage?.ended()
        onAnswerEnd?.()
      })
      res.stream.once('error', () => {
        // a client that left destroys the upstream's stream too: that is not the upstream's failure
        if (!request.exchange.closed) usage?.upstreamBrokeOff()
        request.exchange.upstreamFailed(assignment.name, 'mid-stream')
      })
      request.exchange.trace?.upstreamResponse(res.statusCode, res.stream)
      // The model answered on that server: it is loaded there now (the scheduler's warm preference).
      if (target.kind === 'llm' && res.statusCode === 200) fastify.upstreams.noteServed(assignment, model)
      const framed = frameAnswer(res.stream, res.headers, releaseAnswered, target.streamError)
      // The answer's `model` is the alias the client asked for (a fallback's answer names the fallback).
      const answer = alias !== undefined ? renameModel(framed, { from: model, to: alias }) : framed
      if (meter !== undefined) meterAnswer(answer, meter)
      // Once the client has been sent the whole answer (the meter has read its last line), scheduler
      // v3 learns the server's rates and remembers where the prompt's prefixes now are.
      if (target.kind === 'llm' && res.statusCode === 200 && meter !== undefined) {
        const learn = (): void => {
          if (!complete) return
          const counts = meter.counts(true, res.statusCode)
          const timings = meter.timings()
          fastify.scheduling.answered({
            assignment,
            model,
            timings: { promptTokens: counts.promptTokens, cachedTokens: counts.cachedPromptTokens, promptEvalMs: timings.promptEvalMs, loadMs: timings.loadMs }
          })
          // Fair share by tokens (CONTRACT 16.4): the client is charged what the server counted, not
          // the estimate. An answer that states no prompt count (an OpenAI stream without usage) keeps it.
          const prompt = counts.promptTokens ?? 0
          if (prompt > 0) void fastify.leases.correctCharge(lease, prompt + (counts.outputTokens ?? 0))
        }
        // (one 'end' listener where the answer is the upstream's stream: each costs on every request)
        if (answer === res.stream) onAnswerEnd = learn
        else answer.once('end', learn)
      }
      reply.send(answer)
    },
    onError: (reply, { error }) => {
      // An upstream that never saw the request (or never a whole body) frees its GPUs at once; one
      // that had it (no headers in time, broken off) computes on until it notices the cut
      // connection, as after a client left.
      const refused = refusedBody(error, request.body)
      if (unreachable(error) || bodyTooLarge(error) || refused != null) release()
      else setTimeout(release, config.upstreamCancelGraceMs).unref()
      if (bodyTooLarge(error)) return reply.sendError(413, 'request body is too large')
      if (refused != null) return reply.header('connection', 'close').sendError(refused.statusCode, refused.message)
      if (unreachable(error) && target.body != null && !reply.sent && !request.exchange.closed) {
        leases.unreachable(assignment, error)
        next().catch((err) => reply.send(err))
        return
      }
      if (!request.exchange.closed) request.exchange.upstreamFailed(assignment.name, timedOut(error) ? 'timeout' : 'failed')
      if (timedOut(error)) return reply.sendError(504, `upstream '${assignment.name}' sent no headers within ${config.upstreamHeadersTimeoutMs} ms`)
      // The error's own text (it may name ip:port) goes to the log only.
      fastify.log.warn({ err: error, assignment: assignment.name }, 'upstream failed')
      reply.sendError(502, `upstream '${assignment.name}' failed`)
    }
  })
}


/**
 * What the client is sent passes through the usage meter: a chunk is seen as it is written on, so
 * a client that leaves is counted for what it was served. Added once the reply's pipe has started
 * the stream (a 'data' listener added earlier would start the flow and lose the data).
 */
function meterAnswer (answer: Readable, meter: AnswerMeter): void {
  answer.once('resume', () => answer.prependListener('data', (chunk: Buffer) => meter.chunk(chunk)))
}

/** Lease a GPU server for the model and run `work` against it; released when `work` settles. */
async function withLease<T> (fastify: FastifyInstance, request: FastifyRequest, reply: FastifyReply, target: LeaseTarget, work: (upstream: LeasedUpstream) => Promise<T>): Promise<T> {
  const config = fastify.maestroConfig
  const leases = fastify.candidateLeases(request, reply, target)
  for (;;) {
    const held = await leases.next()
    if (held == null) throw new GatewayError(502, leases.exhausted())
    const { assignment, model, lease, release } = held
    const lost = lostSignal(lease)
    const signal = AbortSignal.any([request.exchange.signal, lost])
    // A call under way is not aborted when the client leaves (the upstream would work on, on GPUs
    // released under it): it runs to its end, and no further call is made.
    const post = async (path: string, body: unknown): Promise<Response> => {
      if (request.exchange.closed) throw new LeaseError('client closed request', 499)
      const res = await fetch(assignment.url + path, {
        method: 'POST',
        headers: { 'content-type': 'application/json', 'x-request-id': request.exchange.requestId, ...request.exchange.trace?.upstreamRequest(assignment, request.exchange.model) },
        body: JSON.stringify(body),
        // A redirect is never followed (it could point anywhere): it is this upstream's failure.
        redirect: 'manual',
        signal: AbortSignal.any([lost, AbortSignal.timeout(config.upstreamHeadersTimeoutMs)])
      })
      if (res.status >= 300 && res.status < 400) {
        await res.body?.cancel()
        request.exchange.upstreamFailed(assignment.name, 'failed')
        throw new GatewayError(502, `upstream '${assignment.name}' answered with a redirect, which the gateway does not follow`)
      }
      return res
    }
    try {
      return await work({ assignment, model, signal, post })
    } catch (error) {
      if (error instanceof GatewayError || error instanceof LeaseError) throw error
      if (unreachable(error) && !request.exchange.closed) {
        leases.unreachable(assignment, error)
        continue
      }
      if (!request.exchange.closed && !lost.aborted) request.exchange.upstreamFailed(assignment.name, timedOut(error) ? 'timeout' : 'failed')
      if (timedOut(error)) throw new GatewayError(504, `upstream '${assignment.name}' sent no answer within ${config.upstreamHeadersTimeoutMs} ms`)
      if (lost.aborted) throw lost.reason
      fastify.log.warn({ err: error, assignment: assignment.name }, 'upstream failed')
      throw new GatewayError(502, `upstream '${assignment.name}' failed`)
    } finally {
      release()
      request.usage?.released()
    }
  }
}

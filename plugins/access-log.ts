import { performance } from 'node:perf_hooks'
import fp from 'fastify-plugin'
import type { FastifyReply, FastifyRequest } from 'fastify'
import { exchangeStatus, type Exchange } from '../services/http/exchange.js'

declare module 'fastify' {
  interface FastifyContextConfig {
    /** Level of the route's line per request; `info` when unset. Probes (health, metrics) say `debug`. */
    accessLogLevel?: 'info' | 'debug'
  }
}

const MODEL_CHARS = 200

const round = (ms: number): number => Math.round(ms * 10) / 10

/** The model a request named, when its body is a JSON object saying so. */
function requestedModel (request: FastifyRequest): string | undefined {
  const body = request.body as { model?: unknown } | undefined
  const model = body != null && typeof body === 'object' ? body.model : undefined
  return typeof model === 'string' ? model.slice(0, MODEL_CHARS) : undefined
}

/**
 * One log line per finished request, with what happened on the way: queueing, the upstream that
 * served it, its GPUs, and the time each part took. The standalone server turns Fastify's own two
 * lines per request off; a host app embedding the gateway keeps whatever it chose.
 */
export default fp(async function accessLog (fastify) {
  const line = (request: FastifyRequest, reply: FastifyReply, startedAt: number, bytesBefore: number): void => {
    const exchange = request.exchange as Exchange | null
    const upstream = exchange?.upstream
    const status = exchangeStatus(reply.statusCode, reply.raw.headersSent)
    const bytes = (request.raw.socket?.bytesWritten ?? bytesBefore) - bytesBefore
    const fields = {
      requestId: exchange?.requestId,
      method: request.method,
      url: request.url,
      route: request.routeOptions.url,
      status,
      // headers went out but the response did not end: the client left or the upstream broke off
      aborted: reply.raw.headersSent && !reply.raw.writableFinished ? true : undefined,
      model: exchange?.model?.slice(0, MODEL_CHARS) ?? requestedModel(request),
      // the key's name (or the address without keys), never a secret
      client: request.client?.name,
      assignment: upstream?.assignment,
      gpus: upstream?.gpuIds.join(','),
      queueMs: upstream != null ? round(upstream.queuedMs) : undefined,
      upstreamMs: upstream != null ? round((upstream.endedAt ?? performance.now()) - upstream.startedAt) : undefined,
      upstreamFailures: exchange != null && exchange.upstreamFailures.length > 0 ? exchange.upstreamFailures : undefined,
      ms: round(performance.now() - startedAt),
      bytes
    }
    // Clients' requests for a model (the operator's own calls — admin API, reservations — are not).
    if (fields.model != null && request.routeOptions.config?.auth !== 'admin' && request.routeOptions.config?.auth !== 'lease') {
      fastify.recentRequests.add({
        at: Date.now(),
        route: fields.route,
        model: fields.model,
        // set by the clients plugin when the request came with an API key
        client: (request as { client?: { name?: string } }).client?.name,
        status,
        queueMs: fields.queueMs,
        upstreamMs: fields.upstreamMs,
        assignment: fields.assignment
      })
    }
    if (status >= 500) request.log.warn(fields, 'request finished')
    else if (request.routeOptions.config?.accessLogLevel === 'debug') request.log.debug(fields, 'request finished')
    else request.log.info(fields, 'request finished')
  }

  fastify.addHook('onRequest', (request, reply, done) => {
    // Bytes written on this connection so far: keep-alive connections carry one exchange at a time.
    const bytesBefore = request.raw.socket?.bytesWritten ?? 0
    const startedAt = performance.now()
    request.exchange.onClose(() => line(request, reply, startedAt, bytesBefore))
    done()
  })
}, { name: 'access-log', dependencies: ['exchange', 'recent-requests'], fastify: '5.x' })

import { performance } from 'node:perf_hooks'
import fp from 'fastify-plugin'
import type { FastifyRequest } from 'fastify'
import { exchangeStatus } from '../services/http/exchange.js'
import { gatewayVersion } from '../services/config/package-root.js'
import type { TracedUsage } from '../services/tracing/request-trace.js'

/** The counts the usage meter read from the answer (plugins/usage.ts), for the request's span. */
function usageOf (request: FastifyRequest): TracedUsage | undefined {
  const used = request.usage?.used()
  if (used == null) return undefined
  return { promptTokens: used.promptTokens, cachedPromptTokens: used.cachedPromptTokens, outputTokens: used.outputTokens }
}

/**
 * Request traces over OpenTelemetry (CONTRACT 17), on with OTEL_EXPORTER_OTLP_ENDPOINT. Off, this
 * plugin adds nothing: no hook, no SDK loaded; the request path pays one null check where it tells
 * the exchange's trace (`exchange.trace?.…`). On, a span per request starts at onRequest (the
 * client's `traceparent` continued) and ends when the exchange ends; its children come from the
 * marks the exchange is given (services/tracing/).
 */
export default fp(async function tracing (fastify) {
  const settings = fastify.maestroConfig.tracing
  if (settings == null) return
  const { createRequestTracer } = await import('../services/tracing/otel-request-tracer.js')
  const tracer = createRequestTracer(settings, gatewayVersion)
  // Routes are named without the prefix a host app mounted the gateway under.
  const prefix = fastify.prefix

  fastify.addHook('onRequest', (request, reply, done) => {
    // Probes (health, metrics, the event feed) are not traced.
    if (request.routeOptions.config?.accessLogLevel === 'debug') return done()
    const route = request.routeOptions.url
    const query = request.url.indexOf('?')
    const exchange = request.exchange
    const trace = tracer.start({
      method: request.method,
      route: route?.startsWith(prefix) === true ? route.slice(prefix.length) || '/' : route,
      path: query >= 0 ? request.url.slice(0, query) : request.url,
      scheme: request.protocol,
      headers: request.headers,
      startTime: performance.now()
    })
    exchange.trace = trace
    exchange.onClose(() => trace.end({
      status: exchangeStatus(reply.statusCode, reply.raw.headersSent),
      model: exchange.model,
      usage: usageOf(request)
    }))
    done()
  })

  // Runs as the gateway closes: what is still buffered is exported.
  fastify.addHook('onClose', async () => {
    await tracer.shutdown().catch((err: unknown) => fastify.log.warn({ err }, 'spans not exported at shutdown'))
  })
}, { name: 'tracing', dependencies: ['config', 'exchange', 'usage'], fastify: '5.x' })

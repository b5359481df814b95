import type { FastifyPluginAsync } from 'fastify'

/**
 * Prometheus scrapes this: the gateway's metrics and the process's, in the text format. Open like
 * the health checks (API keys guard the proxied routes); scrapes log at debug level.
 */
const metricsRoutes: FastifyPluginAsync = async (fastify) => {
  fastify.get('/metrics', { config: { auth: 'open', accessLogLevel: 'debug' } }, async (_request, reply) => {
    return reply.type(fastify.metrics.contentType).send(await fastify.metrics.render())
  })
}

export default metricsRoutes

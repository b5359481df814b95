import type { FastifyPluginAsync } from 'fastify'

/** Prometheus scrapes this: the gateway's metrics and the process's, in the text format. */
const metricsRoutes: FastifyPluginAsync = async (fastify) => {
  fastify.get('/metrics', { config: { accessLogLevel: 'debug' } }, async (_request, reply) => {
    return reply.type(fastify.metrics.contentType).send(await fastify.metrics.render())
  })
}

export default metricsRoutes

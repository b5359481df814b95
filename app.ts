import type { FastifyPluginAsync } from 'fastify'
import accessLog from './plugins/access-log.js'
import apiKeys from './plugins/api-keys.js'
import auth from './plugins/auth.js'
import bodyMemory from './plugins/body-memory.js'
import candidateLeases from './plugins/candidate-leases.js'
import clients from './plugins/clients.js'
import config, { type ConfigOptions } from './plugins/config.js'
import docs from './plugins/docs.js'
import errors from './plugins/errors.js'
import exchange from './plugins/exchange.js'
import fleetEvents from './plugins/fleet-events.js'
import gpuLease from './plugins/gpu-lease.js'
import gpuTimeline from './plugins/gpu-timeline.js'
import inventory from './plugins/inventory.js'
import leasedExchange from './plugins/leased-exchange.js'
import mariadb from './plugins/mariadb.js'
import metrics from './plugins/metrics.js'
import ollamaNormalizer from './plugins/ollama-normalizer.js'
import origins from './plugins/origins.js'
import recentRequests from './plugins/recent-requests.js'
import redis from './plugins/redis.js'
import requestBody from './plugins/request-body.js'
import scheduling from './plugins/scheduling.js'
import tracing from './plugins/tracing.js'
import upstreamPoller from './plugins/upstream-poller.js'
import upstreamProxy from './plugins/upstream-proxy.js'
import usage from './plugins/usage.js'
import warmModels from './plugins/warm-models.js'
import adminRoutes from './routes/admin/index.js'
import anthropicRoutes from './routes/anthropic/index.js'
import audioRoutes from './routes/audio/index.js'
import diffusionRoutes from './routes/diffusion/index.js'
import gpuRoutes from './routes/gpu/index.js'
import healthRoutes from './routes/health/index.js'
import metricsRoutes from './routes/metrics/index.js'
import ollamaRoutes from './routes/ollama/index.js'
import openaiRoutes from './routes/openai/index.js'
import uiRoutes from './routes/ui/index.js'

export type MaestroOptions = ConfigOptions & {
  /** The clock of usage counts and token budgets (ms since the epoch); default Date.now. Tests set it. */
  now?: () => number
}

/**
 * The whole gateway as one Fastify plugin. Register it in any Fastify app, with or without a
 * prefix; options mirror the environment variables (`{ REDIS_URL: ..., QUEUE_MAX: 10 }`) and win
 * over them. It is deliberately not wrapped in fastify-plugin: its decorators, hooks and parsers
 * stay inside, so a host app's own `redis`, `mysql` and error handling are left alone.
 */
const maestro: FastifyPluginAsync<MaestroOptions> = async (fastify, { now, ...opts }) => {
  await fastify.register(config, opts)
  await fastify.register(errors)
  await fastify.register(exchange)
  await fastify.register(mariadb)
  await fastify.register(redis)
  await fastify.register(gpuLease)
  await fastify.register(inventory)
  await fastify.register(recentRequests)
  await fastify.register(accessLog)
  await fastify.register(metrics)
  await fastify.register(usage, { now })
  await fastify.register(tracing)
  await fastify.register(gpuTimeline)
  await fastify.register(fleetEvents)
  await fastify.register(ollamaNormalizer)
  await fastify.register(requestBody)
  await fastify.register(bodyMemory)
  await fastify.register(upstreamPoller)
  await fastify.register(upstreamProxy)
  await fastify.register(scheduling)
  await fastify.register(candidateLeases)
  await fastify.register(leasedExchange)
  await fastify.register(apiKeys)
  await fastify.register(auth)
  await fastify.register(origins)
  await fastify.register(clients)
  await fastify.register(warmModels)
  await fastify.register(docs)

  await fastify.register(ollamaRoutes)
  await fastify.register(openaiRoutes)
  await fastify.register(anthropicRoutes)
  await fastify.register(audioRoutes)
  await fastify.register(diffusionRoutes)
  await fastify.register(healthRoutes)
  await fastify.register(metricsRoutes)
  await fastify.register(gpuRoutes)
  await fastify.register(adminRoutes)
  await fastify.register(uiRoutes)
}

export default maestro
export { maestro }

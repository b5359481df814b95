import type { FastifyPluginAsync } from 'fastify'
import aliasRoutes from './aliases.js'
import apiKeyRoutes from './api-keys.js'
import fleetRoutes from './fleet.js'
import gpuTimelineRoutes from './gpu-timeline.js'
import schedulingRoutes from './scheduling.js'
import usageRoutes from './usage.js'

/**
 * The admin API (CONTRACT 13): the fleet (fleet.ts) and the API keys (api-keys.ts). Every route
 * is `auth: 'admin'` (plugins/auth.ts): the admin token when ADMIN_TOKEN is set; without it,
 * clients on the loopback interface only, and nobody while API keys are in use (a key holder may
 * reserve GPUs, not rewrite the fleet or mint keys: 403 until ADMIN_TOKEN is set).
 */
const adminRoutes: FastifyPluginAsync = async (fastify) => {
  await fastify.register(fleetRoutes)
  await fastify.register(apiKeyRoutes)
  await fastify.register(usageRoutes)
  await fastify.register(aliasRoutes)
  await fastify.register(gpuTimelineRoutes)
  await fastify.register(schedulingRoutes)
}

export default adminRoutes

import type { FastifyPluginAsync } from 'fastify'
import apiKeyRoutes from './api-keys.js'
import fleetRoutes from './fleet.js'

/**
 * The admin API (CONTRACT 13): the fleet (fleet.ts) and the API keys (api-keys.ts). Every route
 * is `auth: 'admin'` (plugins/auth.ts): the admin token when ADMIN_TOKEN is set, anyone when
 * neither ADMIN_TOKEN nor any key is configured. With keys but no ADMIN_TOKEN, the `admin` level
 * would let any key holder through — enough to reserve GPUs, not to rewrite the fleet or mint
 * keys: the admin API then refuses (403) until ADMIN_TOKEN is set.
 */
const adminRoutes: FastifyPluginAsync = async (fastify) => {
  const adminToken = fastify.maestroConfig.adminToken
  fastify.addHook('onRequest', async (_request, reply) => {
    if (adminToken == null && fastify.apiKeys.configured) {
      return reply.sendError(403, 'the admin API needs ADMIN_TOKEN to be set when API keys are in use')
    }
  })
  await fastify.register(fleetRoutes)
  await fastify.register(apiKeyRoutes)
}

export default adminRoutes

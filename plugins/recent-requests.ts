import fp from 'fastify-plugin'
import { MemoryRecentRequests, RedisRecentRequests, type RecentRequests } from '../services/clients/recent-requests.js'

declare module 'fastify' {
  interface FastifyInstance {
    /** The last requests of the whole fleet (the access log adds each one that named a model). */
    recentRequests: RecentRequests
  }
}

export default fp(async function recentRequests (fastify) {
  const client = fastify.leaseRedis?.client
  const record: RecentRequests = client != null
    ? new RedisRecentRequests({
      client,
      key: fastify.maestroConfig.redisKeyPrefix + 'recent-requests',
      onError: (err) => fastify.log.debug({ err }, 'recent requests not recorded')
    })
    : new MemoryRecentRequests()
  fastify.decorate('recentRequests', record)
  // Runs before the Redis connections close (onClose hooks run in reverse registration order).
  fastify.addHook('onClose', async () => { await record.close() })
}, { name: 'recent-requests', dependencies: ['config', 'redis'], fastify: '5.x' })

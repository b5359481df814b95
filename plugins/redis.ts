import fp from 'fastify-plugin'
import fastifyRedis from '@fastify/redis'
import type { Redis } from 'ioredis'

export interface LeaseRedis {
  /** Commands. Fails fast while disconnected: no request waits on an unreachable store. */
  client: Redis
  /** Pub/sub (a subscribed connection can run nothing else). */
  subscriber: Redis
}

declare module 'fastify' {
  interface FastifyInstance {
    /** The shared lease store's connections, or null in embedded mode (leases in memory). */
    leaseRedis: LeaseRedis | null
  }
}

export default fp(async function redis (fastify) {
  const url = fastify.maestroConfig.redisUrl
  if (url == null) {
    fastify.decorate('leaseRedis', null)
    return
  }
  // A namespace (`redis.maestro`) so a host app's own `redis` decorator stays its own.
  await fastify.register(fastifyRedis, {
    namespace: 'maestro',
    url,
    closeClient: true,
    enableOfflineQueue: false,
    maxRetriesPerRequest: 0,
    commandTimeout: 5000,
    retryStrategy: (times: number) => Math.min(times * 100, 1000)
  })
  const client = (fastify as any).redis.maestro as Redis
  const subscriber = client.duplicate({ enableOfflineQueue: true })
  subscriber.on('error', (err) => fastify.log.debug({ err }, 'redis subscriber error'))
  client.on('error', (err) => fastify.log.debug({ err }, 'redis error'))
  fastify.decorate('leaseRedis', { client, subscriber })
  fastify.addHook('onClose', async () => { subscriber.disconnect() })
}, { name: 'redis', dependencies: ['config'], fastify: '5.x' })

import fp from 'fastify-plugin'
import fastifyRedis from '@fastify/redis'
import { Redis } from 'ioredis'

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
  const client = new Redis(url, {
    enableOfflineQueue: false,
    maxRetriesPerRequest: 0,
    commandTimeout: 5000,
    retryStrategy: (times: number) => Math.min(times * 100, 1000)
  })
  client.on('error', (err) => fastify.log.debug({ err }, 'redis error'))
  // A namespace (`redis.maestro`) so a host app's own `redis` decorator stays its own. The plugin
  // waits for the connection at start; closing is ours (below).
  await fastify.register(fastifyRedis, { namespace: 'maestro', client, closeClient: false })
  const subscriber = client.duplicate({ enableOfflineQueue: true })
  subscriber.on('error', (err) => fastify.log.debug({ err }, 'redis subscriber error'))
  fastify.decorate('leaseRedis', { client, subscriber })
  fastify.addHook('onClose', async () => {
    subscriber.disconnect()
    // QUIT needs a live connection (there is no offline queue): while Redis is away, and the
    // client is reconnecting, it would fail the whole close; just drop the connection then.
    if (client.status === 'ready') await client.quit().catch(() => client.disconnect())
    else client.disconnect()
  })
}, { name: 'redis', dependencies: ['config'], fastify: '5.x' })

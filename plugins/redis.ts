import fp from 'fastify-plugin'
import fastifyRedis from '@fastify/redis'
import { Cluster, Redis } from 'ioredis'
import { redisConnections, RedisWatch, type RedisConnection, type TopologyState } from '../services/config/redis-connections.js'

export interface LeaseRedis {
  /** Commands. Fails fast while disconnected: no request waits on an unreachable store. */
  client: RedisConnection
  /** Pub/sub (a subscribed connection can run nothing else); same options as `client`. */
  subscriber: RedisConnection
  /** Which Redis this is, and whether it is failing over right now (for `/health`). */
  topology: () => TopologyState
}

declare module 'fastify' {
  interface FastifyInstance {
    /** The shared lease store's connections, or null when leases live in process memory. */
    leaseRedis: LeaseRedis | null
  }
}

export default fp(async function redis (fastify) {
  const config = fastify.maestroConfig
  if (config.redis == null) {
    fastify.decorate('leaseRedis', null)
    return
  }
  const { client, subscriber } = redisConnections(config.redis)
  // On a Cluster every key of the fleet shares one hash tag, so this one key names the slot that matters.
  const watch = new RedisWatch(config.redis, client, config.leaseTtlMs, fastify.log, config.redisKeyPrefix + 'epoch')
  client.on('error', (err) => fastify.log.debug({ err }, 'redis error'))
  subscriber.on('error', (err) => fastify.log.debug({ err }, 'redis subscriber error'))
  if (client instanceof Cluster) {
    // @fastify/redis takes a single-server client only; a Cluster is waited for here.
    await new Promise<void>((resolve, reject) => {
      client.once('ready', resolve)
      client.once('close', () => reject(new Error('Redis Cluster: no node answered')))
    })
  } else {
    // A namespace (`redis.maestro`) so a host app's own `redis` decorator stays its own. The
    // plugin waits for the connection at start; closing is ours (below).
    await fastify.register(fastifyRedis, { namespace: 'maestro', client: client as Redis, closeClient: false })
  }
  fastify.decorate('leaseRedis', { client, subscriber, topology: () => watch.state() })
  fastify.addHook('onClose', async () => {
    watch.close()
    subscriber.disconnect()
    // QUIT needs a live connection (there is no offline queue): while Redis is away, and the
    // client is reconnecting, it would fail the whole close; just drop the connection then.
    if (client.status === 'ready') await client.quit().catch(() => {})
    // Also after QUIT: only disconnect() closes the connections ioredis keeps to the sentinels.
    client.disconnect()
  })
}, { name: 'redis', dependencies: ['config'], fastify: '5.x' })

import fp from 'fastify-plugin'
import { LeaseManager } from '../services/leases/lease-manager.js'
import type { LeaseStore } from '../services/leases/lease-store.js'
import { MemoryLeaseStore } from '../services/leases/memory-lease-store.js'
import { RedisLeaseStore } from '../services/leases/redis-lease-store.js'

declare module 'fastify' {
  interface FastifyInstance {
    /** Acquires, renews and releases GPU leases; the store is Redis, or memory in embedded mode. */
    leases: LeaseManager
  }
}

export default fp(async function gpuLease (fastify) {
  const config = fastify.maestroConfig
  const settings = {
    ttlMs: config.leaseTtlMs,
    queueMax: config.queueMax,
    queueMaxTotal: config.queueMaxTotal,
    starvationMs: config.starvationMs,
    priorityAgingMs: config.priorityAgingMs,
    // late binding's fairness bound (CONTRACT 16.2): nobody passed over for longer
    passOverMs: config.affinityMaxWaitMs
  }
  let store: LeaseStore
  if (fastify.leaseRedis != null) {
    store = new RedisLeaseStore({ ...settings, ...fastify.leaseRedis, prefix: config.redisKeyPrefix })
  } else {
    store = new MemoryLeaseStore(settings)
    fastify.log.info('no Redis (REDIS_URL, REDIS_SENTINELS, REDIS_CLUSTER_NODES) or LEASE_STORE=memory: leases are kept in process memory (correct for a single replica only)')
  }
  const leases = new LeaseManager(store, {
    ttlMs: config.leaseTtlMs,
    queueTimeoutMs: config.queueTimeoutMs,
    log: fastify.log
  })
  await leases.start()
  fastify.decorate('leases', leases)
  // Closing starts with a drain: Fastify answers new requests 503 while the listener stays open,
  // waiters are sent away, and in-flight requests finish before the server stops listening.
  fastify.addHook('preClose', async () => { await leases.drain() })
  // Runs before the Redis connections close (onClose hooks run in reverse registration order).
  fastify.addHook('onClose', async () => { await leases.close() })
}, { name: 'gpu-lease', dependencies: ['config', 'redis'], fastify: '5.x' })

import { join } from 'node:path'
import fp from 'fastify-plugin'
import { InventoryCache, type SharedSnapshot } from '../services/inventory-cache.js'
import { loadInventoryFromDatabase, loadInventoryFromFile } from '../services/inventory.js'
import { packageRoot } from '../services/package-root.js'

declare module 'fastify' {
  interface FastifyInstance {
    /** The fleet: which assignments serve which model on which GPUs. */
    inventory: InventoryCache
  }
}

export default fp(async function inventory (fastify) {
  const config = fastify.maestroConfig
  const db = fastify.inventoryDb
  const redis = fastify.leaseRedis?.client
  const key = config.redisKeyPrefix + 'inventory'
  const shared: SharedSnapshot | undefined = db != null && redis != null
    ? {
        get: async () => await redis.get(key),
        set: async (json, ttlMs) => { await redis.set(key, json, 'PX', Math.ceil(ttlMs)) },
        del: async () => await redis.del(key)
      }
    : undefined
  const file = config.inventoryFile ?? join(packageRoot, 'inventory.default.json')
  const cache = new InventoryCache({
    source: db != null ? 'mariadb' : 'file',
    load: db != null ? async () => await loadInventoryFromDatabase(db.query) : async () => await loadInventoryFromFile(file),
    shared,
    refreshMs: config.inventoryRefreshMs,
    log: fastify.log
  })
  await cache.start()
  if (db == null) fastify.log.info({ file }, 'no MARIADB_URL: inventory read from a file')
  // Another replica cleared the cache: read the source again.
  fastify.leases.onInventoryChanged = () => { void cache.reload() }
  fastify.decorate('inventory', cache)
  fastify.addHook('onClose', async () => { cache.close() })
}, { name: 'inventory', dependencies: ['config', 'mariadb', 'redis', 'gpu-lease'], fastify: '5.x' })

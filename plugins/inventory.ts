import { join } from 'node:path'
import fp from 'fastify-plugin'
import { InventoryCache, type SharedSnapshot } from '../services/fleet/inventory-cache.js'
import { loadInventoryFromDatabase, loadInventoryFromFile } from '../services/fleet/inventory.js'
import { packageRoot } from '../services/config/package-root.js'
import { databaseFleetStore, fileFleetStore, type FleetStore } from '../services/fleet/fleet-store.js'

declare module 'fastify' {
  interface FastifyInstance {
    /** The fleet: which assignments serve which model on which GPUs. */
    inventory: InventoryCache
    /** Where the admin API's changes go: MariaDB, or the inventory file in embedded mode. */
    fleetStore: FleetStore
    /** After a change: this replica reads the inventory again now, every other replica when told. */
    inventoryChanged: () => Promise<void>
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
  // The package's own default file is not the operator's to rewrite.
  fastify.decorate('fleetStore', db != null ? databaseFleetStore(db) : fileFleetStore(file, { writable: config.inventoryFile != null }))
  fastify.decorate('inventoryChanged', async () => {
    await cache.clearShared()
    await cache.reload()
    await fastify.leases.store.publishInventoryChanged()
  })
  fastify.addHook('onClose', async () => { cache.close() })
}, { name: 'inventory', dependencies: ['config', 'mariadb', 'redis', 'gpu-lease'], fastify: '5.x' })

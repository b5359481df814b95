import fp from 'fastify-plugin'
import { ApiKeyStore, fileBackend, tableBackend, type KeyBackend } from '../services/clients/api-keys.js'

declare module 'fastify' {
  interface FastifyInstance {
    /** The API keys (API_KEYS, the `api_keys` table or the inventory file), in memory for the request path. */
    apiKeys: ApiKeyStore
  }
}

/**
 * The key store, read at start and then with the inventory: every INVENTORY_REFRESH_MS, and at
 * once when the cluster is told the inventory changed (`DELETE /gpu/cache`, an admin write).
 */
export default fp(async function apiKeys (fastify) {
  const config = fastify.maestroConfig
  const db = fastify.inventoryDb
  // Embedded mode keeps keys in the operator's own inventory file, never in the packaged default.
  const backend: KeyBackend | undefined = db != null
    ? tableBackend(db.query)
    : config.inventoryFile != null ? fileBackend(config.inventoryFile) : undefined
  const store = new ApiKeyStore({
    envKeys: config.apiKeys,
    backend,
    refreshMs: config.inventoryRefreshMs,
    changed: async () => await fastify.leases.store.publishInventoryChanged(),
    log: fastify.log
  })
  await store.start()
  const inventoryChanged = fastify.leases.onInventoryChanged
  fastify.leases.onInventoryChanged = () => {
    inventoryChanged?.()
    void store.reload()
  }
  fastify.decorate('apiKeys', store)
  fastify.addHook('onClose', async () => { store.close() })
}, { name: 'api-keys', dependencies: ['config', 'mariadb', 'gpu-lease', 'inventory'], fastify: '5.x' })

import fp from 'fastify-plugin'
import fastifyMysql from '@fastify/mysql'
import type { Pool } from 'mysql2/promise'
import type { Query } from '../services/inventory.js'

export interface InventoryDb {
  query: Query
  /** Cheap round trip for /health. */
  ping: () => Promise<void>
}

declare module 'fastify' {
  interface FastifyInstance {
    /** The inventory database, or null in embedded mode (inventory from a file). */
    inventoryDb: InventoryDb | null
  }
}

export default fp(async function mariadb (fastify) {
  const url = fastify.maestroConfig.mariadbUrl
  if (url == null) {
    fastify.decorate('inventoryDb', null)
    return
  }
  // A named instance (`mysql.maestro`) so a host app's own `mysql` decorator stays its own.
  await fastify.register(fastifyMysql, {
    promise: true,
    name: 'maestro',
    uri: url,
    connectionLimit: 4,
    connectTimeout: 3000,
    enableKeepAlive: true
  } as any)
  const pool = (fastify as any).mysql.maestro.pool as Pool
  fastify.decorate('inventoryDb', {
    query: async (sql: string, params?: unknown[]) => {
      const [rows] = await pool.query(sql, params)
      return rows as any[]
    },
    ping: async () => { await pool.query('SELECT 1') }
  })
}, { name: 'mariadb', dependencies: ['config'], fastify: '5.x' })

import fp from 'fastify-plugin'
import fastifyMysql from '@fastify/mysql'
import type { Pool } from 'mysql2/promise'
import type { Query } from '../services/fleet/inventory.js'

/**
 * A query with no answer for this long fails. A MariaDB that stops answering (host gone, network
 * cut) leaves no error on the socket for minutes; without a bound the inventory refresh and the
 * health ping would wait on it, and every later query on that connection would queue behind it.
 */
const QUERY_TIMEOUT_MS = 5000

async function timedQuery (pool: Pool, sql: string, params?: unknown[]): Promise<unknown> {
  const connection = await pool.getConnection()
  try {
    const [rows] = await connection.query({ sql, timeout: QUERY_TIMEOUT_MS }, params)
    connection.release()
    return rows
  } catch (err) {
    // A timed-out connection still waits for the lost answer: drop it rather than reuse it.
    if ((err as { code?: string }).code === 'PROTOCOL_SEQUENCE_TIMEOUT') connection.destroy()
    else connection.release()
    throw err
  }
}

async function inTransaction<T> (pool: Pool, work: (query: Query) => Promise<T>): Promise<T> {
  const connection = await pool.getConnection()
  let broken = false
  const query: Query = async (sql, params) => {
    try {
      const [rows] = await connection.query({ sql, timeout: QUERY_TIMEOUT_MS }, params)
      return rows as any[]
    } catch (err) {
      if ((err as { code?: string }).code === 'PROTOCOL_SEQUENCE_TIMEOUT') broken = true
      throw err
    }
  }
  try {
    await connection.beginTransaction()
    const result = await work(query)
    await connection.commit()
    return result
  } catch (err) {
    if (!broken) await connection.rollback().catch(() => { broken = true })
    throw err
  } finally {
    // A connection that lost an answer (or its rollback) is dropped: the server ends its transaction.
    if (broken) connection.destroy()
    else connection.release()
  }
}

export interface InventoryDb {
  query: Query
  /** `work` on one connection between BEGIN and COMMIT, rolled back when it throws (admin writes). */
  transaction: <T>(work: (query: Query) => Promise<T>) => Promise<T>
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
    query: async (sql: string, params?: unknown[]) => await timedQuery(pool, sql, params) as any[],
    ping: async () => { await timedQuery(pool, 'SELECT 1') },
    transaction: async (work) => await inTransaction(pool, work)
  })
}, { name: 'mariadb', dependencies: ['config'], fastify: '5.x' })

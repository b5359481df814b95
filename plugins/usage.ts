import fp from 'fastify-plugin'
import { MemoryUsageLedger, USAGE_RETENTION_MS, type UsageLedger } from '../services/usage/usage-ledger.js'
import { usageMetrics } from '../services/usage/usage-metrics.js'
import { RedisUsageLedger } from '../services/usage/redis-usage-ledger.js'
import { memoryRollupLock, redisRollupLock, UsageRollup } from '../services/usage/usage-rollup.js'

declare module 'fastify' {
  interface FastifyInstance {
    /**
     * The usage ledger (CONTRACT 17): `record` counts a finished request at once (in Redis, shared
     * by the replicas, or in memory); `GET /admin/usage` reads it with MariaDB's hourly rows.
     */
    usage: UsageLedger
  }
}

/** A roll-up's turn lasts at most this long (it takes milliseconds; a dead holder's turn passes on). */
const ROLLUP_LOCK_MS = 60_000

export default fp(async function usage (fastify) {
  const config = fastify.maestroConfig
  const db = fastify.inventoryDb
  const redis = fastify.leaseRedis?.client
  const options = {
    observe: usageMetrics(fastify.metrics.registry),
    onError: (err: unknown) => fastify.log.warn({ err }, 'usage not recorded')
  }
  // Without MariaDB nothing rolls the counts up: the buffer keeps a month.
  const retentionMs = db == null ? USAGE_RETENTION_MS : undefined
  const ledger: UsageLedger = redis != null
    ? new RedisUsageLedger({ ...options, client: redis, prefix: config.redisKeyPrefix, retentionMs })
    : new MemoryUsageLedger({ ...options, retentionMs })
  fastify.decorate('usage', ledger)
  if (db == null) return

  const rollup = new UsageRollup({
    ledger,
    db,
    lock: redis != null ? redisRollupLock(redis, config.redisKeyPrefix + 'usage:rollup-lock', ROLLUP_LOCK_MS) : memoryRollupLock(),
    log: fastify.log
  })
  let running: Promise<unknown> | undefined
  const runOnce = (): void => {
    if (running != null) return
    running = rollup.run()
      .catch((err: unknown) => fastify.log.warn({ err }, 'usage roll-up failed (the counts stay in the buffer for the next one)'))
      .finally(() => { running = undefined })
  }
  let timer: NodeJS.Timeout | undefined
  // Started once the app is ready.
  fastify.addHook('onReady', async () => {
    timer = setInterval(runOnce, config.usageRollupMs)
    timer.unref()
  })
  // Runs before the Redis and MariaDB connections close (onClose hooks run in reverse registration
  // order). Counts in process memory are rolled up one last time; in Redis they wait for any replica.
  fastify.addHook('onClose', async () => {
    clearInterval(timer)
    await running
    if (redis != null) return
    runOnce()
    await running
  })
}, { name: 'usage', dependencies: ['config', 'mariadb', 'redis', 'metrics'], fastify: '5.x' })

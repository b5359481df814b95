import fp from 'fastify-plugin'
import type { FastifyReply, FastifyRequest } from 'fastify'
import { exchangeStatus } from '../services/http/exchange.js'
import { RequestUsage } from '../services/usage/usage-capture.js'
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
    /** The clock usage is counted by, and token budgets checked against (the `now` option; tests set it). */
    usageClock: () => number
    /**
     * Count this admitted request (CONTRACT 17): `request.usage` gathers what its answer used and
     * records it once the exchange has ended and its lease is released. Once per request.
     */
    beginUsage: (request: FastifyRequest, reply: FastifyReply, model: string) => RequestUsage
  }
  interface FastifyRequest {
    /** What this request used, once admitted (null before, and for requests that take no model). */
    usage: RequestUsage | null
  }
}

export interface UsageOptions {
  /** The clock of usage and budgets (ms since the epoch); default Date.now. */
  now?: () => number
}

/** A roll-up's turn lasts at most this long (it takes milliseconds; a dead holder's turn passes on). */
const ROLLUP_LOCK_MS = 60_000

export default fp<UsageOptions>(async function usage (fastify, opts) {
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
  const now = opts.now ?? Date.now
  fastify.decorate('usageClock', now)

  fastify.decorateRequest('usage', null)
  fastify.decorate('beginUsage', function (request: FastifyRequest, reply: FastifyReply, model: string): RequestUsage {
    const client = request.client
    const exchange = request.exchange
    const usage = new RequestUsage(
      { client: client.name, model, budgetKey: client.id.startsWith('key:') ? client.name : undefined },
      () => {
        const up = exchange.upstream
        const status = exchangeStatus(reply.statusCode, reply.raw.headersSent)
        return {
          assignment: up?.assignment ?? '',
          holding: up != null && up.endedAt == null,
          // GPU-seconds: the lease's time held, once per GPU it holds
          gpuSeconds: up?.endedAt != null ? (up.endedAt - up.startedAt) / 1000 * up.gpuIds.length : 0,
          // 499 (the client left before any answer) is neither the gateway's error nor the upstream's
          failed: status >= 400 && status !== 499
        }
      },
      (entry) => {
        entry.at = now()
        void ledger.record(entry)
      }
    )
    request.usage = usage
    exchange.onClose(() => usage.close())
    return usage
  })
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
    await ledger.close?.()
    if (redis != null) return
    runOnce()
    await running
  })
}, { name: 'usage', dependencies: ['config', 'mariadb', 'redis', 'metrics', 'exchange'], fastify: '5.x' })

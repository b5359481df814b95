/**
 * The lease engine alone, in this process against the benchmark's Redis: handoffs per second as
 * the number of candidates, waiters and queues grows (CONTRACT 12.4: they must not matter).
 */
import { Redis } from 'ioredis'
import { LeaseManager, type Lease } from '../services/leases/lease-manager.js'
import type { Candidate } from '../services/leases/lease-store.js'
import { RedisLeaseStore } from '../services/leases/redis-lease-store.js'
import { mean, sleep } from './load.js'
import { fmt } from './report.js'
import type { BenchContext } from './scenario.js'

/** (d), (e)'s goal: the bigger case keeps at least this share of the grants/s */
const COST_RATIO = 0.8

export interface EngineCase {
  /** candidates of the model; all but `free` of them are held busy for the whole run */
  candidates: number
  free: number
  /** clients, each waiting for a lease, releasing it at once, asking again */
  clients: number
  /** queues (models) the clients are spread over, all with the same candidates */
  queues: number
}

/** Grants per second over `windowMs`, each client in a closed loop (acquire, release, again). */
export async function handoffRate (redisUrl: string, prefix: string, c: EngineCase, windowMs: number): Promise<number> {
  const client = new Redis(redisUrl, { enableOfflineQueue: false, maxRetriesPerRequest: 0, lazyConnect: true })
  const subscriber = new Redis(redisUrl, { lazyConnect: true })
  await client.connect()
  await subscriber.connect()
  const opts = { ttlMs: 30_000, queueMax: 100_000, queueMaxTotal: 100_000, starvationMs: 3_600_000 }
  const m = new LeaseManager(new RedisLeaseStore({ ...opts, client, subscriber, prefix }), { ttlMs: opts.ttlMs, queueTimeoutMs: 600_000, pollMs: 1000 })
  await m.start()
  try {
    // free candidates last: every attempt must get past the busy ones to find them
    const list: Candidate[] = Array.from({ length: c.candidates }, (_, i) => ({ assignmentId: `e${i}`, gpuIds: [`e${i}`] }))
    const busy: Lease[] = []
    for (const cand of list.slice(0, c.candidates - c.free)) {
      busy.push(await m.acquire({ queue: 'engine-busy', candidates: [cand], info: { model: 'busy', kind: 'llm', purpose: 'proxy' } }))
    }
    let grants = 0
    let measuring = false
    let stopping = false
    const loop = async (i: number): Promise<void> => {
      const q = i % c.queues
      const req = { queue: `engine-q${q}`, candidates: list, info: { model: `m${q}`, kind: 'llm', purpose: 'proxy' as const } }
      while (!stopping) {
        const l = await m.acquire(req)
        if (measuring) grants++
        await m.release(l)
      }
    }
    const loops = Array.from({ length: c.clients }, async (_, i) => await loop(i))
    await sleep(Math.min(2000, windowMs / 2)) // every client queued, the scripts warm
    measuring = true
    const started = performance.now()
    await sleep(windowMs)
    measuring = false
    const rate = grants / ((performance.now() - started) / 1000)
    stopping = true
    await Promise.all(loops)
    for (const l of busy) await m.release(l)
    return rate
  } finally {
    await m.close()
    client.disconnect()
    subscriber.disconnect()
  }
}

/**
 * (d), (e): the same engine case twice, one thing changed, alternated so that the machine's load
 * falls on both alike; one line, its summary and its goal (≥ 0.8×: the change must not matter).
 */
export async function compareEngineCases (ctx: BenchContext, name: string, what: string, base: EngineCase, big: EngineCase): Promise<void> {
  const { lines, goals, summary } = ctx.report
  const rates: { base: number[], big: number[] } = { base: [], big: [] }
  for (let r = 0; r < 2; r++) {
    rates.base.push(await handoffRate(ctx.redisUrl, `${ctx.prefix}${name}${r}a:`, base, ctx.windowMs / 2))
    rates.big.push(await handoffRate(ctx.redisUrl, `${ctx.prefix}${name}${r}b:`, big, ctx.windowMs / 2))
  }
  const b = mean(rates.base)
  const g = mean(rates.big)
  summary[name] = { what, base, big, baseGrantsPerSecond: Math.round(b), bigGrantsPerSecond: Math.round(g), ratio: +fmt(g / b) }
  lines.push(`(${name}) ${what}: ${Math.round(b)} vs ${Math.round(g)} grants/s (${fmt(g / b)}×)`)
  goals.push({ goal: `${what} (${name})`, target: `≥ ${COST_RATIO}×`, reached: `${fmt(g / b)}×`, pass: g / b >= COST_RATIO })
}

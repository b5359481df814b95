/**
 * The lease engine alone, in this process against the benchmark's Redis: handoffs per second as
 * the number of candidates, waiters and queues grows (CONTRACT 12.4: they must not matter).
 */
import { Redis } from 'ioredis'
import { LeaseManager, type Lease } from '../services/leases/lease-manager.js'
import type { Candidate } from '../services/leases/lease-store.js'
import { RedisLeaseStore } from '../services/leases/redis-lease-store.js'
import { sleep } from './load.js'

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

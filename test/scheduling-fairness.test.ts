// Fair share by tokens (CONTRACT 16.4), in both lease stores: the start-time fair queuing tag of a
// client's request advances by the request's estimated tokens, so two backlogged clients are
// served about the same number of tokens, whatever their prompts' lengths; a client back from
// idle starts at the line's clock (it banked nothing); a grant made at once is charged too, and a
// charge is corrected with the server's counts (correctCharge), never putting a client's request before
// its own earlier ones. Order is read from the grants themselves.
import t, { type Test } from 'tap'
import { Redis } from 'ioredis'
import { LeaseManager, type Lease } from '../services/leases/lease-manager.js'
import type { Candidate, LeaseStore } from '../services/leases/lease-store.js'
import { MemoryLeaseStore } from '../services/leases/memory-lease-store.js'
import { RedisLeaseStore } from '../services/leases/redis-lease-store.js'
import { REDIS_URL, testPrefix } from './helpers/redis.js'

const info = { model: 'm', kind: 'llm', purpose: 'proxy' as const }
const candidates: Candidate[] = [{ assignmentId: 'a1', gpuIds: ['g1'] }]
const settings = { ttlMs: 5000, queueMax: 1000, starvationMs: 600_000 }

async function storeOf (t: Test, kind: 'memory' | 'redis'): Promise<LeaseManager> {
  let store: LeaseStore
  if (kind === 'memory') {
    store = new MemoryLeaseStore(settings)
  } else {
    const options = { enableOfflineQueue: false, maxRetriesPerRequest: 0, lazyConnect: true }
    const client = new Redis(REDIS_URL, options)
    const subscriber = new Redis(REDIS_URL, { ...options, enableOfflineQueue: true })
    await client.connect()
    await subscriber.connect()
    // as on a Redis that has kept the fleet's data for longer than a ttl (no start-up pause)
    const prefix = testPrefix(t)
    await client.set(prefix + 'epoch', `test@${Date.now() - 60_000}`)
    t.teardown(() => { client.disconnect(); subscriber.disconnect() })
    store = new RedisLeaseStore({ client, subscriber, prefix, ...settings })
  }
  const m = new LeaseManager(store, { ttlMs: settings.ttlMs, queueTimeoutMs: 60_000, pollMs: 200 })
  await m.start()
  t.teardown(async () => { await m.close() })
  return m
}

for (const kind of ['memory', 'redis'] as const) {
  t.test(`${kind}: two backlogged clients, one with 10x longer prompts, are served tokens within 1.5x; a client back from idle is not served first`, async (t) => {
    const m = await storeOf(t, kind)
    const queue = 'q'
    const blocker = await m.acquire({ queue, candidates, info })
    const served: Array<{ client: string, cost: number }> = []
    const waiters: Array<Promise<void>> = []
    const ask = (client: string, cost: number): void => {
      waiters.push(m.acquire({ queue, candidates, info, client: { id: client, priority: 'normal' }, cost }).then(async (lease: Lease) => {
        served.push({ client, cost })
        // a third client arrives once 20 have been served (while the others are backlogged), with one long request
        if (served.length === 20) ask('late', 1000)
        await m.release(lease)
      }))
    }
    // short: 50 requests of 100 tokens; long: 10 of 1000 (as many tokens in all), interleaved
    for (let i = 0; i < 50; i++) {
      ask('short', 100)
      if (i % 5 === 0) ask('long', 1000)
    }
    // every one queued before the first is served
    while ((await m.store.status(['g1'])).queues[queue] !== 60) await new Promise((resolve) => setTimeout(resolve, 5))
    await m.release(blocker)
    while (served.length < 61) await Promise.all(waiters)
    const servedBefore = 20
    // while both were backlogged: up to the last grant of the first to run out
    const lastShort = served.map((s) => s.client).lastIndexOf('short')
    const lastLong = served.map((s) => s.client).lastIndexOf('long')
    const window = served.slice(0, Math.min(lastShort, lastLong) + 1)
    const tokens = (c: string): number => window.filter((s) => s.client === c).reduce((n, s) => n + s.cost, 0)
    t.comment(`${kind}: served while both backlogged: short ${tokens('short')} tokens, long ${tokens('long')} tokens`)
    const ratio = Math.max(tokens('short'), tokens('long')) / Math.max(1, Math.min(tokens('short'), tokens('long')))
    t.ok(ratio <= 1.5, `token shares within 1.5x (ratio ${ratio.toFixed(2)})`)
    const late = served.findIndex((s) => s.client === 'late')
    t.ok(late > servedBefore, `the client back from idle waited its turn (granted ${late - servedBefore} grants after it arrived)`)
    t.equal(served.length, 61, 'everyone served')
  })
}

for (const kind of ['memory', 'redis'] as const) {
  t.test(`${kind}: a grant made at once is charged too, and a correction moves the client's counter by what the server counted`, async (t) => {
    const m = await storeOf(t, kind)
    const queue = 'q'
    const ask = (client: string, cost: number): Promise<Lease> => m.acquire({ queue, candidates, info, client: { id: client, priority: 'normal' }, cost })
    /** Both queue behind a blocker, in this order, with these costs; the order they are served in. */
    const order = async (...asks: Array<[string, number]>): Promise<string[]> => {
      const blocker = await m.acquire({ queue, candidates, info })
      const served: string[] = []
      const waiters = asks.map(async ([c, cost]) => { const lease = await ask(c, cost); served.push(c); await m.release(lease) })
      while ((await m.store.status(['g1'])).queues[queue] !== asks.length) await new Promise((resolve) => setTimeout(resolve, 5))
      await m.release(blocker)
      await Promise.all(waiters)
      return served
    }
    // 'big' is served at once (nobody waits): charged its 5,000 tokens all the same. Uncharged, its
    // next request (50 tokens) would go before small's (100).
    await m.release(await ask('big', 5000))
    t.same(await order(['big', 50], ['small', 100]), ['small', 'big'], 'the client served at once goes after one that was not, though it queued first and asks less')
    // both served at once, charged 5,000 each; the server counted 10 tokens for 'big' only.
    // Uncorrected, big's next request (100 tokens) would go after small's (50).
    const lease = await ask('big', 5000)
    await m.release(lease)
    await m.correctCharge(lease, 10)
    await m.release(await ask('small', 5000))
    t.same(await order(['small', 50], ['big', 100]), ['big', 'small'], 'the corrected client goes first, though it queued second and asks more')
  })

  t.test(`${kind}: a correction that credits a client does not put its next request before its own earlier ones still in line`, async (t) => {
    const m = await storeOf(t, kind)
    const queue = 'q'
    const served: string[] = []
    const ask = (id: string, cost: number): Promise<Lease> => m.acquire({ queue, candidates, info, client: { id: 'one', priority: 'normal' }, cost }).then((lease) => { served.push(id); return lease })
    /** Waits in line; released as soon as it is served. */
    const waitAndGo = async (id: string, cost: number): Promise<void> => { await m.release(await ask(id, cost)) }
    const queued = async (n: number): Promise<void> => {
      while ((await m.store.status(['g1'])).queues[queue] !== n) await new Promise((resolve) => setTimeout(resolve, 5))
    }
    // the client's first request runs; two more wait behind it, charged their estimates
    const first = await ask('first', 5000)
    const waiting = [waitAndGo('second', 300), waitAndGo('third', 300)]
    await queued(2)
    // the server counted far fewer tokens than the first was charged: the counter goes back by 4,990,
    // below the tags of the two waiting
    await m.correctCharge(first, 10)
    waiting.push(waitAndGo('fourth', 300))
    await queued(3)
    await m.release(first)
    await Promise.all(waiting)
    t.same(served, ['first', 'second', 'third', 'fourth'], 'served in the order they arrived')
  })
}

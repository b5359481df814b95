// The lease rules, run against both stores: Redis (replicas) and memory (embedded mode).
import t, { type Test } from 'tap'
import { setTimeout as sleep } from 'node:timers/promises'
import { getEventListeners } from 'node:events'
import { LeaseError, LeaseManager, requesterOf, type Lease } from '../services/leases/lease-manager.js'
import type { Candidate, LeaseInfo, LeaseStore, Place, StoreStatus } from '../services/leases/lease-store.js'
import { queueName } from '../services/leases/lease-store.js'
import { MemoryLeaseStore } from '../services/leases/memory-lease-store.js'
import { RedisLeaseStore } from '../services/leases/redis-lease-store.js'
import { redisClients, testPrefix } from './helpers/redis.js'

interface Settings {
  ttlMs?: number
  queueMax?: number
  starvationMs?: number
  queueTimeoutMs?: number
  queueMaxTotal?: number
  priorityAgingMs?: number
}
type Cluster = (settings?: Settings) => Promise<{ replica: () => Promise<LeaseManager> }>

const info = (model: string): LeaseInfo => ({ model, kind: 'llm', purpose: 'proxy' })
const reservation = (model: string): LeaseInfo => ({ model, kind: 'llm', purpose: 'reservation' })
const cand = (assignmentId: string, ...gpuIds: string[]): Candidate => ({ assignmentId, gpuIds })
const slots = (capacity: number, assignmentId: string, ...gpuIds: string[]): Candidate => ({ assignmentId, gpuIds, capacity })
const defaults = { ttlMs: 3000, queueMax: 100, starvationMs: 10_000, queueTimeoutMs: 10_000, queueMaxTotal: 10_000, priorityAgingMs: 30_000 }

/** The leases on each GPU, flattened (a GPU may run several slots of one assignment). */
async function holders (store: LeaseStore, gpuIds: string[]): Promise<string[]> {
  const per = await store.tokensOf(gpuIds) as unknown[]
  return per.flatMap((x) => Array.isArray(x) ? x : x == null ? [] : [x as string]).sort()
}

/** Polls until `check` holds (true) or `ms` pass (false). */
async function until (check: () => Promise<boolean>, ms = 2000): Promise<boolean> {
  const end = performance.now() + ms
  while (!await check()) {
    if (performance.now() > end) return false
    await sleep(5)
  }
  return true
}

/** Stop a replica's timers: no renewal, no heartbeat, no fallback poll (a frozen process). */
function freeze (m: LeaseManager): void {
  clearInterval((m as any).sweepTimer)
  clearInterval((m as any).renewTimer)
}

function manager (t: Test, store: LeaseStore, s: Required<Settings>): LeaseManager {
  const m = new LeaseManager(store, { ttlMs: s.ttlMs, queueTimeoutMs: s.queueTimeoutMs, pollMs: 200 })
  t.teardown(() => m.close())
  return m
}

const clusters: Record<string, (t: Test) => Cluster> = {
  memory: (t) => async (settings = {}) => {
    const s = { ...defaults, ...settings }
    const store = new MemoryLeaseStore(s)
    let started: LeaseManager | undefined
    return {
      // One process, one manager: the memory store delivers grants to the manager that started it
      // (embedded mode has no replicas), so every "replica" is that one manager; the tests that
      // are about several replicas say so and run with one here.
      replica: async () => {
        if (started != null) return started
        started = manager(t, store, s)
        await started.start()
        return started
      }
    }
  },
  redis: (t) => async (settings = {}) => {
    const s = { ...defaults, ...settings }
    const prefix = testPrefix(t)
    return {
      replica: async () => {
        const { client, subscriber } = await redisClients(t)
        const m = manager(t, new RedisLeaseStore({ ...s, client, subscriber, prefix }), s)
        await m.start()
        return m
      }
    }
  }
}

for (const [name, make] of Object.entries(clusters)) {
  t.test(`${name} store`, async (t) => {
    t.test('grants all GPUs of the first free candidate, in preference order', async (t) => {
      const m = await (await make(t)()).replica()
      const a = await m.acquire({ queue: 'q', candidates: [cand('1', '1', '2'), cand('2', '3')], info: info('a') })
      t.same([a.assignmentId, a.gpuIds], ['1', ['1', '2']])
      const b = await m.acquire({ queue: 'q', candidates: [cand('1', '1', '2'), cand('2', '3')], info: info('a') })
      t.same([b.assignmentId, b.gpuIds], ['2', ['3']])
      const status = await m.store.status(['1', '2', '3'])
      t.same(status.gpus.map((g) => g.gpuId).sort(), ['1', '2', '3'])
      await m.release(a)
      await m.release(b)
      t.same((await m.store.status(['1', '2', '3'])).gpus, [])
    })

    t.test('release is exactly once and never frees a lease granted since', async (t) => {
      const m = await (await make(t)()).replica()
      const a = await m.acquire({ queue: 'q', candidates: [cand('1', '1')], info: info('a') })
      await m.release(a)
      const b = await m.acquire({ queue: 'q', candidates: [cand('1', '1')], info: info('a') })
      t.not(a.token, b.token)
      await m.release(a) // late duplicate
      t.equal(await m.store.release(a.token), false, 'a stale token frees nothing')
      t.same((await m.store.tokensOf(['1'])), [[b.token]], 'the new lease is intact')
      await m.release(b)
    })

    t.test('a multi-GPU candidate is taken whole or not at all', async (t) => {
      const m = await (await make(t)()).replica()
      const one = await m.acquire({ queue: 'a', candidates: [cand('1', '1')], info: info('a') })
      const pending = m.acquire({ queue: 'b', candidates: [cand('2', '1', '2')], info: info('b') })
      await sleep(50)
      t.same(await m.store.tokensOf(['1', '2']), [[one.token], []], 'GPU 2 is not taken alone')
      await m.release(one)
      const both = await pending
      t.same(both.gpuIds, ['1', '2'])
      await m.release(both)
    })

    t.test('waiters of a model are served in arrival order, woken at once by a release', async (t) => {
      const m = await (await make(t)()).replica()
      const first = await m.acquire({ queue: 'q', candidates: [cand('1', '1')], info: info('a') })
      const order: number[] = []
      const grantedAt: number[] = []
      const waits = Array.from({ length: 8 }, async (_, i) => {
        await sleep(i * 5)
        const l = await m.acquire({ queue: 'q', candidates: [cand('1', '1')], info: info('a') })
        order.push(i)
        grantedAt.push(performance.now())
        await sleep(2)
        await m.release(l)
      })
      await sleep(80)
      const releasedAt = performance.now()
      await m.release(first)
      await Promise.all(waits)
      t.same(order, [0, 1, 2, 3, 4, 5, 6, 7])
      // Relative to the 200 ms poll, not an absolute total: each handover woken by the poll would
      // take 0..200 ms (median ~100); by notification a few ms, and up to tens on 2 busy cores.
      const handovers = [grantedAt[0] - releasedAt, ...grantedAt.slice(1).map((at, i) => at - grantedAt[i])].sort((a, b) => a - b)
      const median = (handovers[3] + handovers[4]) / 2
      t.ok(median < 200 / 4, `woken by notification, not by the 200 ms poll (median handover ${median.toFixed(1)} ms)`)
    })

    t.test('a full queue and a timed-out wait answer 503 with Retry-After', async (t) => {
      const m = await (await make(t)({ queueMax: 2, queueTimeoutMs: 300 })).replica()
      const held = await m.acquire({ queue: 'q', candidates: [cand('1', '1')], info: info('a') })
      const w1 = m.acquire({ queue: 'q', candidates: [cand('1', '1')], info: info('a') })
      const w2 = m.acquire({ queue: 'q', candidates: [cand('1', '1')], info: info('a') })
      const full = await m.acquire({ queue: 'q', candidates: [cand('1', '1')], info: info('a') }).catch((e) => e)
      t.ok(full instanceof LeaseError)
      t.equal(full.statusCode, 503)
      t.ok(full.retryAfterSeconds > 0)
      for (const w of [w1, w2]) {
        const err = await w.catch((e) => e)
        t.equal(err.statusCode, 503)
        t.match(err.message, /timed out/)
      }
      t.same((await m.store.status(['1'])).queues, {}, 'timed-out waiters left the queue')
      await m.release(held)
    })

    t.test('a waiter whose client leaves is never served', async (t) => {
      const m = await (await make(t)()).replica()
      const held = await m.acquire({ queue: 'q', candidates: [cand('1', '1')], info: info('a') })
      const ac = new AbortController()
      const gone = m.acquire({ queue: 'q', candidates: [cand('1', '1')], info: info('a'), requester: requesterOf(ac.signal) })
      await sleep(20)
      const next = m.acquire({ queue: 'q', candidates: [cand('1', '1')], info: info('a') })
      await sleep(20)
      ac.abort()
      t.equal((await gone.catch((e) => e)).statusCode, 499)
      await sleep(20)
      await m.release(held)
      const l = await next
      t.same(l.gpuIds, ['1'], 'the next waiter got the GPU')
      await m.release(l)
      t.same((await m.store.status(['1'])).gpus, [])
    })

    t.test('waiters served one after another leave no listener on a requester that lives on (a shutdown signal)', async (t) => {
      const m = await (await make(t)()).replica()
      const stopping = new AbortController()
      const requester = requesterOf(stopping.signal)
      let held = await m.acquire({ queue: 'q', candidates: [cand('1', '1')], info: info('a'), requester })
      for (let i = 0; i < 12; i++) {
        // each waits (the GPU is held), then gets it as the one before releases
        const next = m.acquire({ queue: 'q', candidates: [cand('1', '1')], info: info('a'), requester })
        await sleep(10)
        await m.release(held)
        held = await next
      }
      await m.release(held)
      t.equal(getEventListeners(stopping.signal, 'abort').length, 0, 'every waiter took its listener back once served')
    })

    t.test('a client that leaves while its first attempt is on its way leaves the queue at once', async (t) => {
      const m = await (await make(t)({ queueTimeoutMs: 5000 })).replica()
      const held = await m.acquire({ queue: 'q', candidates: [cand('1', '1')], info: info('a') })
      const ac = new AbortController()
      const started = performance.now()
      const gone = m.acquire({ queue: 'q', candidates: [cand('1', '1')], info: info('a'), requester: requesterOf(ac.signal) })
      ac.abort() // before the store has answered the first attempt
      t.equal((await gone.catch((e) => e)).statusCode, 499)
      t.ok(performance.now() - started < 1000, 'not after the queue timeout')
      await sleep(50)
      t.same((await m.store.status(['1'])).queues, {}, 'its place in the queue is gone')
      await m.release(held)
      t.same((await m.store.status(['1'])).gpus, [], 'and it was not granted the GPU')
    })

    t.test('a lease that is not renewed expires and waiters then proceed', async (t) => {
      const m = await (await make(t)({ ttlMs: 600 })).replica()
      // a reservation is renewed only by pings
      const r = await m.acquire({ queue: 'q', candidates: [cand('1', '1')], info: { ...info('a'), purpose: 'reservation' } })
      t.ok(await m.store.ping(r.token), 'ping renews a live reservation')
      const started = performance.now()
      const l = await m.acquire({ queue: 'q', candidates: [cand('1', '1')], info: info('a') })
      const waited = performance.now() - started
      t.ok(waited >= 400 && waited < 2000, `waited ${Math.round(waited)} ms for the expiry`)
      t.equal(await m.store.ping(r.token), undefined, 'the expired reservation cannot be pinged back')
      // a proxy lease is renewed while held
      await sleep(1000)
      t.same(await m.store.tokensOf(['1']), [[l.token]], 'held past its ttl by renewal')
      await m.release(l)
    })

    t.test('a multi-GPU request is not starved by a stream of single-GPU requests', async (t) => {
      const m = await (await make(t)({ starvationMs: 300 })).replica()
      let stop = false
      const singles = [['1'], ['2']].map(async ([gpu]) => {
        while (!stop) {
          const l = await m.acquire({ queue: `single-${gpu}`, candidates: [cand(`s${gpu}`, gpu)], info: info('s') })
          await sleep(30)
          await m.release(l)
        }
      })
      const overlap = [...Array(4)].map(async (_, i) => {
        // a second single-GPU model overlapping both, arriving all the time
        while (!stop) {
          const l = await m.acquire({ queue: 'small', candidates: [cand('x1', '1'), cand('x2', '2')], info: info('x') })
          await sleep(20 + i)
          await m.release(l)
        }
      })
      await sleep(100)
      const started = performance.now()
      const big = await m.acquire({ queue: 'big', candidates: [cand('b', '1', '2')], info: info('b') })
      const waited = performance.now() - started
      stop = true
      t.ok(waited < 300 + 500, `served after ${Math.round(waited)} ms (starvation threshold 300 ms)`)
      await m.release(big)
      await Promise.all([...singles, ...overlap])
      t.same((await m.store.status(['1', '2'])).gpus, [])
    })

    t.test('issue 14.1: release by GPU ids frees each reservation once, not one granted by that very release', async (t) => {
      const m = await (await make(t)()).replica()
      const r1 = await m.acquire({ queue: 'big', candidates: [cand('12', '1', '2')], info: reservation('big') })
      const r2p = m.acquire({ queue: 'small', candidates: [cand('2', '2')], info: reservation('small') })
      await sleep(50)
      await m.store.releaseGpus(['1', '2'])
      const r2 = await r2p
      await sleep(50)
      t.same(await holders(m.store, ['1', '2']), [r2.token], 'the reservation granted by the release is intact')
      t.ok(await m.store.ping(r2.token), 'and can be pinged')
      t.equal(await m.store.ping(r1.token), undefined, 'the released one is gone')
      await m.store.release(r2.token)
    })

    t.test('issue 14.5: renewing a partly lost multi-GPU lease re-creates nothing and frees what it still had', async (t) => {
      const cluster = await make(t)({ ttlMs: 400 })
      const frozen = await cluster.replica()
      // another replica takes GPU 2 (the memory store has one manager: the same, frozen one)
      const m = name === 'redis' ? await cluster.replica() : frozen
      const a = await frozen.acquire({ queue: 'pair', candidates: [cand('12', '1', '2')], info: info('pair') })
      freeze(frozen) // the holder stops renewing past the ttl
      await sleep(600)
      const b = await m.acquire({ queue: 'two', candidates: [cand('2', '2')], info: info('two') })
      const lost = await frozen.store.renew([{ ...a }])
      t.same(lost, [a.token], 'the renewal reports the lease lost')
      t.same(await holders(m.store, ['1']), [], 'GPU 1 is not re-created for a lease nobody uses')
      const started = performance.now()
      const c = await m.acquire({ queue: 'one', candidates: [cand('1', '1')], info: info('one') })
      t.ok(performance.now() - started < 200, 'GPU 1 is granted at once')
      await m.store.release(b.token)
      await m.store.release(c.token)
    })

    t.test('issue 14.6: a waiter with a free candidate does not wait behind one pinned to a busy server', async (t) => {
      const m = await (await make(t)()).replica()
      const busy = await m.acquire({ queue: 'q', candidates: [cand('1', '1')], info: info('a') })
      const pinned = m.acquire({ queue: 'q', candidates: [cand('1', '1')], info: info('a') })
      await sleep(30)
      const started = performance.now()
      const free = await Promise.race([
        m.acquire({ queue: 'q', candidates: [cand('1', '1'), cand('2', '2')], info: info('a') }),
        sleep(1000).then(() => undefined)
      ])
      t.ok(free != null, 'served without waiting')
      t.equal(free?.assignmentId, '2')
      t.ok(performance.now() - started < 300)
      if (free != null) await m.release(free)
      await m.release(busy)
      await m.release(await pinned)
    })

    t.test('issue 14.7: an attempt that ran after its call failed leaves no ghost in the queue', async (t) => {
      const m = await (await make(t)()).replica()
      const held = await m.acquire({ queue: 'q', candidates: [cand('1', '1')], info: info('a') })
      const real = m.store.attempt.bind(m.store)
      let failNext = true
      ;(m.store as any).attempt = async (input: any) => {
        const r = await real(input)
        if (failNext) { failNext = false; throw new Error('command timed out') } // ran, but the answer was lost
        return r
      }
      const err = await m.acquire({ queue: 'q', candidates: [cand('1', '1')], info: info('a') }).catch((e) => e)
      t.equal(err.statusCode, 503)
      await sleep(300)
      t.same((await m.store.status(['1'])).queues, {}, 'its place in the queue is gone')
      await m.release(held)
      await sleep(100)
      t.same(await holders(m.store, ['1']), [], 'and nobody got the GPU for it')
    })

    t.test('issue 14.7: a leave that fails during a drain is retried', async (t) => {
      const m = await (await make(t)()).replica()
      const held = await m.acquire({ queue: 'q', candidates: [cand('1', '1')], info: info('a') })
      const waiting = m.acquire({ queue: 'q', candidates: [cand('1', '1')], info: info('a') })
      await sleep(30)
      const real = m.store.leave.bind(m.store)
      let failures = 1
      ;(m.store as any).leave = async (q: string, member: string) => {
        if (failures-- > 0) throw new Error('connection lost')
        return await real(q, member)
      }
      const drained = m.drain()
      t.equal((await waiting.catch((e) => e)).statusCode, 503, 'the waiter is sent away')
      await sleep(600) // the 200 ms poll retries
      t.same((await m.store.status(['1'])).queues, {}, 'its place in the queue is gone')
      await m.release(held)
      await drained
      t.same(await holders(m.store, ['1']), [], 'the GPU went to nobody')
    })

    t.test('issue 14.8: an assignment moved to other GPUs does not run twice at once', async (t) => {
      const m = await (await make(t)()).replica()
      const before = await m.acquire({ queue: 'q', candidates: [cand('5', '1')], info: info('a') })
      // the inventory now has assignment 5 on GPU 2; a new request comes with the new list
      const after = m.acquire({ queue: 'q', candidates: [cand('5', '2')], info: info('a') })
      const early = await Promise.race([after.then(() => 'granted'), sleep(200).then(() => 'waiting')])
      t.equal(early, 'waiting', 'the server runs one request at a time')
      await m.release(before)
      const l = await after
      t.same(l.gpuIds, ['2'])
      await m.release(l)
    })

    t.test('issue 14.9: the status reports a bounded number of queues', async (t) => {
      const m = await (await make(t)({ queueTimeoutMs: 20_000 })).replica()
      const held = await m.acquire({ queue: 'q', candidates: [cand('1', '1')], info: info('a') })
      const waits = Array.from({ length: 260 }, async (_, i) => await m.acquire({ queue: `q${i}`, candidates: [cand('1', '1')], info: info(`m${i}`) }).catch((e) => e))
      await sleep(300)
      const n = Object.keys((await m.store.status(['1'])).queues).length
      t.ok(n > 0 && n <= 200, `${n} queues reported`)
      freeze(m)
      await m.close()
      await Promise.all(waits)
      void held
    })

    t.test('the status tells when the oldest live waiter of each queue arrived', async (t) => {
      const m = await (await make(t)({ queueTimeoutMs: 20_000 })).replica()
      const list = [cand('1', '1')]
      const status = async (): Promise<StoreStatus> => await m.store.status(['1'])
      const held = await m.acquire({ queue: 'q', candidates: list, info: info('a') })
      // Each waiter's arrival lies between the call and the status that first counts it.
      const arrivals: Array<[number, number]> = []
      const leaving = new AbortController()
      const waits: Array<Promise<Lease>> = []
      for (const signal of [undefined, leaving.signal, undefined]) {
        const before = Date.now()
        const wait = m.acquire({ queue: 'q', candidates: list, info: info('a'), requester: signal != null ? requesterOf(signal) : undefined })
        wait.catch(() => {}) // awaited below; should the test stop first, closing the manager rejects it
        waits.push(wait)
        const depth = waits.length
        t.ok(await until(async () => (await status()).queues.q === depth), `waiter ${depth} queued`)
        arrivals.push([before, Date.now()])
        await sleep(30)
      }
      const isArrival = (since: number | undefined, [from, to]: [number, number], what: string): void => {
        t.ok(since != null && since >= from - 2 && since <= to + 2, `${what}: ${since} within [${from}, ${to}] (±2 ms)`)
      }
      isArrival((await status()).queueSince.q, arrivals[0], 'the first waiter\'s arrival')

      await m.release(held)
      const first = await waits[0]
      isArrival((await status()).queueSince.q, arrivals[1], 'the first granted: the second one\'s')

      leaving.abort()
      t.equal((await waits[1].catch((e) => e)).statusCode, 499)
      t.ok(await until(async () => (await status()).queues.q === 1), 'the second one left')
      isArrival((await status()).queueSince.q, arrivals[2], 'the second gone: the third one\'s')

      await m.release(first)
      await m.release(await waits[2])
      const empty = await status()
      t.same([empty.queues, empty.queueSince], [{}, {}], 'an empty queue has no entry')
    })

    t.test('a waiter queued again at its old place keeps its arrival', async (t) => {
      const m = await (await make(t)({ queueTimeoutMs: 20_000 })).replica()
      const held = await m.acquire({ queue: 'q', candidates: [cand('1', '1')], info: info('a') })
      const input = { member: `${m.store.replicaId}|place-test`, queue: 'q', candidates: [cand('1', '1')], info: info('a') }
      const queued = await m.store.attempt(input)
      t.equal(queued.status, 'waiting')
      const arrived = (await m.store.status(['1'])).queueSince.q
      await m.store.leave('q', input.member)
      t.same((await m.store.status(['1'])).queueSince, {}, 'gone with its waiter')
      await sleep(30)
      const again = await m.store.attempt({ ...input, place: (queued as { place: Place }).place })
      t.equal(again.status, 'waiting')
      const kept = (await m.store.status(['1'])).queueSince.q
      t.ok(Math.abs(kept - arrived) <= 1, `arrival ${kept}, first ${arrived}`)
      await m.store.leave('q', input.member)
      await m.release(held)
    })

    t.test('12.1: a capacity-4 assignment runs 4 at once, and another assignment on its GPU only when it runs none', async (t) => {
      const m = await (await make(t)()).replica()
      const four = [slots(4, 'a', '1')]
      const other = [cand('b', '1')]
      let running = 0
      let most = 0
      let otherOverlap = 0
      let otherRunning = false
      const work = async (i: number): Promise<void> => {
        if (i === 5) {
          const l = await m.acquire({ queue: 'b', candidates: other, info: info('b') })
          otherRunning = true
          if (running > 0) otherOverlap++
          await sleep(20)
          otherRunning = false
          await m.release(l)
          return
        }
        const l = await m.acquire({ queue: 'a', candidates: four, info: info('a') })
        running++
        if (otherRunning) otherOverlap++
        most = Math.max(most, running)
        await sleep(30)
        running--
        await m.release(l)
      }
      await Promise.all(Array.from({ length: 16 }, async (_, i) => await work(i)))
      t.equal(most, 4, 'four at once, never more')
      t.equal(otherOverlap, 0, 'the other model never ran beside it')
      const status = await m.store.status(['1'])
      t.same(status.gpus, [], 'everything released')
    })

    t.test('12.1: the status shows slots in use and capacity; a reservation takes every slot', async (t) => {
      const m = await (await make(t)()).replica()
      const list = [slots(3, 'a', '1', '2')]
      const x = await m.acquire({ queue: 'a', candidates: list, info: info('a') })
      const y = await m.acquire({ queue: 'a', candidates: list, info: info('a') })
      const s = await m.store.status(['1', '2'])
      t.same(s.gpus.map((g) => [g.gpuId, g.slotsUsed, g.capacity]), [['1', 2, 3], ['2', 2, 3]])
      const r = m.acquire({ queue: 'a', candidates: list, info: reservation('a') })
      await sleep(50)
      const z = await m.acquire({ queue: 'a', candidates: list, info: info('a') })
      t.ok(z != null, 'a third request takes the last slot')
      await m.release(x)
      await m.release(y)
      const early = await Promise.race([r.then(() => 'granted'), sleep(100).then(() => 'waiting')])
      t.equal(early, 'waiting', 'the reservation waits for every slot')
      await m.release(z)
      const res = await r
      t.same((await m.store.status(['1'])).gpus.map((g) => g.slotsUsed), [3], 'it holds them all')
      t.ok(await m.store.release(res.token))
    })

    t.test('12.2: preferred candidates come first among the free ones, and are never waited for', async (t) => {
      const m = await (await make(t)()).replica()
      const list = [cand('1', '1'), cand('2', '2'), cand('3', '3')]
      const warm = await m.acquire({ queue: 'q', candidates: list, info: info('a'), preferred: ['3'] })
      t.equal(warm.assignmentId, '3')
      const started = performance.now()
      const cold = await m.acquire({ queue: 'q', candidates: list, info: info('a'), preferred: ['3'] })
      t.equal(cold.assignmentId, '1', 'the warm one is busy: the first free one, at once')
      t.ok(performance.now() - started < 200)
      await m.release(warm)
      await m.release(cold)
    })

    t.test('12.3: a client that floods a queue delays its own requests; each client keeps its order', async (t) => {
      const m = await (await make(t)({ queueTimeoutMs: 20_000 })).replica()
      const list = [cand('1', '1')]
      const held = await m.acquire({ queue: 'q', candidates: list, info: info('a') })
      const order: string[] = []
      const run = async (client: string, i: number): Promise<void> => {
        const l = await m.acquire({ queue: 'q', candidates: list, info: info('a'), client: { id: client, priority: 'normal' } })
        order.push(`${client}${i}`)
        await sleep(2)
        await m.release(l)
      }
      const a = Array.from({ length: 30 }, async (_, i) => { await sleep(i); await run('A', i) })
      await sleep(60)
      const b = [run('B', 0)]
      await sleep(30)
      await m.release(held)
      await Promise.all([...a, ...b])
      t.ok(order.indexOf('B0') <= 2, `B served ${order.indexOf('B0') + 1}th of 31`)
      t.same(order.filter((x) => x.startsWith('A')), Array.from({ length: 30 }, (_, i) => `A${i}`), "A's own order kept")
    })

    t.test('12.3: higher priority first; a low one ages through a stream of high ones', async (t) => {
      const m = await (await make(t)({ priorityAgingMs: 250, queueTimeoutMs: 20_000 })).replica()
      const list = [cand('1', '1')]
      const held = await m.acquire({ queue: 'q', candidates: list, info: info('a') })
      const order: string[] = []
      const normal = m.acquire({ queue: 'q', candidates: list, info: info('a'), client: { id: 'n', priority: 'normal' } })
        .then(async (l) => { order.push('normal'); await m.release(l) })
      await sleep(10)
      const high = m.acquire({ queue: 'q', candidates: list, info: info('a'), client: { id: 'h', priority: 'high' } })
        .then(async (l) => { order.push('high'); await m.release(l) })
      await sleep(10)
      await m.release(held)
      await Promise.all([normal, high])
      t.same(order, ['high', 'normal'], 'the high one overtook')

      // a stream of high requests, two at a time, each 20 ms on the GPU
      let stop = false
      let highs = 0
      const stream = [0, 1].map(async () => {
        while (!stop) {
          const l = await m.acquire({ queue: 'q', candidates: list, info: info('a'), client: { id: 'h', priority: 'high' } })
          highs++
          await sleep(20)
          await m.release(l)
        }
      })
      await sleep(50)
      const started = performance.now()
      const low = await m.acquire({ queue: 'q', candidates: list, info: info('a'), client: { id: 'l', priority: 'low' } })
      const waited = performance.now() - started
      stop = true
      await m.release(low)
      await Promise.all(stream)
      t.ok(waited >= 250 && waited < 2 * 250 + 600, `the low one was served after ${Math.round(waited)} ms (aging 250 ms a level), ${highs} high ones served`)
    })

    t.test('QUEUE_MAX_TOTAL bounds the waiters across every queue', async (t) => {
      const m = await (await make(t)({ queueMaxTotal: 3, queueTimeoutMs: 2000 })).replica()
      const held = await m.acquire({ queue: 'x', candidates: [cand('1', '1')], info: info('a') })
      const waits = ['p', 'q', 'r'].map(async (q) => await m.release(await m.acquire({ queue: q, candidates: [cand('1', '1')], info: info(q) })))
      await sleep(50)
      const err = await m.acquire({ queue: 's', candidates: [cand('1', '1')], info: info('s') }).catch((e) => e)
      t.ok(err instanceof LeaseError)
      t.equal(err.statusCode, 503)
      t.match(err.message, /too many requests/)
      await m.release(held)
      await Promise.all(waits)
    })

    const replicated = name === 'redis'
    t.test(replicated ? 'three replicas sharing the store never hand out one GPU twice' : '120 concurrent acquirers on the one manager never get one GPU twice', async (t) => {
      const cluster = await make(t)({ starvationMs: 200 })
      const replicas = replicated ? await Promise.all([cluster.replica(), cluster.replica(), cluster.replica()]) : [await cluster.replica()]
      t.equal(new Set(replicas).size, replicated ? 3 : 1, 'each replica its own manager')
      const busy = new Map<string, string>()
      let overlaps = 0
      let served = 0
      const shapes: Array<{ queue: string, candidates: Candidate[] }> = [
        { queue: queueName('llm', 'a'), candidates: [cand('1', '1'), cand('2', '2')] },
        { queue: queueName('llm', 'b'), candidates: [cand('3', '1', '2')] },
        { queue: queueName('diffusor', 'c'), candidates: [cand('4', '3')] },
        { queue: queueName('llm', 'd'), candidates: [cand('5', '3'), cand('6', '4')] }
      ]
      await Promise.all(Array.from({ length: 120 }, async (_, i) => {
        await sleep(i % 30)
        const shape = shapes[i % shapes.length]
        const m = replicas[i % replicas.length]
        const l: Lease = await m.acquire({ ...shape, info: info(shape.queue) })
        for (const g of l.gpuIds) {
          if (busy.has(g)) overlaps++
          busy.set(g, l.token)
        }
        await sleep(1 + (i % 4))
        for (const g of l.gpuIds) busy.delete(g)
        served++
        await m.release(l)
      }))
      t.equal(overlaps, 0)
      t.equal(served, 120)
      t.same((await replicas[0].store.status(['1', '2', '3', '4'])).gpus, [])
    })
  })
}

t.test('redis: a dead replica\'s leases expire and its waiters stop blocking the queue', async (t) => {
  const cluster = await clusters.redis(t)({ ttlMs: 600 })
  const a = await cluster.replica()
  const b = await cluster.replica()
  const held = await a.acquire({ queue: 'q', candidates: [cand('1', '1')], info: info('m') })
  const ghost = a.acquire({ queue: 'q', candidates: [cand('1', '1')], info: info('m') })
  ghost.catch(() => {})
  await sleep(20)
  const waiting = b.acquire({ queue: 'q', candidates: [cand('1', '1')], info: info('m') })
  // replica a dies: no more renewals, heartbeats or releases
  ;(a as any).sweepTimer.unref(); clearInterval((a as any).sweepTimer); clearInterval((a as any).renewTimer)
  ;(a as any).closed = true
  for (const w of (a as any).waiters.values()) clearTimeout(w.timer)
  ;(a as any).waiters.clear()
  const started = performance.now()
  const l = await waiting
  const took = performance.now() - started
  t.ok(took < 600 + 600, `b served ${Math.round(took)} ms after a died (ttl 600 ms)`)
  t.not(l.token, held.token)
  await b.release(l)
  t.same((await b.store.status(['1'])).queues, {}, 'the dead replica\'s waiter is gone')
})

t.test('memory: records of served waiters and expired reservations do not pile up', async (t) => {
  const s = { ...defaults, ttlMs: 300 }
  const store = new MemoryLeaseStore(s)
  const m = manager(t, store, s)
  await m.start()
  const first = await m.acquire({ queue: 'q', candidates: [cand('1', '1')], info: info('a') })
  const queued = Array.from({ length: 30 }, async () => {
    const l = await m.acquire({ queue: 'q', candidates: [cand('1', '1')], info: info('a') })
    await m.release(l)
  })
  await sleep(20)
  await m.release(first)
  await Promise.all(queued)
  await m.acquire({ queue: 'r', candidates: [cand('2', '2')], info: { ...info('r'), purpose: 'reservation' } })
  await sleep(700) // past the ttl, and a sweep (every 200 ms here)
  t.equal((store as any).waiters.size, 0, 'no waiter records left')
  t.equal((store as any).leases.size, 0, 'no lease records left')
})

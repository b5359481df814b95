// Late binding in the lease store (CONTRACT 16.2, 16.3), run against both stores: Redis (waiters
// on two replicas) and memory. A server that frees goes to the waiter it serves cheapest among the
// first of its line (its prefix's holder, then its model's), a pinned waiter takes no other server
// until its pin ends, and no waiter is passed over past the store's bound (AFFINITY_MAX_WAIT_MS).
// Fair share by tokens (16.4) holds through it: grants made at once are charged, a late grant
// moves the line's clock to the start tag of what it served.
import t, { type Test } from 'tap'
import { setTimeout as sleep } from 'node:timers/promises'
import { LeaseManager, type AcquireRequest, type Lease } from '../services/leases/lease-manager.js'
import type { Candidate, LeaseInfo, LeaseStore } from '../services/leases/lease-store.js'
import { MemoryLeaseStore } from '../services/leases/memory-lease-store.js'
import { RedisLeaseStore } from '../services/leases/redis-lease-store.js'
import { redisClients, testPrefix } from './helpers/redis.js'

const info = (model: string): LeaseInfo => ({ model, kind: 'llm', purpose: 'proxy' })
const cand = (assignmentId: string, gpuId: string): Candidate => ({ assignmentId, gpuIds: [gpuId] })
const settings = { ttlMs: 3000, queueMax: 100, starvationMs: 60_000, queueTimeoutMs: 20_000, queueMaxTotal: 10_000, priorityAgingMs: 60_000 }
/** Two servers of one model, one GPU each; and the same two for a second model (shared servers). */
const both = [cand('1', '1'), cand('2', '2')]

type Replicas = () => Promise<LeaseManager>

function manager (t: Test, store: LeaseStore): LeaseManager {
  const m = new LeaseManager(store, { ttlMs: settings.ttlMs, queueTimeoutMs: settings.queueTimeoutMs, pollMs: 200 })
  t.teardown(() => m.close())
  return m
}

const stores: Record<string, (t: Test, passOverMs: number) => Replicas> = {
  // one process, one manager (embedded mode has no replicas)
  memory: (t, passOverMs) => {
    const store = new MemoryLeaseStore({ ...settings, passOverMs })
    let started: LeaseManager | undefined
    return async () => {
      if (started == null) {
        started = manager(t, store)
        await started.start()
      }
      return started
    }
  },
  redis: (t, passOverMs) => {
    const prefix = testPrefix(t)
    return async () => {
      const { client, subscriber } = await redisClients(t)
      const m = manager(t, new RedisLeaseStore({ ...settings, passOverMs, client, subscriber, prefix }))
      await m.start()
      return m
    }
  }
}

/** Polls until `check` holds; fails the test past 10 s. */
async function until (check: () => boolean | Promise<boolean>, what: string): Promise<void> {
  const end = performance.now() + 10_000
  while (!await check()) {
    if (performance.now() > end) throw new Error(`timed out waiting for ${what}`)
    await sleep(5)
  }
}

/** A waiter whose grant is recorded in `order` as it comes. */
function waiter (m: LeaseManager, name: string, order: string[], req: Partial<AcquireRequest> & { queue: string, candidates: Candidate[] }): Promise<Lease> {
  return m.acquire({ info: info(req.queue), lateBinding: true, ...req }).then((lease) => {
    order.push(`${name}@${lease.assignmentId}`)
    return lease
  })
}

const waiting = async (m: LeaseManager, queue: string): Promise<number> => (await m.store.status(['1', '2'])).queues[queue] ?? 0

for (const [name, make] of Object.entries(stores)) {
  t.test(`${name} store`, async (t) => {
    t.test('a freed server goes to the waiter it serves cheapest: its prefix\'s holder first, whatever the order', async (t) => {
      const replica = make(t, 10_000)
      const [one, two] = [await replica(), await replica()]
      const x = await one.acquire({ queue: 'q', candidates: both, info: info('q') })
      const y = await one.acquire({ queue: 'q', candidates: both, info: info('q') })
      t.same([x.assignmentId, y.assignmentId], ['1', '2'])
      const order: string[] = []
      // first a request with no holder, then one whose prefix is on 2, then one whose prefix is on 1
      const plain = waiter(one, 'plain', order, { queue: 'q', candidates: both })
      await until(async () => await waiting(one, 'q') === 1, 'the first waiter')
      const on2 = waiter(two, 'on2', order, { queue: 'q', candidates: both, holder: '2', pinMs: 5000 })
      await until(async () => await waiting(one, 'q') === 2, 'the second waiter')
      const on1 = waiter(one, 'on1', order, { queue: 'q', candidates: both, holder: '1', pinMs: 5000 })
      await until(async () => await waiting(one, 'q') === 3, 'the third waiter')

      await one.release(x)
      const l1 = await on1
      t.same(order, ['on1@1'], 'server 1 went to the last waiter, whose prefix it holds')
      await one.release(y)
      const l2 = await on2
      t.same(order, ['on1@1', 'on2@2'], 'server 2 to the one whose prefix it holds')
      await one.release(l1)
      const l3 = await plain
      t.same(order, ['on1@1', 'on2@2', 'plain@1'], 'the first waiter next, on whatever frees')
      await two.release(l2)
      await one.release(l3)
    })

    t.test('a pinned waiter takes no other server until its pin ends, then the free one', async (t) => {
      const m = await make(t, 10_000)()
      const x = await m.acquire({ queue: 'q', candidates: both, info: info('q') })
      t.equal(x.assignmentId, '1')
      const order: string[] = []
      const pinned = waiter(m, 'pinned', order, { queue: 'q', candidates: both, holder: '1', pinMs: 1500 })
      await until(async () => await waiting(m, 'q') === 1 || order.length > 0, 'the pinned request to wait or be served')
      t.same(order, [], 'it waits for its holder while server 2 is free')
      const lease = await pinned
      t.same(order, ['pinned@2'], 'its pin over, the holder still busy: the free server')
      t.ok(lease.queuedMs >= 1400, `it waited for its pin (${Math.round(lease.queuedMs)} ms)`)
      await m.release(lease)
      const direct = await m.acquire({ queue: 'q', candidates: both, info: info('q'), holder: '2', pinMs: 1500 })
      t.equal(direct.assignmentId, '2', 'a free holder is taken at once')
      await m.release(direct)
      await m.release(x)
    })

    t.test('shared servers: a freed server goes to a waiter of the model whose last lease it ran; one pinned to its model waits for it', async (t) => {
      const replica = make(t, 10_000)
      const [one, two] = [await replica(), await replica()]
      // a's last lease on 1, b's on 2: their models are resident there
      const a = await one.acquire({ queue: 'a', candidates: both, info: info('a') })
      const b = await two.acquire({ queue: 'b', candidates: both, info: info('b'), preferred: ['2'] })
      t.same([a.assignmentId, b.assignmentId], ['1', '2'])
      const order: string[] = []
      // b's waiter first, pinned to b's servers; then a's
      const waitB = waiter(one, 'b', order, { queue: 'b', candidates: both, pinMs: 5000 })
      await until(async () => await waiting(one, 'b') === 1, 'b to wait')
      const waitA = waiter(two, 'a', order, { queue: 'a', candidates: both, pinMs: 5000 })
      await until(async () => await waiting(one, 'a') === 1, 'a to wait')
      await one.release(a)
      const a2 = await waitA
      t.same(order, ['a@1'], 'server 1 (model a resident) to a\'s waiter, though b\'s came first')
      await two.release(b)
      const b2 = await waitB
      t.same(order, ['a@1', 'b@2'])
      await two.release(a2)
      await one.release(b2)
    })

    t.test('fair share by tokens holds through late binding: a grant made at once is charged, a late grant moves the line\'s clock to the start of what it served', async (t) => {
      const replica = make(t, 10_000)
      const [one, two] = [await replica(), await replica()]
      const one1 = [cand('1', '1')]
      const client = (id: string): AcquireRequest['client'] => ({ id, priority: 'normal' })
      // 'big' taken at once (nobody waits) is charged its 5,000 tokens: its next request (50) goes
      // after small's (100), though it queued first
      await one.release(await waiter(one, 'big', [], { queue: 'q', candidates: one1, client: client('big'), cost: 5000 }))
      let held = await one.acquire({ queue: 'q', candidates: one1, info: info('q') })
      const order: string[] = []
      const big = waiter(one, 'big', order, { queue: 'q', candidates: one1, client: client('big'), cost: 50 })
      await until(async () => await waiting(one, 'q') === 1, 'big to wait')
      const small = waiter(two, 'small', order, { queue: 'q', candidates: one1, client: client('small'), cost: 100 })
      await until(async () => await waiting(one, 'q') === 2, 'small to wait')
      await one.release(held)
      // (each gives its lease back once granted, whatever the order)
      await Promise.all([big.then(async (l) => { await one.release(l) }), small.then(async (l) => { await two.release(l) })])
      t.same(order, ['small@1', 'big@1'], 'the client served at once goes after one that was not')

      // In a new line: long (1,000 tokens, start 0) is served before x (1,200); a client arriving
      // then with 500 starts at the clock, long's start (tag 500), and goes before x. Were the
      // clock long's end (1,000), it would go after x (tag 1,500).
      held = await one.acquire({ queue: 'r', candidates: one1, info: info('r') })
      const later: string[] = []
      const long = waiter(one, 'long', later, { queue: 'r', candidates: one1, client: client('long'), cost: 1000 })
      await until(async () => await waiting(one, 'r') === 1, 'long to wait')
      const x = waiter(two, 'x', later, { queue: 'r', candidates: one1, client: client('x'), cost: 1200 })
      await until(async () => await waiting(one, 'r') === 2, 'x to wait')
      await one.release(held)
      held = await long
      const arriving = waiter(two, 'arriving', later, { queue: 'r', candidates: one1, client: client('arriving'), cost: 500 })
      await until(async () => await waiting(one, 'r') === 2, 'the arriving client to wait')
      await one.release(held)
      await Promise.all([arriving, x].map(async (w) => { await two.release(await w) }))
      t.same(later, ['long@1', 'arriving@1', 'x@1'], 'the client arriving after a long request goes between, not past the waiter there')
    })

    t.test('no waiter is passed over past the bound', async (t) => {
      const replica = make(t, 300)
      const [one, two] = [await replica(), await replica()]
      const one1 = [cand('1', '1')]
      let held = await one.acquire({ queue: 'q', candidates: one1, info: info('q') })
      const order: string[] = []
      // the first waiter has no holder, then one after another whose prefix the server holds
      const first = waiter(one, 'first', order, { queue: 'q', candidates: one1 })
      await until(async () => await waiting(one, 'q') === 1, 'the first waiter')
      const early = waiter(two, 'early', order, { queue: 'q', candidates: one1, holder: '1' })
      await until(async () => await waiting(one, 'q') === 2, 'the second waiter')
      await one.release(held)
      held = await early
      t.same(order, ['early@1'], 'within the bound the holder\'s waiter goes first')
      // past the bound (300 ms after the first waiter's arrival), no later waiter passes it
      await sleep(350)
      const late = waiter(two, 'late', order, { queue: 'q', candidates: one1, holder: '1' })
      await until(async () => await waiting(one, 'q') === 2, 'the third waiter')
      await two.release(held)
      held = await first
      t.same(order, ['early@1', 'first@1'], 'the first waiter, past the bound, is served before the holder\'s')
      await one.release(held)
      await two.release(await late)
    })
  })
}

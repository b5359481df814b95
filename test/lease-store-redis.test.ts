// Rules only the Redis store can break: data loss and restarts, replicas judged dead, late
// scripts, key growth, cost. (The rules both stores share are in lease-store.test.ts.)
import t, { type Test } from 'tap'
import { setTimeout as sleep } from 'node:timers/promises'
import { Redis } from 'ioredis'
import { LeaseManager } from '../services/leases/lease-manager.js'
import type { Candidate, LeaseInfo, LeaseStore } from '../services/leases/lease-store.js'
import { MemoryLeaseStore } from '../services/leases/memory-lease-store.js'
import { RedisLeaseStore } from '../services/leases/redis-lease-store.js'
import { privateRedis } from './helpers/private-redis.js'
import { REDIS_URL, redisClients, testPrefix } from './helpers/redis.js'

const info = (model: string): LeaseInfo => ({ model, kind: 'llm', purpose: 'proxy' })
const reservation = (model: string): LeaseInfo => ({ model, kind: 'llm', purpose: 'reservation' })
const cand = (assignmentId: string, ...gpuIds: string[]): Candidate => ({ assignmentId, gpuIds })

interface Settings {
  ttlMs?: number
  queueTimeoutMs?: number
  pollMs?: number
  /** How soon the client reconnects after losing Redis. */
  reconnectMs?: number
}

/** A replica on a given Redis, with connections as the gateway makes them (fail fast while it is away). */
async function replica (t: Test, url: string, prefix: string, s: Settings = {}): Promise<LeaseManager> {
  const ttlMs = s.ttlMs ?? 1500
  const options = { enableOfflineQueue: false, maxRetriesPerRequest: 0, lazyConnect: true, retryStrategy: () => s.reconnectMs ?? 50 }
  const client = new Redis(url, options)
  const subscriber = new Redis(url, { ...options, enableOfflineQueue: true })
  client.on('error', () => {})
  subscriber.on('error', () => {})
  await client.connect()
  await subscriber.connect()
  const store = new RedisLeaseStore({ client, subscriber, prefix, ttlMs, queueMax: 100, starvationMs: 10_000 })
  const m = new LeaseManager(store, { ttlMs, queueTimeoutMs: s.queueTimeoutMs ?? 10_000, pollMs: s.pollMs ?? 100 })
  await m.start()
  t.teardown(async () => {
    await m.close().catch(() => {})
    client.disconnect()
    subscriber.disconnect()
  })
  return m
}

async function holders (store: LeaseStore, gpuIds: string[]): Promise<string[]> {
  const per = await store.tokensOf(gpuIds) as unknown[]
  return per.flatMap((x) => Array.isArray(x) ? x : x == null ? [] : [x as string]).sort()
}

const within = async <T>(p: Promise<T>, ms: number): Promise<T | 'waiting'> => await Promise.race([p, sleep(ms).then(() => 'waiting' as const)])

function freeze (m: LeaseManager): void {
  clearInterval((m as any).sweepTimer)
  clearInterval((m as any).renewTimer)
}

t.test('issue 14.2a: a replica booting on a just-restarted, empty Redis grants nothing others may still use', async (t) => {
  const redis = await privateRedis(t)
  const prefix = 'p:'
  const holder = await replica(t, redis.url, prefix, { reconnectMs: 800 })
  const lease = await holder.acquire({ queue: 'q', candidates: [cand('1', '1')], info: info('m') })
  await redis.kill()
  await redis.start()
  // A replica that boots now reaches the empty Redis before the holder has reconnected.
  const booting = await replica(t, redis.url, prefix)
  const started = performance.now()
  const granted = booting.acquire({ queue: 'q', candidates: [cand('1', '1')], info: info('m') })
  t.equal(await within(granted, 700), 'waiting', 'nothing is granted while the holder may still be re-asserting')
  await sleep(600)
  t.same(await holders(booting.store, ['1']), [lease.token], "the holder's renewal re-created its lease meanwhile")
  await holder.release(lease)
  const next = await granted
  t.ok(performance.now() - started >= 700)
  await booting.release(next as any)
})

t.test('issue 14.2b: Redis restarting from an older snapshot pauses grants too (leases taken after it are missing)', async (t) => {
  const redis = await privateRedis(t, { snapshots: true })
  const prefix = 'p:'
  const holder = await replica(t, redis.url, prefix, { reconnectMs: 800 })
  const other = await replica(t, redis.url, prefix)
  const early = await holder.acquire({ queue: 'a', candidates: [cand('1', '1')], info: info('a') })
  await holder.release(early)
  const admin = new Redis(redis.url, { maxRetriesPerRequest: 0, retryStrategy: () => 50 })
  admin.on('error', () => {})
  t.teardown(() => admin.disconnect())
  await admin.save() // the snapshot has the epoch, but not the lease below
  const late = await holder.acquire({ queue: 'b', candidates: [cand('2', '2')], info: info('b') })
  await redis.kill()
  await redis.start()
  // the other replica reconnects (50 ms apart); the holder (800 ms apart) has not yet
  for (const deadline = performance.now() + 5000; !other.store.available() && performance.now() < deadline;) await sleep(5)
  const started = performance.now()
  const granted = other.acquire({ queue: 'b', candidates: [cand('2', '2')], info: info('b') })
  t.equal(await within(granted, 700), 'waiting', 'the rolled-back store grants nothing at once')
  await sleep(600)
  t.same(await holders(other.store, ['2']), [late.token], 'the lease missing from the snapshot was re-asserted')
  await holder.release(late)
  await other.release(await granted)
  t.ok(performance.now() - started >= 700)
})

t.test('issue 14.3: waiters dropped while their replica seemed dead are queued again', async (t) => {
  const prefix = testPrefix(t)
  const ttlMs = 600
  const a = await replica(t, REDIS_URL, prefix, { ttlMs, queueTimeoutMs: 8000 })
  const b = await replica(t, REDIS_URL, prefix, { ttlMs, queueTimeoutMs: 8000 })
  const held = await b.acquire({ queue: 'q', candidates: [cand('1', '1')], info: info('m') })
  const waiting = a.acquire({ queue: 'q', candidates: [cand('1', '1')], info: info('m') })
  await sleep(50)
  // a network blackhole for a: no heartbeat, no calls, and its client never sees a reconnect
  freeze(a)
  await sleep(ttlMs + 300)
  // b's release serves the queue, finds a's waiter dead and drops it; b takes the GPU again
  await b.release(held)
  const again = await b.acquire({ queue: 'q', candidates: [cand('1', '1')], info: info('m') })
  t.same((await b.store.status(['1'])).queues, {}, "a's waiter was dropped")
  // the network heals
  ;(a as any).sweepTimer = setInterval(() => { void (a as any).sweep() }, 100)
  ;(a as any).renewTimer = setInterval(() => { void (a as any).renewTick() }, ttlMs / 3)
  await sleep(400)
  await b.release(again)
  const started = performance.now()
  const l = await within(waiting, 3000)
  t.not(l, 'waiting', 'the dropped waiter was queued again and served')
  t.ok(performance.now() - started < 1000, `served ${Math.round(performance.now() - started)} ms after the GPU was freed`)
  if (l !== 'waiting') await a.release(l)
})

t.test('issue 14.8a: reservations are re-asserted after the store lost its data', async (t) => {
  const redis = await privateRedis(t)
  const prefix = 'p:'
  const granter = await replica(t, redis.url, prefix)
  const r = await granter.acquire({ queue: 'q', candidates: [cand('1', '1')], info: reservation('m') })
  await redis.kill()
  await redis.start()
  await sleep(300) // the granter reconnects and re-asserts
  const other = await replica(t, redis.url, prefix)
  const granted = other.acquire({ queue: 'q', candidates: [cand('1', '1')], info: reservation('m') })
  // its holder pings it, as a holder does
  let pinged = 0
  for (let i = 0; i < 5; i++) {
    await sleep(500)
    if (await granter.store.ping(r.token) != null) pinged++
  }
  t.equal(pinged, 5, 'every ping of its holder found it live')
  t.equal(await within(granted, 0), 'waiting', 'it was not handed out again, past the pause either')
  t.ok(await granter.store.release(r.token))
  await other.store.release((await granted).token)
})

t.test('issue 14.8b: a renewal that runs after the release (a script resent late) revives nothing', async (t) => {
  const prefix = testPrefix(t)
  const m = await replica(t, REDIS_URL, prefix)
  const lease = await m.acquire({ queue: 'q', candidates: [cand('1', '1')], info: info('m') })
  await m.store.release(lease.token)
  const lost = await m.store.renew([lease])
  t.same(lost, [lease.token], 'reported lost')
  t.same(await holders(m.store, ['1']), [], 'the GPU stays free')
  await m.release(lease)
})

t.test('a grant heard from another replica before the waiter\'s own attempt answered is kept, not given back', async (t) => {
  // Found by the cluster tests as two requests on one GPU: the other replica's release granted the
  // waiter and published it; the subscriber connection delivered that before the command
  // connection delivered the attempt's own "waiting", and the waiter, already settled, "left" its
  // queue, which releases a lease granted to it meanwhile, the one its request was running on.
  const prefix = testPrefix(t)
  const a = await replica(t, REDIS_URL, prefix, { ttlMs: 3000 })
  const b = await replica(t, REDIS_URL, prefix, { ttlMs: 3000 })
  const held = await b.acquire({ queue: 'q', candidates: [cand('1', '1')], info: info('m') })
  // a's attempt runs in Redis at once; its reply reaches a only when the test opens the gate
  const store = a.store
  const attempt = store.attempt.bind(store)
  let openGate!: () => void
  const gate = new Promise<void>((resolve) => { openGate = resolve })
  let attempted!: () => void
  const ran = new Promise<void>((resolve) => { attempted = resolve })
  store.attempt = async (input) => {
    const r = await attempt(input)
    attempted()
    await gate
    return r
  }
  const waiting = a.acquire({ queue: 'q', candidates: [cand('1', '1')], info: info('m') })
  await ran
  await b.release(held)
  // the grant reaches a by pub/sub while its attempt's "waiting" is still on its way
  const deadline = performance.now() + 2000
  while (a.leases().length === 0 && performance.now() < deadline) await sleep(5)
  t.equal(a.leases().length, 1, 'a heard of its grant first')
  openGate()
  const lease = await waiting
  await sleep(200) // a wrong leave would have run by now
  t.same(await holders(b.store, ['1']), [lease.token], "the waiter's lease is still held in the store")
  t.equal(await within(b.acquire({ queue: 'q', candidates: [cand('1', '1')], info: info('m') }), 300), 'waiting', 'nobody else is granted its GPU')
  await a.release(lease)
})

t.test('issue 14.9: a dead replica\'s waiters in a queue nobody serves leave no keys behind', async (t) => {
  const prefix = testPrefix(t)
  const ttlMs = 300
  const other = await replica(t, REDIS_URL, prefix, { ttlMs })
  const held = await other.acquire({ queue: 'busy', candidates: [cand('9', '9')], info: info('busy') })
  const dead = await replica(t, REDIS_URL, prefix, { ttlMs, queueTimeoutMs: 60_000 })
  const blocker = await dead.acquire({ queue: 'x', candidates: [cand('1', '1')], info: info('x') })
  const ghost = dead.acquire({ queue: 'x', candidates: [cand('1', '1')], info: info('x') })
  ghost.catch(() => {})
  await sleep(50)
  freeze(dead)
  for (const w of (dead as any).waiters.values()) clearTimeout(w.timer)
  void blocker
  await sleep(4 * ttlMs + 300)
  const redis = new Redis(REDIS_URL)
  t.teardown(() => redis.disconnect())
  const keys = await redis.keys(prefix + '*')
  const left = keys.map((k) => k.slice(prefix.length)).filter((k) => /^(w|line|age1|age2|vt|lease|gpu|qw|qa):/.test(k))
  t.same(left.filter((k) => k !== `lease:${held.token}` && k !== 'gpu:9'), [], 'waiter, line and lease keys all expired')
  await other.release(held)
})

t.test('issue 14.9: the memory store\'s ttls do not follow the wall clock', async (t) => {
  const s = { ttlMs: 1000, queueMax: 10, starvationMs: 10_000 }
  const store = new MemoryLeaseStore(s)
  const m = new LeaseManager(store, { ttlMs: 1000, queueTimeoutMs: 1000, pollMs: 100 })
  await m.start()
  t.teardown(() => m.close())
  const r = await m.acquire({ queue: 'q', candidates: [cand('1', '1')], info: reservation('m') })
  const realNow = Date.now
  Date.now = () => realNow() + 3_600_000 // the clock steps an hour ahead (NTP, a VM resumed)
  t.teardown(() => { Date.now = realNow })
  t.ok(await store.ping(r.token), 'the reservation is still live')
  t.same(await holders(store, ['1']), [r.token])
  Date.now = realNow
  await store.release(r.token)
})

/** Redis's own count of the commands it ran, by INFO commandstats: the calls inside the scripts, and the scripts' time (µs). */
async function commandCounts (redis: Redis): Promise<{ calls: number, scriptUs: number }> {
  const out = { calls: 0, scriptUs: 0 }
  for (const m of (await redis.info('commandstats')).matchAll(/^cmdstat_([a-z_|]+):calls=(\d+),usec=(\d+)/gm)) {
    if (m[1] === 'evalsha' || m[1] === 'eval') out.scriptUs += Number(m[3])
    else if (m[1] !== 'info') out.calls += Number(m[2])
  }
  return out
}

/**
 * One GPU, `waiters` queued over `queues` queues, each served in turn, on a Redis of the test's
 * own (so that its command counts are this run's alone): the Redis calls and the scripts' time in Redis per handoff, and the rate.
 * With `assignments` > 1 the GPU carries that many assignments (one Ollama server serving as
 * many models), queue i's candidate list being assignment i alone. With `measured` < `waiters`,
 * the first `measured` handoffs are counted and the next grantee keeps its lease (the rest wait).
 */
async function handoffs (t: Test, waiters: number, queues: number, candidates = 1, assignments = 1, measured = waiters): Promise<{ callsPerHandoff: number, usPerHandoff: number, rate: number }> {
  const own = await privateRedis(t)
  const options = { enableOfflineQueue: false, maxRetriesPerRequest: 0 }
  const client = new Redis(own.url, options)
  const subscriber = new Redis(own.url, { ...options, enableOfflineQueue: true })
  const stats = new Redis(own.url)
  t.teardown(() => { client.disconnect(); subscriber.disconnect(); stats.disconnect() })
  const prefix = testPrefix(t)
  // As on a Redis that has kept the fleet's data for longer than a lease's ttl: a store's first
  // call on a Redis started a moment ago pauses grants for a ttl (leases from before its start may
  // still run elsewhere), which is not what is measured here.
  await stats.set(prefix + 'epoch', `test@${Date.now() - 60_000}`)
  const store = new RedisLeaseStore({ client, subscriber, prefix, ttlMs: 30_000, queueMax: 10_000, starvationMs: 600_000 })
  // no sweep in the measured window: its work grows with the waiters' lines, not with handoffs
  const m = new LeaseManager(store, { ttlMs: 30_000, queueTimeoutMs: 120_000, pollMs: 60_000 })
  await m.start()
  t.teardown(() => m.close())
  // many busy candidates and one that frees up: only the last is ever free
  const list = [...Array.from({ length: candidates - 1 }, (_, i) => cand(`b${i}`, `g${i}`)), cand('1', '1')]
  const shared = Array.from({ length: assignments }, (_, i) => [cand(i === 0 ? '1' : `s${i}`, '1')])
  const listOf = (q: number): Candidate[] => assignments > 1 ? shared[q % assignments] : list
  const busy = await Promise.all(list.slice(0, -1).map(async (c) => await m.acquire({ queue: 'fill', candidates: [c], info: info('fill') })))
  const first = await m.acquire({ queue: 'q0', candidates: listOf(0), info: info('m') })
  let handedOn = 0
  let kept: (() => void) | undefined
  const stopped = new Promise<void>((resolve) => { kept = resolve })
  const all = Array.from({ length: waiters }, async (_, i) => {
    const l = await m.acquire({ queue: `q${i % queues}`, candidates: listOf(i % queues), info: info(`m${i % queues}`) })
    if (++handedOn > measured) {
      kept?.()
      return
    }
    await m.release(l)
  })
  // the waiters left when the count stops are sent away by the manager's close
  for (const p of all) p.catch(() => {})
  // every waiter queued (a thousand lists to register take a while), none of it in the window
  while (await stats.zcard(prefix + 'allw') < waiters) await sleep(20)
  const before = await commandCounts(stats)
  const started = performance.now()
  await m.release(first)
  await (measured < waiters ? stopped : Promise.all(all))
  const rate = measured / ((performance.now() - started) / 1000)
  const after = await commandCounts(stats)
  for (const l of busy) await m.release(l)
  return { callsPerHandoff: (after.calls - before.calls) / measured, usPerHandoff: (after.scriptUs - before.scriptUs) / measured, rate }
}

t.test('issue 14.4, 12.4: the cost of a handoff does not grow with the number of queues or candidates', async (t) => {
  // What the lease scripts do per handoff, as Redis counts it: the calls they make (a loop over
  // the queues or the candidates in every release would multiply them) and their time in Redis (a
  // single call that reads a whole index, which counts as one call, would multiply that). Not
  // the rate, which on a shared machine is noise (printed for the record).
  const text = (h: Awaited<ReturnType<typeof handoffs>>): string =>
    `${h.callsPerHandoff.toFixed(1)} Redis calls and ${h.usPerHandoff.toFixed(0)} µs of script per handoff, ${Math.round(h.rate)}/s`
  const oneQueue = await handoffs(t, 500, 1)
  const manyQueues = await handoffs(t, 500, 500)
  t.comment(`one GPU, 500 waiters in one queue: ${text(oneQueue)}; in 500 queues: ${text(manyQueues)}`)
  t.ok(manyQueues.callsPerHandoff < 1.25 * oneQueue.callsPerHandoff, 'many queues make about as many Redis calls as one')
  t.ok(manyQueues.usPerHandoff < 2 * oneQueue.usPerHandoff, 'many queues cost about as much time in Redis as one')
  const few = await handoffs(t, 200, 1, 16)
  const many = await handoffs(t, 200, 1, 1024)
  t.comment(`200 waiters, 1 free candidate among 16: ${text(few)}; among 1024: ${text(many)}`)
  t.ok(many.callsPerHandoff < 1.25 * few.callsPerHandoff, 'many busy candidates make about as many Redis calls as few')
  t.ok(many.usPerHandoff < 2 * few.usPerHandoff, 'many busy candidates cost about as much time in Redis as few')
})

t.test('hardening 3.7: the cost of a handoff does not grow with the assignments sharing its GPU', async (t) => {
  // One Ollama server serving many models is one assignment per model on the same GPU. A release
  // of that GPU that visits every assignment on it (to put each back into its list's free index)
  // or serves every model's queue (to find the one whose waiter came first) costs Redis calls and
  // script time in proportion to them, and blocks every other lease meanwhile.
  const text = (h: Awaited<ReturnType<typeof handoffs>>): string =>
    `${h.callsPerHandoff.toFixed(1)} Redis calls and ${h.usPerHandoff.toFixed(0)} µs of script per handoff, ${Math.round(h.rate)}/s`
  // the first 50 handoffs among 1,000 waiters (in the old engine each cost tens of thousands of calls)
  const one = await handoffs(t, 1000, 1, 1, 1, 50)
  const thousand = await handoffs(t, 1000, 1000, 1, 1000, 50)
  t.comment(`one GPU, 1,000 waiters: one assignment, one queue: ${text(one)}; 1,000 assignments, one waiter in each of their queues: ${text(thousand)}`)
  t.ok(thousand.callsPerHandoff < 1.5 * one.callsPerHandoff, 'a thousand assignments on the GPU make about as many Redis calls per handoff as one')
  t.ok(thousand.usPerHandoff < 2 * one.usPerHandoff, 'a thousand assignments on the GPU cost about as much script time per handoff as one')
})

t.test('grants made at once leave the fair state and the residency lists with an expiry, set once, not at every grant', async (t) => {
  const prefix = testPrefix(t)
  const m = await replica(t, REDIS_URL, prefix)
  const redis = new Redis(REDIS_URL)
  t.teardown(() => redis.disconnect())
  for (let i = 0; i < 5; i++) {
    const lease = await m.acquire({ queue: 'q', candidates: [cand('1', '1')], info: info('q'), cost: 10, lateBinding: true, client: { id: 'c', priority: 'normal' } })
    await m.release(lease)
  }
  const keys = (await redis.keys(prefix + '*')).map((k) => k.slice(prefix.length))
  const vt = keys.filter((k) => k.startsWith('vt:'))
  const res = keys.filter((k) => k.startsWith('res:'))
  t.equal(vt.length, 1, 'the line\'s fair state')
  t.equal(res.length, 1, 'the queue\'s residency list')
  for (const k of [...vt, ...res]) t.ok(await redis.pttl(prefix + k) > 0, `${k} expires`)
  // the fair state's expiry was set by the first grant (x) and not again by the four after it
  const x = Number(await redis.hget(prefix + vt[0], 'x'))
  t.ok(x > 0, 'when its expiry was set is kept')
  // deleted expiry: the next grant within a third of the ttl leaves it (no call per grant) …
  await redis.persist(prefix + vt[0])
  await m.release(await m.acquire({ queue: 'q', candidates: [cand('1', '1')], info: info('q'), cost: 10, lateBinding: true, client: { id: 'c', priority: 'normal' } }))
  t.equal(await redis.pttl(prefix + vt[0]), -1, 'not set again at every grant')
  // … and one after a third of it sets it again (the store's clock: the ttl here is 3 × 1.5 s)
  await redis.hset(prefix + vt[0], 'x', String(x - 2000))
  await m.release(await m.acquire({ queue: 'q', candidates: [cand('1', '1')], info: info('q'), cost: 10, lateBinding: true, client: { id: 'c', priority: 'normal' } }))
  t.ok(await redis.pttl(prefix + vt[0]) > 0, 'set again once a third of it has passed')
})

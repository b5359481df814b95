// GET /gpu/events (CONTRACT 13): the fleet as server-sent events, shared across replicas through
// Redis, one source per gateway instance, and readers that fall behind cut off.
import t from 'tap'
import Fastify from 'fastify'
import type { AddressInfo } from 'node:net'
import maestro from '../app.js'
import { Writable } from 'node:stream'
import { setTimeout as sleep } from 'node:timers/promises'
import { startFleet, type Gateway } from './helpers/gateway.js'
import { openFleetStream } from './helpers/fleet-stream.js'
import { scrape } from './helpers/prometheus.js'
import { FleetEventHub, StreamReader } from '../services/fleet/fleet-events.js'
import { diffSnapshots, type FleetSnapshot } from '../services/fleet/fleet-snapshot.js'

async function post (gw: Gateway, path: string, body: unknown): Promise<{ status: number, body: any }> {
  const res = await fetch(gw.url + path, { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify(body) })
  return { status: res.status, body: await res.json() }
}

const generate = async (gw: Gateway, model: string): Promise<Response> =>
  await fetch(`${gw.url}/api/generate`, { method: 'POST', body: JSON.stringify({ model, prompt: 'x', stream: false }) })

t.test('a page on one replica sees a lease taken and given back on the other within a second', async (t) => {
  const fleet = await startFleet(t, { gpus: [1, 1], upstreams: [{ model: 'qwq', gpus: [0] }, { model: 'llama3', gpus: [1] }] })
  const [one, two] = [await fleet.replica(), await fleet.replica()]
  const stream = await openFleetStream(one.url)
  t.teardown(stream.close)
  t.equal(stream.response.status, 200)
  t.match(stream.response.headers.get('content-type'), /^text\/event-stream/)
  t.equal(stream.response.headers.get('cache-control'), 'no-cache')
  t.equal(stream.response.headers.get('x-accel-buffering'), 'no')

  const first = await stream.until((s) => s.gpus.length === 2 && s.replicas.length === 2, 3000, 'a snapshot naming both GPUs and both replicas')
  t.match(stream.text(), /^retry: \d+\n\n/, 'the stream opens with how soon to reconnect')
  t.equal(stream.events[0].event, 'snapshot', 'a whole snapshot comes first')
  t.same(first.gpus.map((g: any) => [g.id, g.state]), fleet.gpuIds.map((id) => [id, 'idle']))
  t.same(first.assignments.map((a: any) => a.name).sort(), ['llama3-2', 'qwq-1'])
  t.same(first.computers.flatMap((c: any) => c.gpuIds).sort(), [...fleet.gpuIds].sort())

  const started = performance.now()
  const reserved = await post(two, '/gpu/reserve', { outputType: 'text', model: 'qwq' })
  t.equal(reserved.status, 200)
  const leased = await stream.until((s) => s.gpus.some((g: any) => g.state === 'leased'), 1000, 'the lease taken on the other replica')
  const tookMs = performance.now() - started
  t.ok(tookMs < 1000, `lease shown after ${tookMs.toFixed(0)} ms`)
  const gpu = leased.gpus.find((g: any) => g.id === fleet.gpuIds[0])
  t.match(gpu, { state: 'leased', model: 'qwq', assignment: 'qwq-1', purpose: 'reservation', slots: { used: 1, capacity: 1 } })
  t.ok(Math.abs(gpu.since - Date.now()) < 5000, 'since is the lease\'s start')
  t.equal(leased.gpus.find((g: any) => g.id === fleet.gpuIds[1]).state, 'idle', 'the other GPU stays idle')
  t.equal(stream.events.at(-1)?.event, 'change', 'then changes, not snapshots')

  const releasing = performance.now()
  t.equal((await post(two, '/gpu/release', { leaseId: reserved.body.leaseId })).status, 200)
  await stream.until((s) => s.gpus.every((g: any) => g.state === 'idle'), 1000, 'the release on the other replica')
  const freedMs = performance.now() - releasing
  t.ok(freedMs < 1000, `release shown after ${freedMs.toFixed(0)} ms`)
})

t.test('queues, and the last requests of every replica', async (t) => {
  const fleet = await startFleet(t, { gpus: [1], upstreams: [{ model: 'qwq', gpus: [0] }] })
  const [one, two] = [await fleet.replica(), await fleet.replica()]
  const stream = await openFleetStream(one.url)
  t.teardown(stream.close)
  const reserved = await post(two, '/gpu/reserve', { outputType: 'text', model: 'qwq' })
  const sent = Date.now()
  const waiting = [generate(two, 'qwq'), generate(one, 'qwq'), generate(two, 'qwq')]
  const queued = await stream.until((s) => s.queues.some((q: any) => q.depth === 3), 3000, 'a queue of three')
  const counted = Date.now()
  t.match(queued.queues, [{ id: 'llm:qwq', kind: 'llm', model: 'qwq', depth: 3, oldestSince: Number }])
  // Redis's clock and this process's: the same machine's
  const oldest = queued.queues[0].oldestSince
  t.ok(oldest >= sent - 5 && oldest <= counted + 5, `oldestSince ${oldest}: the first waiter's arrival, within [${sent}, ${counted}]`)
  t.equal((await post(two, '/gpu/release', { leaseId: reserved.body.leaseId })).status, 200)
  for (const res of await Promise.all(waiting)) t.equal(res.status, 200)
  const generates = (s: any): any[] => s.recent.filter((r: any) => r.route === '/api/generate')
  const done = await stream.until((s) => s.queues.length === 0 && generates(s).length === 3, 3000, 'the queue gone and three requests listed')
  t.equal(done.recent.length, 3, 'the reservation, an operator\'s call, is not listed')
  for (const r of generates(done)) {
    t.match(r, { model: 'qwq', status: 200, assignment: 'qwq-1' })
    t.ok(typeof r.queueMs === 'number' && typeof r.upstreamMs === 'number', 'queue and upstream time')
    t.ok(Number.isFinite(Date.parse(r.at)))
  }
  t.ok(generates(done).some((r: any) => r.queueMs > 0), 'a request that waited says how long')
  const unknown = await generate(two, 'nope')
  t.equal(unknown.status, 404)
  const listed = await stream.until((s) => s.recent[0]?.model === 'nope', 2000, 'the refused request')
  t.match(listed.recent[0], { model: 'nope', status: 404 })
  t.equal(listed.recent[0].queueMs, undefined, 'it never queued')

  // what the changes built is what a new reader is told as a whole
  const fresh = await openFleetStream(one.url)
  t.teardown(fresh.close)
  const whole = await fresh.until(() => true)
  const { at: _a, ...built } = stream.state() as Record<string, unknown>
  const { at: _b, ...told } = whole as Record<string, unknown>
  t.same(built, told, 'snapshot + changes = the snapshot now')
  t.ok(stream.events.some((e) => e.event === 'change' && e.data.recentAdded != null && e.data.recent == null), 'new requests sent as additions, not the whole list')
})

t.test('recent requests in a change: the ones that joined, or the whole list when it changed otherwise', async (t) => {
  const entry = (n: number): any => ({ at: new Date(n).toISOString(), model: `m${n}`, status: 200 })
  const base = snapshot(0)
  const list = (ns: number[]): FleetSnapshot => ({ ...base, recent: ns.map(entry), recentLimit: 3 })
  t.same(diffSnapshots(list([2, 1]), list([4, 3, 2]))?.recentAdded, [entry(4), entry(3)], 'joined at the head, oldest dropped')
  t.same(diffSnapshots(list([]), list([1]))?.recentAdded, [entry(1)])
  t.same(diffSnapshots(list([2, 1]), list([1, 2]))?.recent, [entry(1), entry(2)], 'reordered: the whole list')
  t.same(diffSnapshots(list([3, 2, 1]), list([9, 8, 7]))?.recent, [entry(9), entry(8), entry(7)], 'all new: the whole list')
  t.equal(diffSnapshots(list([2, 1]), list([2, 1])), null, 'nothing changed, nothing sent')
})

t.test('one source per gateway, however many pages listen; none while nobody does', async (t) => {
  const fleet = await startFleet(t, { gpus: [1], upstreams: [{ model: 'qwq', gpus: [0] }] })
  const gw = await fleet.replica()
  const readers = async (): Promise<number> => (await scrape(gw.url)).value('maestro_event_stream_readers')
  const reads = async (): Promise<number> => (await scrape(gw.url)).value('maestro_fleet_state_reads_total')
  // ten: as many as one client (this address) may open
  const streams = await Promise.all(Array.from({ length: 10 }, async () => await openFleetStream(gw.url)))
  for (const s of streams) t.teardown(s.close)
  await Promise.all(streams.map(async (s) => await s.until((st) => st.gpus.length === 1)))
  t.equal(await readers(), 10)
  const before = await reads()
  await sleep(2000)
  const during = await reads() - before
  // one read every 500 ms, whatever the number of readers (10 per-page polls would make ~40)
  t.ok(during >= 2 && during <= 6, `${during} state reads in 2 s for 10 readers`)
  for (const s of streams) s.close()
  for (let i = 0; i < 50 && await readers() > 0; i++) await sleep(20)
  t.equal(await readers(), 0, 'closed pages leave the hub')
  const idle = await reads()
  await sleep(1200)
  t.equal(await reads(), idle, 'nobody listening: no reads')
})

t.test('closing the gateway ends the open streams', async (t) => {
  const fleet = await startFleet(t, { gpus: [1], upstreams: [{ model: 'qwq', gpus: [0] }] })
  // As server.ts builds it: connections are not force-closed, so an open stream would hold the close.
  const app = Fastify({ logger: false })
  await app.register(maestro, { dotenv: false, ...fleet.options })
  await app.listen({ port: 0, host: '127.0.0.1' })
  const { port } = app.server.address() as AddressInfo
  const stream = await openFleetStream(`http://127.0.0.1:${port}`)
  t.teardown(stream.close)
  await stream.until((s) => s.gpus.length === 1)
  const started = performance.now()
  const closed = app.close()
  const result = await Promise.race([closed.then(() => 'closed'), sleep(3000).then(() => 'still open')])
  t.equal(result, 'closed', `closed in ${(performance.now() - started).toFixed(0)} ms with a stream open`)
  stream.close()
  await closed
})

const snapshot = (n: number): FleetSnapshot => ({
  at: n,
  replica: 'r',
  store: 'memory',
  admin: { resources: [], token: false },
  computers: [],
  gpus: [{ id: '1', name: 'gpu', computerId: '1', vramGb: 8, state: n % 2 === 0 ? 'idle' : 'leased' }],
  assignments: [],
  queues: [],
  replicas: [],
  recent: [],
  recentLimit: 30
})

t.test('a reader that does not keep up is cut off, not buffered for ever', async (t) => {
  let n = 0
  const hub = new FleetEventHub({ build: async () => snapshot(n++), intervalMs: 5, minGapMs: 0 })
  t.teardown(() => { hub.close() })
  // A socket whose peer reads nothing: every write stays buffered.
  const stalled = new Writable({ highWaterMark: 1024, write (_chunk, _encoding, _callback) {} })
  let dropped = false
  const reader = new StreamReader(stalled, 8 * 1024, () => { dropped = true; leave() })
  const leave = hub.subscribe(reader)
  for (let i = 0; i < 200 && !dropped; i++) await sleep(5)
  t.ok(dropped, 'dropped')
  t.ok(stalled.destroyed, 'its connection closed')
  t.ok(stalled.writableLength < 8 * 1024 + 1024, `at most the limit and one frame buffered (${stalled.writableLength} bytes)`)
  t.equal(hub.size, 0)

  // A reader that keeps up gets every change, and is not dropped.
  const chunks: string[] = []
  const healthy = new Writable({ highWaterMark: 1024, write (chunk, _encoding, callback) { chunks.push(String(chunk)); callback() } })
  let healthyDropped = false
  hub.subscribe(new StreamReader(healthy, 8 * 1024, () => { healthyDropped = true }))
  await sleep(200)
  t.notOk(healthyDropped)
  t.ok(chunks.filter((c) => c.startsWith('event: change')).length > 5, 'changes keep coming')
})

t.test('heartbeats, and a state that cannot be read', async (t) => {
  let fail = false
  const hub = new FleetEventHub({
    build: async () => { if (fail) throw new Error('redis away'); return snapshot(0) },
    intervalMs: 20,
    minGapMs: 0,
    heartbeatMs: 30
  })
  t.teardown(() => { hub.close() })
  const frames: string[] = []
  hub.subscribe({ write: (f) => frames.push(f), end: () => {} })
  await sleep(100)
  t.equal(frames.filter((f) => f.startsWith('event: snapshot')).length, 1, 'one snapshot')
  t.ok(frames.filter((f) => f === ':\n\n').length >= 2, 'comment lines keep the stream alive')
  fail = true
  await sleep(100)
  t.equal(frames.filter((f) => f.startsWith('event: unavailable')).length, 1, 'told once that the state is unavailable')
  fail = false
  await sleep(100)
  t.equal(frames.filter((f) => f.startsWith('event: snapshot')).length, 2, 'a whole snapshot again once it can be read')
})

t.test('an upstream that refused a connection shows as cooling down on that replica, then up again', async (t) => {
  const fleet = await startFleet(t, {
    gpus: [1, 1],
    upstreams: [{ model: 'qwq', gpus: [0] }, { model: 'qwq', gpus: [1] }],
    options: { UPSTREAM_POLL_MS: 200 }
  })
  const gw = await fleet.replica()
  const stream = await openFleetStream(gw.url)
  t.teardown(stream.close)
  const healthOf = (s: any, name: string): string | undefined => s.assignments.find((a: any) => a.name === name)?.health
  await stream.until((s) => healthOf(s, 'qwq-1') === 'up' && healthOf(s, 'qwq-2') === 'up', 3000, 'both upstreams up')
  await fleet.upstreams[0].close() // connections to it are refused from now on
  const res = await generate(gw, 'qwq')
  t.equal(res.status, 200, 'served by the other server')
  t.equal(res.headers.get('x-maestro-assignment'), 'qwq-2')
  const cooled = await stream.until((s) => healthOf(s, 'qwq-1') === 'cooling', 2000, 'the refusing upstream cooling down')
  t.equal(healthOf(cooled, 'qwq-2'), 'up', 'the other one stays up')
})

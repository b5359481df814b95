// What the gateway does when its parts fail: upstreams, Redis, MariaDB, and replicas that die or
// are told to stop (issue 3). Replicas that must die run as server processes of their own (server.ts).
import t, { type Test } from 'tap'
import { once } from 'node:events'
import net from 'node:net'
import { performance } from 'node:perf_hooks'
import { setTimeout as sleep } from 'node:timers/promises'
import { Redis } from 'ioredis'
import { serverUrl } from './helpers/database.js'
import { startFleet, type TestFleet } from './helpers/gateway.js'
// A Redis of the test's own, which it can kill and start again without touching the shared one;
// redis-server binds its port itself (helpers/private-redis.ts).
import { privateRedis } from './helpers/private-redis.js'
import { RedisLeaseStore } from '../services/leases/redis-lease-store.js'
// Replicas that must die: server.ts as a process of its own.
import { envOf, spawnGateway } from './helpers/child-gateway.js'

type Teardown = Pick<Test, 'teardown'>

async function until<T> (what: string, check: () => Promise<T | undefined | false>, timeoutMs = 5000): Promise<T> {
  const deadline = performance.now() + timeoutMs
  for (;;) {
    const value = await check()
    if (value !== undefined && value !== false) return value
    if (performance.now() > deadline) throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}`)
    await sleep(10)
  }
}

/** POST a JSON body; the status, headers and body text (never throws on a status). */
async function post (url: string, body: unknown): Promise<{ status: number, headers: Headers, text: string }> {
  const res = await fetch(url, { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify(body) })
  return { status: res.status, headers: res.headers, text: await res.text() }
}

async function get (url: string): Promise<{ status: number, body: any }> {
  const res = await fetch(url)
  const text = await res.text()
  let body: unknown = text
  try { body = JSON.parse(text) } catch {}
  return { status: res.status, body }
}

/** A streamed /api/generate whose lines arrive one by one; `first` resolves with the first line. */
function streamGenerate (base: string, model: string, prompt: string): { first: Promise<void>, done: Promise<{ status: number, lines: any[], error?: string }> } {
  let firstLine!: () => void
  let failed!: (err: Error) => void
  const first = new Promise<void>((resolve, reject) => { firstLine = resolve; failed = reject })
  const done = (async () => {
    const lines: any[] = []
    try {
      const res = await fetch(`${base}/api/generate`, { method: 'POST', body: JSON.stringify({ model, prompt }) })
      const decoder = new TextDecoder()
      let buffer = ''
      for await (const chunk of res.body as unknown as AsyncIterable<Uint8Array>) {
        buffer += decoder.decode(chunk, { stream: true })
        let nl
        while ((nl = buffer.indexOf('\n')) >= 0) {
          lines.push(JSON.parse(buffer.slice(0, nl)))
          buffer = buffer.slice(nl + 1)
          firstLine()
        }
      }
      if (res.status !== 200) firstLine()
      return { status: res.status, lines }
    } catch (err) {
      failed(err as Error)
      return { status: 0, lines, error: (err as Error).message }
    }
  })()
  first.catch(() => {})
  return { first, done }
}

/** Reads a fleet's lease store the way a replica does (queues across the cluster). */
async function storeAt (t: Teardown, url: string, prefix: string): Promise<RedisLeaseStore> {
  const client = new Redis(url, { maxRetriesPerRequest: 1 })
  const subscriber = new Redis(url, { lazyConnect: true })
  t.teardown(() => { client.disconnect(); subscriber.disconnect() })
  return new RedisLeaseStore({ client, subscriber, prefix, ttlMs: 3000, queueMax: 1000, starvationMs: 10000 })
}

async function queued (store: RedisLeaseStore, fleet: TestFleet): Promise<number> {
  const { queues } = await store.status(fleet.gpuIds)
  return Object.values(queues).reduce((n, d) => n + d, 0)
}

async function heldGpusAt (url: string, prefix: string): Promise<string[]> {
  const client = new Redis(url, { maxRetriesPerRequest: 1 })
  try {
    const keys = await client.keys(prefix.replace(/[*?[\]\\]/g, '\\$&') + 'gpu:*')
    return keys.map((k) => k.slice(prefix.length + 'gpu:'.length)).sort()
  } finally {
    client.disconnect()
  }
}

/* ---------------------------------------------------------------------------------------------
 * A TCP proxy in front of MariaDB or Redis, to make a service vanish for one gateway alone.
 */
interface TcpProxy {
  port: number
  /** Refuse: existing connections dropped, nothing listens. */
  cut: () => Promise<void>
  /** Stop answering: connections stay open (and new ones are accepted) but no byte goes through. */
  silence: () => void
  /** Back to normal (dropping any silenced connection). */
  restore: () => Promise<void>
}

async function tcpProxy (t: Teardown, target: { host: string, port: number }): Promise<TcpProxy> {
  const sockets = new Set<net.Socket>()
  let silent = false
  const track = (s: net.Socket): void => {
    sockets.add(s)
    s.on('error', () => {})
    s.once('close', () => sockets.delete(s))
  }
  const server = net.createServer((client) => {
    track(client)
    if (silent) return
    const upstream = net.connect(target.port, target.host)
    track(upstream)
    client.pipe(upstream)
    upstream.pipe(client)
    client.once('close', () => upstream.destroy())
    upstream.once('close', () => client.destroy())
  })
  const listen = async (port: number): Promise<number> => {
    server.listen(port, '127.0.0.1')
    await once(server, 'listening')
    return (server.address() as net.AddressInfo).port
  }
  const dropAll = (): void => { for (const s of sockets) s.destroy() }
  const port = await listen(0)
  t.teardown(() => { dropAll(); server.close() })
  return {
    port,
    cut: async () => {
      const closed = new Promise((resolve) => server.close(resolve))
      dropAll()
      await closed
    },
    silence: () => {
      silent = true
      for (const s of sockets) { s.unpipe(); s.pause() }
    },
    restore: async () => {
      silent = false
      dropAll()
      if (!server.listening) await listen(port)
    }
  }
}

/* ------------------------------------------------------------------------------------------- */

t.test('an unreachable upstream is skipped and sits out a cooldown; 502 only when none works', async (t) => {
  const fleet = await startFleet(t, {
    gpus: [1, 1, 1],
    upstreams: [
      { model: 'm', gpus: [0], name: 'm-gone' },
      { model: 'm', gpus: [1], name: 'm-up' },
      { model: 'lonely', gpus: [2], name: 'lonely-gone' }
    ]
  })
  const gone = fleet.upstreams[0]
  await gone.close()
  await fleet.upstreams[2].close()
  const gw = await fleet.replica()

  let started = performance.now()
  const first = await post(`${gw.url}/api/generate`, { model: 'm', prompt: 'first', stream: false })
  t.comment(`failover to the next candidate took ${Math.round(performance.now() - started)} ms in all`)
  t.equal(first.status, 200, 'served by the next candidate')
  t.equal(first.headers.get('x-maestro-assignment'), 'm-up')
  t.equal(first.headers.get('x-maestro-gpus'), fleet.gpuIds[1])

  // Something listens on the dead server's port again, but only drops connections: count them.
  let attempts = 0
  const dropper = net.createServer((s) => { attempts++; s.destroy() })
  dropper.listen(gone.port, '127.0.0.1')
  await once(dropper, 'listening')
  t.teardown(() => { dropper.close() })
  for (let i = 0; i < 3; i++) {
    const r = await post(`${gw.url}/api/generate`, { model: 'm', prompt: `cooling ${i}`, stream: false })
    t.equal(r.headers.get('x-maestro-assignment'), 'm-up')
  }
  t.equal(attempts, 0, 'during its cooldown the failed server is not tried')

  started = performance.now()
  const lonely = await post(`${gw.url}/api/generate`, { model: 'lonely', prompt: 'x' })
  t.equal(lonely.status, 502, 'no candidate works: 502')
  t.match(JSON.parse(lonely.text), { error: /^no upstream for model 'lonely' is reachable/ }, 'in the contract format')
  t.comment(`502 after ${Math.round(performance.now() - started)} ms: ${lonely.text}`)

  // After the cooldown the server is tried first again; its dropped connection fails over too.
  await sleep(5200 - (performance.now() - started))
  const later = await post(`${gw.url}/api/generate`, { model: 'm', prompt: 'after cooldown', stream: false })
  t.equal(attempts, 1, 'after the cooldown the failed server is tried again')
  t.equal(later.status, 200)
  t.equal(later.headers.get('x-maestro-assignment'), 'm-up')

  // releases run just after an answer ends: wait for them (the assertion says if they never come)
  await until('every GPU to be free', async () => (await fleet.heldGpus()).length === 0).catch(() => {})
  t.same(await fleet.heldGpus(), [], 'every GPU free')
  t.same(fleet.recorder.overlaps, [])
})

t.test('an upstream that dies mid-stream or sends no headers frees its GPU at once', async (t) => {
  const fleet = await startFleet(t, {
    gpus: [1],
    upstreams: [{ model: 'm', gpus: [0], simulator: { tokens: 8, tokenDelayMs: 20 } }],
    options: { UPSTREAM_HEADERS_TIMEOUT_MS: 400 }
  })
  const gw = await fleet.replica()
  const sim = fleet.upstreams[0]

  sim.behaviour = { kind: 'die-mid-stream', afterLines: 3 }
  const { done } = streamGenerate(gw.url, 'm', 'dies')
  const broken = await done
  const ended = performance.now()
  t.equal(broken.status, 200)
  t.equal(broken.lines.length, 4, 'three lines, then one more')
  t.same(broken.lines.slice(0, 3).map((l) => l.done), [false, false, false])
  t.match(broken.lines[3], { error: /upstream failed mid-stream/ }, 'the last line is one {"error"} line')
  t.equal(broken.lines.filter((l) => 'error' in l).length, 1, 'exactly one error line')
  await until('the GPU to be free', async () => (await fleet.heldGpus()).length === 0, 1000)
  t.comment(`GPU free ${Math.round(performance.now() - ended)} ms after the broken stream ended`)

  // A complete (non-streamed) answer has a Content-Length: no line can be added, it is cut off.
  sim.behaviour = { kind: 'die-mid-stream', afterLines: 1 }
  const cutStarted = performance.now()
  const cut = await fetch(`${gw.url}/api/generate`, { method: 'POST', body: JSON.stringify({ model: 'm', prompt: 'dies', stream: false }) })
  const cutBody = await cut.text().then(() => 'complete', (err: Error) => `failed: ${err.message}`)
  t.equal(cutBody, 'failed: terminated', 'a broken Content-Length answer fails at the client')
  t.ok(performance.now() - cutStarted < 1000, `at once (${Math.round(performance.now() - cutStarted)} ms), not after a keep-alive timeout`)
  await until('the GPU to be free', async () => (await fleet.heldGpus()).length === 0, 1000)

  sim.behaviour = { kind: 'stall-headers' }
  const started = performance.now()
  const stalled = await post(`${gw.url}/api/generate`, { model: 'm', prompt: 'stalls' })
  const took = performance.now() - started
  t.equal(stalled.status, 504, 'no headers in time: 504')
  t.same(JSON.parse(stalled.text), { error: `upstream 'm-1' sent no headers within 400 ms` })
  t.ok(took >= 380 && took < 2000, `answered after ${Math.round(took)} ms (UPSTREAM_HEADERS_TIMEOUT_MS 400)`)
  await until('the GPU to be free', async () => (await fleet.heldGpus()).length === 0, 1000)

  sim.behaviour = { kind: 'normal' }
  const after = performance.now()
  const ok = await post(`${gw.url}/api/generate`, { model: 'm', prompt: 'fine', stream: false })
  t.equal(ok.status, 200, 'the next request is served')
  t.ok(performance.now() - after < 1000, 'without waiting for a lease to expire')
  await fleet.recorder.whenIdle()
  t.same(fleet.recorder.overlaps, [])
  await until('every GPU to be free', async () => (await fleet.heldGpus()).length === 0).catch(() => {})
  t.same(await fleet.heldGpus(), [], 'every GPU free')
})

t.test('Redis restarting during traffic: 503 while it is away, no GPU handed out twice, recovery by itself', async (t) => {
  const redis = await privateRedis(t)
  // Long enough that the reconnection (ioredis backs off up to 1 s) comes before a replica has to
  // give up leases it could not renew (half the ttl). Grants pause for one ttl after the restart.
  const TTL = 3000
  const fleet = await startFleet(t, {
    gpus: [1, 1, 1],
    upstreams: [
      { model: 'long', gpus: [0], simulator: { tokens: 20, tokenDelayMs: 100 } },
      { model: 'other', gpus: [1], simulator: { tokens: 20, tokenDelayMs: 100 } },
      { model: 'quick', gpus: [2], simulator: { tokens: 2, tokenDelayMs: 5 } }
    ],
    options: { REDIS_URL: redis.url, LEASE_TTL_MS: TTL }
  })
  const a = await fleet.replica()
  const b = await fleet.replica()
  const store = await storeAt(t, redis.url, fleet.prefix)

  // In flight on both replicas, and one request queued behind the first.
  const onA = streamGenerate(a.url, 'long', 'in flight on A')
  const onB = streamGenerate(b.url, 'other', 'in flight on B')
  await onA.first
  await onB.first
  const waiting = post(`${b.url}/api/generate`, { model: 'long', prompt: 'queued on B', stream: false, options: { num_predict: 1 } })
  await until('the request to be queued', async () => await queued(store, fleet) === 1)

  await redis.kill()
  const killedAt = performance.now()
  for (const gw of [a, b]) await until('readiness to turn false', async () => (await get(`${gw.url}/health/ready`)).status === 503, 3000)
  const refused = await post(`${b.url}/api/generate`, { model: 'quick', prompt: 'while redis is down' })
  t.equal(refused.status, 503, 'a new request while Redis is down: 503')
  t.same(JSON.parse(refused.text), { error: 'lease store unavailable' })
  t.ok(refused.headers.get('retry-after'), 'with Retry-After')
  const health = await get(`${a.url}/health`)
  t.equal(health.status, 503, '/health: 503')
  t.equal(health.body.redis, 'down', '/health names Redis')

  await sleep(Math.max(0, 300 - (performance.now() - killedAt)))
  await redis.start()
  const restartedAt = performance.now()
  t.comment(`Redis was away ${Math.round(restartedAt - killedAt)} ms`)

  // Hammer the store from both replicas while the streams still run: the GPU held by the stream
  // on A must not be granted to anyone, though Redis has forgotten the lease.
  const resumed: number[] = []
  await Promise.all([a, b].map(async (gw) => {
    const r = await until('service to resume', async () => {
      const res = await post(`${gw.url}/api/generate`, { model: 'quick', prompt: `after restart via ${gw.url}`, stream: false })
      return res.status === 200 ? res : undefined
    }, 3 * TTL)
    resumed.push(performance.now() - restartedAt)
    t.equal(r.status, 200)
  }))
  t.comment(`service resumed ${resumed.map(Math.round).join(' and ')} ms after Redis came back`)
  const grabs = Array.from({ length: 4 }, (_, i) =>
    post(`${(i % 2 === 0 ? a : b).url}/api/generate`, { model: 'long', prompt: `grab ${i}`, stream: false, options: { num_predict: 1 } }))

  const [doneA, doneB] = await Promise.all([onA.done, onB.done])
  for (const [name, s] of [['A', doneA], ['B', doneB]] as const) {
    t.equal(s.status, 200, `the stream in flight on ${name} finished`)
    t.equal(s.lines.length, 21, `all of it (${name})`)
    t.equal(s.lines.at(-1)?.done, true)
    t.notOk(s.lines.some((l) => 'error' in l), `without an error (${name})`)
  }
  const waited = await waiting
  t.equal(waited.status, 200, 'the request queued before the restart was served after it')
  t.same((await Promise.all(grabs)).map((r) => r.status), [200, 200, 200, 200])

  await fleet.recorder.whenIdle()
  t.same(fleet.recorder.overlaps, [], 'no GPU was ever held by two requests')
  await until('every lease to be released', async () => (await heldGpusAt(redis.url, fleet.prefix)).length === 0, 3000)
  t.same(await heldGpusAt(redis.url, fleet.prefix), [], 'no lease left stuck')
  t.equal(await queued(store, fleet), 0, 'no waiter left')
})

t.test('a replica cut off from Redis stops its in-flight request before its lease can expire', async (t) => {
  const TTL = 1500
  const fleet = await startFleet(t, {
    gpus: [1],
    upstreams: [{ model: 'm', gpus: [0], simulator: { tokens: 60, tokenDelayMs: 50 } }],
    options: { LEASE_TTL_MS: TTL }
  })
  const redisUrl = new URL(String(fleet.options.REDIS_URL))
  const proxy = await tcpProxy(t, { host: redisUrl.hostname, port: Number(redisUrl.port || 6379) })
  const viaProxy = new URL(redisUrl)
  viaProxy.hostname = '127.0.0.1'
  viaProxy.port = String(proxy.port)
  const cutOff = await fleet.replica({ REDIS_URL: viaProxy.toString() })
  const other = await fleet.replica()
  const store = await storeAt(t, redisUrl.toString(), fleet.prefix)

  const stream = streamGenerate(cutOff.url, 'm', 'on the replica that loses Redis')
  await stream.first
  await proxy.cut()
  const cutAt = performance.now()
  const next = post(`${other.url}/api/generate`, { model: 'm', prompt: 'on the other replica', stream: false, options: { num_predict: 1 } })
  await until('the other replica\'s request to queue', async () => await queued(store, fleet) === 1)

  const broken = await stream.done
  const stoppedAfter = performance.now() - cutAt
  t.comment(`the cut-off replica stopped its stream ${Math.round(stoppedAfter)} ms after losing Redis (LEASE_TTL_MS ${TTL}), after ${broken.lines.length} lines`)
  t.ok(broken.lines.length < 60, 'the stream did not run to its end')
  t.ok(stoppedAfter < TTL, 'it stopped before its lease could expire')
  const served = await next
  t.equal(served.status, 200, 'the other replica got the GPU once the lease expired')
  await fleet.recorder.whenIdle()
  t.same(fleet.recorder.overlaps, [], 'no GPU ever held by two requests')
  await proxy.restore()
  await until('the cut-off replica to be ready again', async () => (await get(`${cutOff.url}/health/ready`)).status === 200, 5000)
  t.equal((await post(`${cutOff.url}/api/generate`, { model: 'm', prompt: 'back', stream: false, options: { num_predict: 1 } })).status, 200,
    'and serves again once Redis is back')
  await until('every GPU to be free', async () => (await fleet.heldGpus()).length === 0).catch(() => {})
  t.same(await fleet.heldGpus(), [], 'every GPU free')
})

t.test('Redis restarting while one replica cannot reach it: its GPU is not granted under its running request', async (t) => {
  const redis = await privateRedis(t)
  const TTL = 3000
  const fleet = await startFleet(t, {
    gpus: [1],
    upstreams: [{ model: 'm', gpus: [0], simulator: { tokens: 80, tokenDelayMs: 50 } }],
    options: { REDIS_URL: redis.url, LEASE_TTL_MS: TTL }
  })
  const redisPort = Number(new URL(redis.url).port)
  const proxy = await tcpProxy(t, { host: '127.0.0.1', port: redisPort })
  const cutOff = await fleet.replica({ REDIS_URL: `redis://127.0.0.1:${proxy.port}` })
  // Replicas' timers run in phases of their own: start the other one part of a period later.
  await sleep(500)
  const other = await fleet.replica()
  const store = await storeAt(t, redis.url, fleet.prefix)

  const stream = streamGenerate(cutOff.url, 'm', 'on the replica that stays cut off')
  await stream.first
  await redis.kill()
  await proxy.cut()
  const killedAt = performance.now()
  await sleep(200)
  await redis.start()
  // The other replica finds Redis empty; the holder of GPU 0 cannot tell it the GPU is taken.
  const next = await until('the other replica to take a request again', async () => {
    const r = post(`${other.url}/api/generate`, { model: 'm', prompt: 'on the other replica', stream: false, options: { num_predict: 1 } })
    await sleep(100)
    const settled = await Promise.race([r, sleep(1).then(() => undefined)])
    return settled?.status === 503 ? undefined : r
  }, 5000)
  await sleep(TTL - (performance.now() - killedAt))
  await proxy.restore()

  const served = await next
  const broken = await stream.done
  t.equal(served.status, 200, 'the other replica\'s request was served')
  const sim = fleet.upstreams[0]
  const grantedAt = (sim.requests.find((r) => r.body?.prompt === 'on the other replica')?.at ?? NaN) - killedAt
  const stoppedAt = (fleet.recorder.events.find((e) => e.type === 'end')?.at ?? NaN) - killedAt
  t.comment(`the cut-off replica's stream ${broken.lines.length < 81 ? `stopped after ${broken.lines.length} lines` : 'ran to its end'}, ` +
    `${Math.round(stoppedAt)} ms after Redis died; the other replica's request reached the GPU at ${Math.round(grantedAt)} ms`)
  await fleet.recorder.whenIdle()
  t.same(fleet.recorder.overlaps, [], 'no GPU ever held by two requests')
  await until('every lease to be released', async () => (await heldGpusAt(redis.url, fleet.prefix)).length === 0, 3000)
  t.equal(await queued(store, fleet), 0, 'no waiter left')

  await proxy.cut()
  await t.resolves(cutOff.close(), 'a replica whose Redis is unreachable still closes cleanly')
})

t.test('MariaDB going away: the last good inventory keeps serving, /health says so', async (t) => {
  const fleet = await startFleet(t, { gpus: [1], upstreams: [{ model: 'm', gpus: [0] }] })
  const server = serverUrl()
  const proxy = await tcpProxy(t, { host: server.hostname, port: Number(server.port || 3306) })
  const viaProxy = new URL(fleet.db.url)
  viaProxy.hostname = '127.0.0.1'
  viaProxy.port = String(proxy.port)
  const gw = await fleet.replica({ MARIADB_URL: viaProxy.toString(), INVENTORY_REFRESH_MS: 200 })
  const generate = async (prompt: string) => await post(`${gw.url}/api/generate`, { model: 'm', prompt, stream: false })

  t.equal((await generate('before')).status, 200)
  t.equal((await get(`${gw.url}/health`)).status, 200)

  for (const how of ['refuses connections', 'stops answering'] as const) {
    if (how === 'refuses connections') await proxy.cut()
    else proxy.silence()
    const wentAt = performance.now()
    try {
      const health = await get(`${gw.url}/health`)
      t.comment(`${how}: /health answered in ${Math.round(performance.now() - wentAt)} ms`)
      t.equal(health.status, 503, `${how}: /health 503`)
      t.equal(health.body.mariadb, 'down', `${how}: /health names MariaDB`)
      t.equal(health.body.redis, 'ok')
      const statuses: number[] = []
      for (let i = 0; i < 5; i++) {
        statuses.push((await generate(`while MariaDB ${how} #${i}`)).status)
        await sleep(150)
      }
      t.same(statuses, [200, 200, 200, 200, 200], `${how}: requests still served from the last good inventory`)
      const stale = await until('the inventory to report the failed refresh', async () => {
        const h = await get(`${gw.url}/health`)
        return h.body.inventory?.ok === false ? h : undefined
      }, 9000)
      t.comment(`${how}: inventory refresh reported failing after ${Math.round(performance.now() - wentAt)} ms: ${stale.body.inventory.error}`)
      t.equal((await generate(`still MariaDB ${how}`)).status, 200, `${how}: still served`)
    } finally {
      await proxy.restore()
    }
    const backAt = performance.now()
    await until('/health to recover', async () => {
      const h = await get(`${gw.url}/health`)
      return h.status === 200 && h.body.inventory.ok === true && h.body.inventory.loadedAt > Date.now() - 1000
    }, 8000)
    t.comment(`${how}: healthy again ${Math.round(performance.now() - backAt)} ms after MariaDB came back`)
    t.pass(`${how}: healthy again by itself`)
  }
  await until('every GPU to be free', async () => (await fleet.heldGpus()).length === 0).catch(() => {})
  t.same(await fleet.heldGpus(), [])
})

t.test('replicas in child processes', async (t) => {
  await t.test('a replica killed while holding a lease: the others get its GPU back within the ttl', async (t) => {
    const TTL = 1500
    const fleet = await startFleet(t, {
      gpus: [1],
      upstreams: [{ model: 'm', gpus: [0], simulator: { tokens: 100, tokenDelayMs: 50 } }],
      options: { LEASE_TTL_MS: TTL }
    })
    const doomed = await spawnGateway(t, envOf(fleet, { LEASE_TTL_MS: TTL }))
    const survivor = await fleet.replica()
    const store = await storeAt(t, String(fleet.options.REDIS_URL), fleet.prefix)
    const sim = fleet.upstreams[0]

    const stream = streamGenerate(doomed.url, 'm', 'held by the doomed replica')
    await stream.first
    const doomedWaiters = [0, 1].map(async (i) =>
      await post(`${doomed.url}/api/generate`, { model: 'm', prompt: `queued on the doomed replica #${i}`, stream: false }).catch((err: Error) => err.message))
    await until('two waiters on the doomed replica', async () => await queued(store, fleet) === 2)
    const survivorWaiter = post(`${survivor.url}/api/generate`, { model: 'm', prompt: 'queued on the survivor', stream: false, options: { num_predict: 1 } })
    await until('the survivor\'s waiter', async () => await queued(store, fleet) === 3)

    doomed.proc.kill('SIGKILL')
    const killedAt = performance.now()
    const served = await survivorWaiter
    t.equal(served.status, 200, 'the survivor\'s waiter was served')
    const reached = sim.requests.find((r) => r.body?.prompt === 'queued on the survivor')
    const after = (reached?.at ?? Infinity) - killedAt
    t.comment(`the GPU reached the survivor's waiter ${Math.round(after)} ms after the kill (LEASE_TTL_MS ${TTL}, renewal and poll every ${TTL / 3} ms)`)
    // Expiry comes at most one ttl after the last renewal; the survivor notices at its next poll.
    // (+1 s for a machine busy with other work: timers and Redis calls run late)
    t.ok(after < TTL + TTL / 3 + 1500, `within LEASE_TTL_MS plus one poll (+1.5 s slack): ${Math.round(after)} ms`)
    t.ok(after > TTL / 3, 'not before the dead replica\'s lease could have expired')
    t.notOk(sim.requests.some((r) => /queued on the doomed/.test(String(r.body?.prompt))), 'the dead replica\'s waiters never reached a GPU')
    t.equal((await stream.done).status, 0, 'the stream through the dead replica broke off')
    t.ok((await Promise.all(doomedWaiters)).every((r) => typeof r === 'string'), 'its waiting clients saw their connection fail')
    t.equal(await queued(store, fleet), 0, 'the dead replica\'s waiters are gone from the queue')
    await fleet.recorder.whenIdle()
    t.same(fleet.recorder.overlaps, [], 'no GPU ever held by two requests')
    await until('every GPU to be free', async () => (await fleet.heldGpus()).length === 0).catch(() => {})
    t.same(await fleet.heldGpus(), [], 'every GPU free')
  })

  await t.test('SIGTERM: not ready, no new requests, in-flight streams finish, leases released, exit 0', async (t) => {
    const fleet = await startFleet(t, {
      gpus: [1, 1],
      upstreams: [
        { model: 'm', gpus: [0], simulator: { tokens: 15, tokenDelayMs: 60 } },
        { model: 'n', gpus: [1] }
      ]
    })
    const gw = await spawnGateway(t, envOf(fleet, { SHUTDOWN_GRACE_MS: 10000 }))
    const store = await storeAt(t, String(fleet.options.REDIS_URL), fleet.prefix)
    t.equal((await get(`${gw.url}/health/ready`)).status, 200, 'ready before')

    const stream = streamGenerate(gw.url, 'm', 'in flight at SIGTERM')
    await stream.first
    const waiter = post(`${gw.url}/api/generate`, { model: 'm', prompt: 'queued at SIGTERM', stream: false })
      .catch((err: Error) => ({ status: 0, headers: new Headers(), text: err.message }))
    await until('the waiter to be queued', async () => await queued(store, fleet) === 1)

    gw.proc.kill('SIGTERM')
    const termAt = performance.now()
    const ready = await until('readiness to change', async () => {
      const r = await get(`${gw.url}/health/ready`).catch((err: Error) => ({ status: 0, body: err.message }))
      return r.status !== 200 ? r : undefined
    }, 3000)
    t.equal(ready.status, 503, '/health/ready: 503 while draining')
    const fresh = await post(`${gw.url}/api/generate`, { model: 'n', prompt: 'after SIGTERM', stream: false })
      .catch((err: Error) => ({ status: 0, headers: new Headers(), text: err.message }))
    t.equal(fresh.status, 503, 'a new request is not taken: 503')
    t.match(JSON.parse(fresh.text), { error: 'gateway is shutting down' }, 'in the contract format')
    t.ok(Number(fresh.headers.get('retry-after')) > 0, 'with Retry-After')
    t.notOk(fleet.upstreams[1].requests.length > 0, 'and never reached an upstream')

    const finished = await stream.done
    const streamEnd = performance.now()
    t.equal(finished.status, 200, 'the in-flight stream finished')
    t.equal(finished.lines.length, 16, 'all of it')
    t.equal(finished.lines.at(-1)?.done, true)
    const queuedAnswer = await waiter
    t.comment(`the request queued at SIGTERM got ${queuedAnswer.status} ${queuedAnswer.text.slice(0, 80)}`)
    t.equal(queuedAnswer.status, 503, 'the request still waiting at SIGTERM is told to go elsewhere: 503')

    const exit = await Promise.race([gw.exited, sleep(8000).then(() => undefined)])
    t.ok(exit != null, 'the process exited')
    t.same(exit, { code: 0, signal: null }, 'exit code 0')
    t.comment(`exited ${Math.round(performance.now() - streamEnd)} ms after the stream ended (${Math.round(performance.now() - termAt)} ms after SIGTERM)`)
    t.same(await fleet.heldGpus(), [], 'every lease released')
    t.equal(await queued(store, fleet), 0, 'no waiter left in the queue')
  })
})

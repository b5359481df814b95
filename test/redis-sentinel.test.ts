// Redis Sentinel (issue 12): a master, a replica and three sentinels under two gateway replicas
// with continuous load over three GPUs. The master is SIGKILLed after the replica was made to
// miss the lease of a stream still running (what asynchronous replication can lose): no GPU is
// handed out twice across the failover, service comes back by itself, and everything ends free.
import t from 'tap'
import { performance } from 'node:perf_hooks'
import { setTimeout as sleep } from 'node:timers/promises'
import { execFile } from 'node:child_process'
import { promisify } from 'node:util'
import { Redis } from 'ioredis'
import { Ollama } from 'ollama'
import { assertAllFree, startFleet, type Gateway } from './helpers/gateway.js'
import { startSentinelSetup } from './helpers/redis-processes.js'

const run = promisify(execFile)
const DOWN_AFTER_MS = 1000
const LEASE_TTL_MS = 6000

async function stream (gw: Gateway, model: string, tag: string): Promise<number> {
  const ollama = new Ollama({ host: gw.url })
  try {
    let last: any
    for await (const part of await ollama.generate({ model, prompt: tag, stream: true })) last = part
    return last?.done === true ? 200 : 0
  } catch (err) {
    const status = (err as { status_code?: number }).status_code
    if (status != null) return status
    throw err
  }
}

async function until (what: string, check: () => Promise<boolean>, timeoutMs = 15_000): Promise<void> {
  const deadline = performance.now() + timeoutMs
  while (!(await check())) {
    if (performance.now() > deadline) throw new Error(`timed out waiting for ${what}`)
    await sleep(20)
  }
}

t.test('SIGKILL of the Sentinel master under load: no GPU twice, service back by itself', async (t) => {
  const setup = await startSentinelSetup(t, DOWN_AFTER_MS)
  // The replica takes local writes, so the test can make it miss a lease the master holds.
  const replicaConn = new Redis({ port: setup.replica.port, lazyConnect: true })
  await replicaConn.connect()
  await replicaConn.config('SET', 'replica-read-only', 'no')
  t.teardown(() => replicaConn.disconnect())

  const fleet = await startFleet(t, {
    gpus: [1, 1, 1],
    upstreams: [
      { model: 'alpha', gpus: [0], simulator: { tokens: 5, tokenDelayMs: 30 } },
      { model: 'alpha', gpus: [1], simulator: { tokens: 5, tokenDelayMs: 30 } },
      { model: 'alpha', gpus: [2], simulator: { tokens: 5, tokenDelayMs: 30 } },
      { model: 'long', gpus: [0], simulator: { tokens: 35, tokenDelayMs: 100 } }
    ],
    options: {
      REDIS_URL: '',
      REDIS_SENTINELS: setup.addresses,
      REDIS_SENTINEL_MASTER: setup.name,
      LEASE_TTL_MS,
      QUEUE_TIMEOUT_MS: 60_000
    }
  })
  const replicas = [await fleet.replica(), await fleet.replica()]
  const health = await (await fetch(`${replicas[0].url}/health`)).json() as Record<string, unknown>
  t.match(health, { status: 'ok', redis: 'ok', redisTopology: 'sentinel', redisMaster: `127.0.0.1:${setup.master.port}` }, '/health names the Sentinel topology')

  // Six clients, three per replica, each sending the next request as soon as one ends.
  let stop = false
  t.teardown(() => { stop = true }) // also when an assertion below throws
  const results: Array<{ sentAt: number, endedAt: number, status: number | string }> = []
  const load = Promise.all(Array.from({ length: 6 }, async (_, client) => {
    for (let i = 0; !stop; i++) {
      const sentAt = performance.now()
      const status = await stream(replicas[client % 2], 'alpha', `alpha ${client}/${i}`).catch((err: Error) => err.message)
      results.push({ sentAt, endedAt: performance.now(), status })
      if (status !== 200) await sleep(50)
    }
  }))
  await sleep(1000)

  // A stream that runs across the failover, on a GPU alpha's waiters also want.
  const longRequest = stream(replicas[0], 'long', 'across the failover').catch((err: Error) => err.message)
  await until('the long stream to hold its GPU', async () => fleet.upstreams[3].requests.length === 1)
  const master = new Redis({ port: setup.master.port, lazyConnect: true })
  await master.connect()
  const longToken = await master.get(`${fleet.prefix}gpu:${fleet.gpuIds[0]}`)
  t.ok(longToken, 'the long stream holds GPU 0 on the master')
  // What asynchronous replication can lose: the replica forgets that lease.
  await until('the replica to have the lease', async () => await replicaConn.get(`${fleet.prefix}gpu:${fleet.gpuIds[0]}`) === longToken)
  await replicaConn.del(`${fleet.prefix}gpu:${fleet.gpuIds[0]}`, `${fleet.prefix}lease:${longToken as string}`)
  master.disconnect()

  const killedAt = performance.now()
  const inFlightAtKill = fleet.upstreams.map((u) => u.requests.length)
  await setup.master.kill()
  t.comment(`master on port ${setup.master.port} SIGKILLed`)

  // The gateways say they are failing over, then the sentinels promote the replica.
  await until('/health to report the failover', async () => {
    const h = await (await fetch(`${replicas[1].url}/health`)).json() as { redis: string }
    return h.redis === 'failing-over'
  })
  await until('the sentinels to promote the replica', async () => await setup.masterPort().catch(() => 0) === setup.replica.port)
  const promotedAt = performance.now()
  // generous: the gateways find the new master through the sentinels, slower on a loaded machine
  await until('the new master to pause grants', async () => await replicaConn.pttl(`${fleet.prefix}pause`) > 0, 30_000)
  t.pass('the new master pauses grants: its data may miss the last grants of the old one')

  // Service is back when an upstream sees a request granted by the new master: one arriving after
  // the promotion (nothing can be granted between the kill and the promotion; a request granted
  // by the old master just before the kill may reach its upstream a few ms after it, seen once).
  const arrivals = (): number[] => fleet.upstreams.flatMap((u) => u.requests.map((r) => r.at)).filter((at) => at > promotedAt)
  await until('an upstream to see a new request', async () => arrivals().length > 0, 30_000)
  const backAt = Math.min(...arrivals())
  // Service goes on: ten requests sent after that are answered (bounded, for a busy machine).
  await until('ten more requests to be served', async () => results.filter((r) => r.status === 200 && r.sentAt > backAt).length >= 10, 15_000).catch(() => {})
  stop = true
  await load
  const longStatus = await longRequest

  const outage = backAt - killedAt
  t.comment(`failover: replica promoted ${Math.round(promotedAt - killedAt)} ms after the kill ` +
    `(down-after-milliseconds ${DOWN_AFTER_MS}); first grant ${Math.round(outage)} ms after the kill (LEASE_TTL_MS ${LEASE_TTL_MS})`)
  t.ok(outage >= LEASE_TTL_MS * 5 / 6, `no grant before every holder could re-assert its leases (${Math.round(outage)} ms)`)
  t.ok(outage < DOWN_AFTER_MS + 5000 + LEASE_TTL_MS, `service back within down-after + failover + one lease ttl (${Math.round(outage)} ms)`)
  t.equal(longStatus, 200, 'the stream running across the failover finished')

  const afterKill = results.filter((r) => r.endedAt > killedAt)
  const others = results.filter((r) => r.status !== 200 && r.status !== 503)
  t.same(others, [], 'every request answered 200, or 503 while no master was known')
  const served = results.filter((r) => r.status === 200 && r.sentAt > backAt).length
  t.ok(served >= 10, `requests served again after the failover (${served})`)
  t.comment(`${results.length} requests: ${results.filter((r) => r.status === 200).length} served, ` +
    `${afterKill.filter((r) => r.status === 503).length} turned away with 503 during the failover; ` +
    `${inFlightAtKill.reduce((a, b) => a + b, 0)} upstream requests before the kill`)
  await fleet.recorder.whenIdle()
  t.same(fleet.recorder.overlaps, [], 'no GPU ever held by two requests')
  for (const gw of replicas) await assertAllFree(t, gw)
  const after = await (await fetch(`${replicas[0].url}/health`)).json() as Record<string, unknown>
  t.match(after, { redisTopology: 'sentinel', redisMaster: `127.0.0.1:${setup.replica.port}` }, '/health names the new master')
})

t.test('password-protected data nodes and sentinels: REDIS_PASSWORD and REDIS_SENTINEL_PASSWORD reach both connections', async (t) => {
  const password = 'data-node-secret'
  const sentinelPassword = 'sentinel-secret'
  const setup = await startSentinelSetup(t, DOWN_AFTER_MS, { password, sentinelPassword })
  // Both ask for a password: without one, a client is refused.
  const cli = async (port: number, ...args: string[]): Promise<string> => (await run('redis-cli', ['-p', String(port), ...args])).stdout
  t.match(await cli(setup.sentinels[0].port, 'SENTINEL', 'get-master-addr-by-name', setup.name), /NOAUTH/, 'a sentinel refuses a client without its password')
  t.match(await cli(setup.master.port, 'GET', 'x'), /NOAUTH/, 'the master refuses a client without its password')

  const fleet = await startFleet(t, {
    gpus: [1],
    upstreams: [{ model: 'alpha', gpus: [0], simulator: { tokens: 3, tokenDelayMs: 5 } }],
    options: {
      REDIS_URL: '',
      REDIS_SENTINELS: setup.addresses,
      REDIS_SENTINEL_MASTER: setup.name,
      REDIS_PASSWORD: password,
      REDIS_SENTINEL_PASSWORD: sentinelPassword,
      LEASE_TTL_MS
    }
  })
  const gw = await fleet.replica()
  const health = await (await fetch(`${gw.url}/health`)).json()
  t.match(health, { status: 'ok', redis: 'ok', redisTopology: 'sentinel', redisMaster: `127.0.0.1:${setup.master.port}` }, 'connected to the master the sentinels name')
  t.equal(await stream(gw, 'alpha', 'through the passwords'), 200, 'a request is granted and served')
  // The lease went through the password-protected master (the subscriber too: the grant path needs both).
  const master = new Redis({ port: setup.master.port, password, lazyConnect: true })
  await master.connect()
  t.ok(await master.exists(`${fleet.prefix}epoch`) === 1, 'the lease store lives on that master')
  master.disconnect()
  const subscribers = await (async () => {
    const c = new Redis({ port: setup.master.port, password, lazyConnect: true })
    await c.connect()
    try {
      return await c.call('PUBSUB', 'NUMSUB', `${fleet.prefix}events`) as [string, number]
    } finally {
      c.disconnect()
    }
  })()
  t.equal(Number(subscribers[1]), 1, 'the subscriber connection is subscribed on the master')
  await assertAllFree(t, gw)
})

// Configuration as the contract promises it (issue 16): `.env` read and its precedence, empty =
// unset, one-line errors naming the variable, the PORT defaults, OLLAMA_KEEP_ALIVE end to end,
// the REDIS_KEY_PREFIX default, ConnectionStrings__Redis through the gateway, a database change
// routable within INVENTORY_REFRESH_MS, and the shipped inventory.default.json.
import t from 'tap'
import { mkdtemp, writeFile } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { fileURLToPath } from 'node:url'
import { setTimeout as sleep } from 'node:timers/promises'
import Fastify from 'fastify'
import { Redis } from 'ioredis'
import maestro from '../app.js'
import { ConfigError, configSources, serverSettings } from '../services/config/config.js'
import { loadInventoryFromFile } from '../services/fleet/inventory.js'
import { seedInventory } from './helpers/database.js'
import { startFleet, startGateway } from './helpers/gateway.js'
import { privateRedis } from './helpers/private-redis.js'
import { REDIS_URL } from './helpers/redis.js'

const ROOT = fileURLToPath(new URL('..', import.meta.url))

/** The gateway registered from these options (embedded, the shipped inventory file), without listening. */
async function configured (t: Parameters<typeof startGateway>[0], options: Record<string, unknown>): Promise<void> {
  const app = Fastify({ logger: false })
  t.teardown(async () => await app.close())
  await app.register(maestro, { INVENTORY_FILE: join(ROOT, 'inventory.default.json'), ...options })
  await app.ready()
}

/** Keys holding a GPU under `prefix` right now. */
async function heldUnder (prefix: string): Promise<string[]> {
  const redis = new Redis(REDIS_URL)
  try {
    return (await redis.keys(prefix.replace(/[*?[\]\\]/g, '\\$&') + 'gpu:*')).map((k) => k.slice(prefix.length))
  } finally {
    redis.disconnect()
  }
}

/** Starts a stream through `gwUrl`, and reads which GPUs are held under `prefix` while it runs. */
async function leasedUnder (gwUrl: string, prefix: string): Promise<string[]> {
  const res = await fetch(`${gwUrl}/api/generate`, { method: 'POST', body: '{"model":"m","prompt":"x"}' })
  const held = await heldUnder(prefix)
  await res.text()
  return held
}

t.test('.env is read from the working directory; the environment beats it, options beat both; empty means unset', async (t) => {
  const fleet = await startFleet(t, { gpus: [1], upstreams: [{ model: 'm', gpus: [0], simulator: { tokens: 20, tokenDelayMs: 10 } }] })
  const dir = await mkdtemp(join(tmpdir(), 'maestro-env-'))
  await writeFile(join(dir, '.env'), `REDIS_KEY_PREFIX=${fleet.prefix}\nQUEUE_MAX=7\nSTARVATION_MS=1234\nLEASE_TTL_MS=4000\nBODY_LIMIT=\n`)
  const cwd = process.cwd()
  process.chdir(dir)
  t.teardown(() => process.chdir(cwd))

  // the layers as the config plugin merges them (Object.assign, later wins)
  const env = { STARVATION_MS: '2345', LEASE_TTL_MS: '', QUEUE_TIMEOUT_MS: '' }
  const sources = configSources({ LEASE_TTL_MS: 5000 }, env)
  t.same(sources[0], { REDIS_KEY_PREFIX: fleet.prefix, QUEUE_MAX: '7', STARVATION_MS: '1234', LEASE_TTL_MS: '4000' }, '.env read, its empty BODY_LIMIT dropped')
  t.same(sources[1], { STARVATION_MS: '2345' }, 'empty environment values dropped')
  t.match(Object.assign({}, ...sources), { QUEUE_MAX: '7', STARVATION_MS: '2345', LEASE_TTL_MS: 5000 }, 'environment over .env, options over both')

  // through the gateway: the prefix from .env decides where its leases go
  const { REDIS_KEY_PREFIX: _prefix, ...options } = fleet.options
  const saved = process.env.REDIS_KEY_PREFIX
  process.env.REDIS_KEY_PREFIX = '' // set but empty: unset, so .env's counts
  t.teardown(() => { if (saved === undefined) delete process.env.REDIS_KEY_PREFIX; else process.env.REDIS_KEY_PREFIX = saved })
  const fromDotenv = await startGateway(t, { ...options, dotenv: true })
  t.same(await leasedUnder(fromDotenv.url, fleet.prefix), ['gpu:' + fleet.gpuIds[0]], 'the lease is under the prefix .env gave')
  const overridden = await startGateway(t, { ...options, dotenv: true, REDIS_KEY_PREFIX: fleet.prefix + 'opt:' })
  t.same(await leasedUnder(overridden.url, fleet.prefix + 'opt:'), ['gpu:' + fleet.gpuIds[0]], 'an option beats .env')
})

t.test('REDIS_KEY_PREFIX defaults to maestro:', async (t) => {
  const fleet = await startFleet(t, { gpus: [1], upstreams: [{ model: 'm', gpus: [0], simulator: { tokens: 20, tokenDelayMs: 10 } }] })
  const { REDIS_KEY_PREFIX: _prefix, ...options } = fleet.options
  const gw = await startGateway(t, options)
  t.ok((await leasedUnder(gw.url, 'maestro:')).includes('gpu:' + fleet.gpuIds[0]), 'the lease key starts with maestro:')
})

t.test('a bad value is one line naming the variable', async (t) => {
  for (const [name, value] of [['QUEUE_MAX', 'many'], ['LEASE_TTL_MS', '10'], ['REDIS_URL', 'http://x'], ['OLLAMA_KEEP_ALIVE', '1e999']]) {
    const err = await configured(t, { dotenv: false, [name]: value }).then(() => undefined, (e: Error) => e)
    t.ok(err instanceof Error, `${name}=${value} is refused`)
    // what server.ts prints: the message, its 'env/' prefix dropped
    const line = String(err?.message).replace(/^env\//, '')
    t.match(line, new RegExp(`^${name}\\b`), `it names ${name}: ${line}`)
    t.notMatch(line, /\n/, 'on one line')
  }
  const portError = (() => { try { serverSettings([{ PORT: 'eighty' }]) } catch (e) { return e } })()
  t.ok(portError instanceof ConfigError)
  t.match((portError as Error).message, /^PORT\b[^\n]*$/)
})

t.test('PORT defaults: 5000, 8080 in production; PORT wins', async (t) => {
  t.equal(serverSettings([{}]).port, 5000)
  t.equal(serverSettings([{ NODE_ENV: 'production' }]).port, 8080)
  t.equal(serverSettings([{ NODE_ENV: 'production' }, { PORT: '9000' }]).port, 9000)
  t.equal(serverSettings([{ PORT: '' }].map((s) => ({ ...s, PORT: undefined }))).port, 5000)
})

t.test('inventory.default.json: valid, one * assignment on the local Ollama', async (t) => {
  const snapshot = await loadInventoryFromFile(join(ROOT, 'inventory.default.json'))
  t.same(snapshot.warnings, [], 'nothing left out')
  t.equal(snapshot.assignments.length, 1)
  t.match(snapshot.assignments[0], { name: 'local-ollama', model: '*', kind: 'llm', url: 'http://127.0.0.1:11434' })
  t.equal(snapshot.gpus.length, 1)
})

t.test('OLLAMA_KEEP_ALIVE end to end: forced durations and passthrough', async (t) => {
  const fleet = await startFleet(t, { gpus: [1], upstreams: [{ model: 'm', gpus: [0], simulator: { tokens: 1 } }] })
  const sim = fleet.upstreams[0]
  const sent = async (gwUrl: string, body: Record<string, unknown>): Promise<unknown> => {
    const res = await fetch(`${gwUrl}/api/generate`, { method: 'POST', body: JSON.stringify({ model: 'm', prompt: 'x', stream: false, ...body }) })
    t.equal(res.status, 200)
    await res.text()
    return sim.requests.at(-1)?.body.keep_alive
  }
  const forced = await fleet.replica({ OLLAMA_KEEP_ALIVE: '10m' })
  t.equal(await sent(forced.url, {}), '10m', 'a duration string is forced as a string')
  t.equal(await sent(forced.url, { keep_alive: 0 }), '10m', 'over the client\'s')
  // and the upstream keeps the model that long: /api/ps says so
  const ps = await (await fetch(`${sim.url}/api/ps`)).json() as { models: Array<{ expires_at: string }> }
  const left = Date.parse(ps.models[0].expires_at) - Date.now()
  t.ok(left > 9 * 60_000 && left <= 10 * 60_000 + 1000, `resident for 10 more minutes (${Math.round(left / 1000)} s)`)
  const seconds = await fleet.replica({ OLLAMA_KEEP_ALIVE: '300' })
  t.equal(await sent(seconds.url, {}), 300, 'a number is forced as a number (seconds)')
  const passthrough = await fleet.replica({ OLLAMA_KEEP_ALIVE: 'passthrough' })
  t.equal(await sent(passthrough.url, { keep_alive: '2m' }), '2m', 'passthrough keeps the client\'s')
  t.equal(await sent(passthrough.url, {}), undefined, 'and adds none')
})

t.test('ConnectionStrings__Redis reaches Redis through the gateway (REDIS_URL unset)', async (t) => {
  const fleet = await startFleet(t, { gpus: [1], upstreams: [{ model: 'm', gpus: [0], simulator: { tokens: 20, tokenDelayMs: 20 } }] })
  // A Redis other than the default 127.0.0.1:6379 (the shared one): a gateway that ignored the
  // connection string would take its lease there, and the test would still pass.
  const own = await privateRedis(t)
  const ownClient = new Redis(own.url)
  t.teardown(() => ownClient.disconnect())
  const { REDIS_URL: _unused, ...options } = fleet.options
  const saved = process.env.REDIS_URL // REDIS_URL in the environment would win over the connection string
  delete process.env.REDIS_URL
  t.teardown(() => { if (saved !== undefined) process.env.REDIS_URL = saved })
  // a Redis just started holds grants for one ttl less its uptime (leases from before its start
  // may exist): a short ttl, so the lease comes within a second rather than 30
  const gw = await startGateway(t, { ...options, dotenv: false, LEASE_TTL_MS: 1000, ConnectionStrings__Redis: `127.0.0.1:${own.port},abortConnect=false` })
  const held = async (): Promise<string[]> => (await ownClient.keys(fleet.prefix.replace(/[*?[\]\\]/g, '\\$&') + 'gpu:*')).map((k) => k.slice(fleet.prefix.length))
  const res = await fetch(`${gw.url}/api/generate`, { method: 'POST', body: '{"model":"m","prompt":"x"}' })
  t.equal(res.status, 200)
  t.same(await held(), ['gpu:' + fleet.gpuIds[0]], 'the lease is in the Redis the connection string names, under the prefix')
  t.same(await fleet.heldGpus(), [], 'and not in the default one')
  await res.text()
  for (const deadline = performance.now() + 1000; (await held()).length > 0 && performance.now() < deadline;) await sleep(20)
  t.same(await held(), [], 'released there')
  await gw.close() // before its Redis is killed (teardowns run in order): a gateway closing on a dead Redis waits for it
})

t.test('an assignment added to the database is routable within INVENTORY_REFRESH_MS', async (t) => {
  const REFRESH = 500
  const fleet = await startFleet(t, {
    gpus: [1, 1],
    upstreams: [{ model: 'm', gpus: [0] }, { model: 'late', gpus: [1] }],
    options: { INVENTORY_REFRESH_MS: REFRESH }
  })
  // start with 'late' missing: its assignment taken out before the gateway loads the inventory
  await fleet.db.query("DELETE FROM assignment_gpus WHERE assignment_id IN (SELECT id FROM assignments WHERE name = 'late-2')")
  await fleet.db.query("DELETE FROM assignments WHERE name = 'late-2'")
  const gw = await fleet.replica()
  const ask = async (): Promise<number> => (await fetch(`${gw.url}/api/generate`, { method: 'POST', body: '{"model":"late","prompt":"x","stream":false}' })).status
  t.equal(await ask(), 404, 'not routable yet')
  const added = performance.now()
  await seedInventory(fleet.db.query, { computers: [], assignments: [{ name: 'late-2', model: 'late', port: fleet.upstreams[1].port, gpus: [Number(fleet.gpuIds[1])] }] })
  let status = await ask()
  while (status !== 200 && performance.now() - added < REFRESH * 4) { await sleep(50); status = await ask() }
  const took = performance.now() - added
  t.equal(status, 200, 'routable')
  // within one refresh, plus a request's time; generous (x2) for 2 shared cores
  t.ok(took < REFRESH * 2, `after ${Math.round(took)} ms (INVENTORY_REFRESH_MS ${REFRESH})`)
})

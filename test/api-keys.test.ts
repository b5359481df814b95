// API keys (CONTRACT 12.3): from API_KEYS, from the api_keys table (written straight by the test,
// SHA-256 only) and from an inventory file; revocation on every replica; the admin functions;
// secrets never in a log line or a metric; without keys the client is its address (X-Forwarded-For
// only with TRUST_PROXY). Real MariaDB and Redis, the simulator, the real ollama client.
import t, { type Test } from 'tap'
import { readFile, writeFile } from 'node:fs/promises'
import Fastify from 'fastify'
import type { AddressInfo } from 'node:net'
import { Ollama } from 'ollama'
import maestro, { type MaestroOptions } from '../app.js'
import { ApiKeyStore, tableBackend } from '../services/clients/api-keys.js'
import { startFleet, type Gateway, type TestFleet } from './helpers/gateway.js'
import { eventually, insertKey, sha256Hex } from './helpers/api-keys.js'
import { startEmbeddedGateway, writeInventoryFile } from './helpers/embedded.js'
import { startSimulator } from './helpers/upstream-simulator.js'

async function fleetOf (t: Test, migrate = true): Promise<TestFleet> {
  return await startFleet(t, { gpus: [1], migrate, upstreams: [{ model: 'm', gpus: [0] }] })
}

const generate = async (gw: Pick<Gateway, 'url'>, secret?: string, headers: Record<string, string> = {}): Promise<number> => {
  const res = await fetch(gw.url + '/api/generate', {
    method: 'POST',
    headers: { 'content-type': 'application/json', ...(secret != null ? { authorization: `Bearer ${secret}` } : {}), ...headers },
    body: JSON.stringify({ model: 'm', prompt: 'x', stream: false })
  })
  await res.arrayBuffer()
  return res.status
}

const clearCache = async (gw: Gateway, secret: string): Promise<number> =>
  (await fetch(gw.url + '/gpu/cache', { method: 'DELETE', headers: { authorization: `Bearer ${secret}` } })).status

const statusOf = async (p: Promise<unknown>): Promise<number | undefined> =>
  await p.then(() => undefined, (err: { statusCode?: number }) => err.statusCode)

/** A gateway whose log lines are kept, as JSON objects and as the text written. */
async function loggedGateway (t: Test, options: MaestroOptions): Promise<Gateway & { lines: string[], logged: () => any[] }> {
  const lines: string[] = []
  const app = Fastify({ logger: { level: 'debug', stream: { write: (line: string) => { lines.push(line) } } }, forceCloseConnections: true })
  await app.register(maestro, { dotenv: false, ...options })
  await app.listen({ port: 0, host: '127.0.0.1' })
  t.teardown(async () => await app.close())
  return {
    app,
    url: `http://127.0.0.1:${(app.server.address() as AddressInfo).port}`,
    close: async () => await app.close(),
    lines,
    logged: () => lines.map((l) => JSON.parse(l))
  }
}

t.test('a key in the table, one in API_KEYS: each authenticates; a revoked row stops working on every replica', async (t) => {
  const fleet = await fleetOf(t)
  await insertKey(fleet.db.query, 'team-a', 'secret-team-a')
  // Cache clearing is an admin route: with keys in use it needs ADMIN_TOKEN (CONTRACT 18).
  const options = { API_KEYS: 'secret-env', ADMIN_TOKEN: 'admin-secret', INVENTORY_REFRESH_MS: 60_000 }
  const one = await fleet.replica(options)
  const two = await fleet.replica(options)

  const ollama = new Ollama({ host: one.url, headers: { Authorization: 'Bearer secret-team-a' } })
  t.equal((await ollama.generate({ model: 'm', prompt: 'x' })).done, true, 'the table\'s key, through the ollama client')
  t.equal(await generate(one, 'secret-env'), 200, 'API_KEYS still works beside it')
  t.equal(await generate(one, 'secret-team-b'), 401, 'an unknown key does not')
  t.equal(await generate(one, sha256Hex('secret-team-a')), 401, 'nor the stored hash presented as a key')
  t.equal(await generate(one), 401, 'nor no key')

  await fleet.db.query('UPDATE api_keys SET revoked_at = CURRENT_TIMESTAMP WHERE name = ?', ['team-a'])
  t.equal(await generate(two, 'secret-team-a'), 200, 'before the cache is cleared the copy in memory still has it (refresh is a minute away)')
  t.equal(await clearCache(one, 'admin-secret'), 200)
  t.equal(await generate(one, 'secret-team-a'), 401, 'revoked on the replica that cleared the cache, by the time it answered')
  t.ok(await eventually(async () => await generate(two, 'secret-team-a') === 401, 1000), 'and on the other replica within a second')
  t.equal(await generate(two, 'secret-env'), 200)
  t.equal(fleet.upstreams[0].requests.filter((r) => r.headers.authorization != null).length, 0, 'no key reached the upstream')
})

t.test('table keys alone: a key is needed once the table holds one; new rows are seen within INVENTORY_REFRESH_MS; revoking the last keeps it closed', async (t) => {
  const fleet = await fleetOf(t)
  const gw = await fleet.replica({ INVENTORY_REFRESH_MS: 200 })
  t.equal(await generate(gw), 200, 'an empty table: open, as with no API_KEYS')
  await insertKey(fleet.db.query, 'first', 'secret-first')
  t.ok(await eventually(async () => await generate(gw) === 401, 2000), 'the first key closes the gateway within the refresh')
  t.equal(await generate(gw, 'secret-first'), 200)
  await fleet.db.query('UPDATE api_keys SET revoked_at = CURRENT_TIMESTAMP')
  t.ok(await eventually(async () => await generate(gw, 'secret-first') === 401, 2000), 'revoked')
  t.equal(await generate(gw), 401, 'with every key revoked the gateway stays closed')

  const unmigrated = await fleetOf(t, false)
  const plain = await unmigrated.replica()
  t.equal(await generate(plain), 200, 'a database without the api_keys table (not migrated): no table keys, open')
})

t.test('the admin functions: a secret is answered once and stored as its hash; lists show neither; updates and revocation take effect at once', async (t) => {
  const fleet = await fleetOf(t)
  const gw = await fleet.replica({ API_KEYS: 'env-secret', ADMIN_TOKEN: 'admin-secret', INVENTORY_REFRESH_MS: 60_000 })
  // As the admin routes use it: after a write, the cluster is told (here: the cache clear an operator would send)
  const store = new ApiKeyStore({
    envKeys: ['env-secret'],
    backend: tableBackend(fleet.db.query),
    refreshMs: 60_000,
    changed: async () => { t.equal(await clearCache(gw, 'admin-secret'), 200, 'cluster told') }
  })
  await store.start()
  t.teardown(() => store.close())

  const { key, info } = await store.create({ name: 'ci', priority: 'low', rpm: 1, models: ['m'] })
  t.match(key, /^mst_[A-Za-z0-9_-]{43}$/, 'a 256-bit secret')
  t.match(info, { name: 'ci', source: 'table', priority: 'low', limits: { rpm: 1, models: ['m'] } })
  const [row] = await fleet.db.query('SELECT * FROM api_keys WHERE name = ?', ['ci'])
  t.equal(row.secret_sha256, sha256Hex(key), 'the table holds the SHA-256')
  t.notOk(JSON.stringify(row).includes(key), 'and never the secret')
  const listed = JSON.stringify(store.list())
  t.notOk(listed.includes(key) || listed.includes(sha256Hex(key)) || listed.includes('env-secret'), 'the list shows no secret and no hash')
  t.match(store.list().map((k) => k.name), ['API_KEYS#1', 'ci'])

  t.equal(await generate(gw, key), 200, 'the new key works')
  t.equal(await generate(gw, key), 429, 'with its rpm')
  t.equal(await statusOf(store.create({ name: 'ci' })), 409, 'a name is unique')
  t.equal(await statusOf(store.create({ name: 'bad name' })), 400)
  t.equal(await statusOf(store.create({ name: 'x', priority: 'urgent' })), 400)
  t.equal(await statusOf(store.create({ name: 'x', maxConcurrent: 0 })), 400)

  const updated = await store.update('ci', { priority: 'high', limits: { rpm: null } })
  t.same(updated.limits, { models: ['m'] }, 'null removes a limit, the rest stay')
  t.equal(updated.priority, 'high')
  t.equal(await generate(gw, key), 200, 'no rpm any more')
  t.equal(await statusOf(store.update('nobody', { priority: 'low' })), 404)

  await store.revoke('ci')
  t.ok(store.list().find((k) => k.name === 'ci')?.revokedAt, 'listed as revoked')
  t.notOk(store.match(key), 'no longer matches')
  t.equal(await generate(gw, key), 401, 'and the gateway refuses it')
  t.equal(await statusOf(store.revoke('ci')), 404, 'revoking twice is a 404')
})

t.test('embedded mode: keys in the inventory file (hashes only), with their limits; the file\'s writes are atomic and keep the rest', async (t) => {
  const sim = await startSimulator({ models: ['m'], tokens: 100, tokenDelayMs: 20 })
  t.teardown(() => sim.close())
  const file = await writeInventoryFile(t, [{ name: 'local', model: 'm', port: sim.port, gpus: [1] }])
  const inventory = JSON.parse(await readFile(file, 'utf8'))
  inventory.apiKeys = [
    { name: 'laptop', sha256: sha256Hex('secret-laptop'), priority: 'low', maxConcurrent: 1 },
    { name: 'old', sha256: sha256Hex('secret-old'), revokedAt: '2026-01-01T00:00:00Z' }
  ]
  await writeFile(file, JSON.stringify(inventory))
  const gw = await startEmbeddedGateway(t, { dotenv: false, INVENTORY_FILE: file, INVENTORY_REFRESH_MS: 60_000 })
  t.equal(await generate(gw), 401, 'a key is needed')
  t.equal(await generate(gw, 'secret-old'), 401, 'a revoked one does not do')

  const controller = new AbortController()
  const held = await fetch(gw.url + '/api/generate', {
    method: 'POST', headers: { authorization: 'Bearer secret-laptop' }, body: '{"model":"m","prompt":"x"}', signal: controller.signal
  })
  const reader = (held.body as ReadableStream<Uint8Array>).getReader()
  await reader.read()
  t.equal(await generate(gw, 'secret-laptop'), 429, 'its maxConcurrent holds (memory store)')
  controller.abort()
  t.ok(await eventually(async () => await generate(gw, 'secret-laptop') === 200), 'and is released when the client leaves')

  const bad = JSON.parse(await readFile(file, 'utf8'))
  bad.apiKeys = [{ name: 'oops', secret: 'plain-text' }]
  const badFile = file.replace(/inventory\.json$/, 'bad.json')
  await writeFile(badFile, JSON.stringify(bad))
  await t.rejects(startEmbeddedGateway(t, { dotenv: false, INVENTORY_FILE: badFile }), /apiKeys\[0\] has unknown field "secret"/,
    'a file holding a secret is refused at start')
})

t.test('embedded mode: the admin functions write the file atomically', async (t) => {
  const sim = await startSimulator({ models: ['m'] })
  t.teardown(() => sim.close())
  const file = await writeInventoryFile(t, [{ name: 'local', model: 'm', port: sim.port, gpus: [1] }])
  const gw = await startEmbeddedGateway(t, { dotenv: false, INVENTORY_FILE: file })
  t.equal(await generate(gw), 200, 'no keys yet: open')
  const { fileBackend } = await import('../services/clients/api-keys.js')
  const store = new ApiKeyStore({ envKeys: [], backend: fileBackend(file), refreshMs: 60_000 })
  await store.start()
  t.teardown(() => store.close())
  const [a, b] = await Promise.all([store.create({ name: 'a' }), store.create({ name: 'b', maxQueued: 3 })])
  const written = JSON.parse(await readFile(file, 'utf8'))
  t.same(written.apiKeys.map((k: any) => k.name), ['a', 'b'], 'two concurrent writes both landed')
  t.equal(written.assignments.length, 1, 'the rest of the file is kept')
  t.notOk(JSON.stringify(written).includes(a.key) || JSON.stringify(written).includes(b.key), 'no secret in the file')
  t.equal(written.apiKeys[1].sha256, sha256Hex(b.key))
  t.equal(await clearCache(gw, a.key), 200, 'the gateway reads them (cache clear)')
  t.equal(await generate(gw), 401)
  t.equal(await generate(gw, b.key), 200)
})

t.test('secrets never reach a log line or a metric; both name the key', async (t) => {
  const fleet = await fleetOf(t)
  await insertKey(fleet.db.query, 'team-a', 'secret-of-team-a', { rpm: 1, models: '["m"]' })
  const gw = await loggedGateway(t, { ...fleet.options, API_KEYS: 'secret-from-env' })
  t.equal(await generate(gw, 'secret-of-team-a'), 200)
  t.equal(await generate(gw, 'secret-of-team-a'), 429)
  t.equal(await generate(gw, 'secret-from-env'), 200)
  t.equal(await generate(gw, 'wrong-secret-guess'), 401)
  const metrics = await (await fetch(gw.url + '/metrics')).text()
  const finished = gw.logged().filter((l) => l.msg === 'request finished' && l.url === '/api/generate')
  t.same(finished.map((l) => l.client), ['team-a', 'team-a', 'API_KEYS#1', undefined], 'the log line names the key (none for a refused one)')
  t.match(metrics, /maestro_client_requests_total\{client="team-a",status="200"\} 1/)
  t.match(metrics, /maestro_client_requests_total\{client="team-a",status="429"\} 1/)
  t.match(metrics, /maestro_client_limited_total\{client="team-a",limit="rpm"\} 1/)
  t.match(metrics, /maestro_client_queue_wait_seconds_count\{client="API_KEYS#1"\} 1/)
  const everything = gw.lines.join('\n') + metrics
  for (const secret of ['secret-of-team-a', 'secret-from-env', 'wrong-secret-guess']) {
    t.notOk(everything.includes(secret), `${secret} appears nowhere`)
    t.notOk(everything.includes(sha256Hex(secret)), `nor its hash`)
  }
})

t.test('no keys: the client is its address; X-Forwarded-For counts only with TRUST_PROXY, and only its first hop', async (t) => {
  const fleet = await fleetOf(t)
  const plain = await loggedGateway(t, fleet.options)
  const trusting = await loggedGateway(t, { ...fleet.options, TRUST_PROXY: 'true' })
  const xff = { 'x-forwarded-for': '203.0.113.7, 10.0.0.1' }
  for (const gw of [plain, trusting]) {
    t.equal(await generate(gw, undefined, xff), 200)
    t.equal(await generate(gw, undefined, { 'x-forwarded-for': 'not-an-address' }), 200)
    t.equal(await generate(gw), 200)
  }
  const clients = (gw: typeof plain): string[] => gw.logged().filter((l) => l.msg === 'request finished' && l.url === '/api/generate').map((l) => l.client)
  t.same(clients(plain), ['127.0.0.1', '127.0.0.1', '127.0.0.1'], 'without TRUST_PROXY the header is ignored')
  t.same(clients(trusting), ['203.0.113.7', '127.0.0.1', '127.0.0.1'], 'with it, the first hop (a garbled header: the socket)')
  t.match(await (await fetch(trusting.url + '/metrics')).text(), /maestro_client_requests_total\{client="203\.0\.113\.7",status="200"\} 1/)
})

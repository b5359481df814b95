// The admin API on a database `npm run migrate` has not touched (only the original ai-maestro
// schema): every change that needs a table or column of the gateway's own answers 409 naming the
// migration, never 500. And every number of the admin API is bounded by its column: one past the
// bound is a 400 naming the field, on MariaDB and in embedded mode alike, and nothing is written.
import t, { type Test } from 'tap'
import { readFile } from 'node:fs/promises'
import { startFleet, type Gateway } from './helpers/gateway.js'
import { startEmbeddedGateway, writeInventoryFile } from './helpers/embedded.js'
import { startSimulator } from './helpers/upstream-simulator.js'
import { migrate } from '../services/fleet/migrations.js'
import type { Query } from '../services/fleet/inventory.js'

const TOKEN = 'admin-token-for-unmigrated-tests'

interface Answer { status: number, body: any }

/** `body` as JSON, or as it is when a string (JSON.stringify cannot write 1e309). */
async function call (gw: Gateway, method: string, path: string, body?: unknown): Promise<Answer> {
  const headers: Record<string, string> = { authorization: `Bearer ${TOKEN}` }
  if (body !== undefined) headers['content-type'] = 'application/json'
  const res = await fetch(gw.url + path, { method, headers, body: body === undefined ? undefined : typeof body === 'string' ? body : JSON.stringify(body) })
  const text = await res.text()
  return { status: res.status, body: text === '' ? undefined : JSON.parse(text) }
}

async function generate (gw: Gateway): Promise<number> {
  const res = await fetch(`${gw.url}/api/generate`, {
    method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify({ model: 'llama3', prompt: 'hi', stream: false })
  })
  await res.arrayBuffer()
  return res.status
}

async function tableNames (query: Query): Promise<string[]> {
  return (await query('SELECT TABLE_NAME AS name FROM information_schema.TABLES WHERE TABLE_SCHEMA = DATABASE() ORDER BY TABLE_NAME'))
    .map((r) => String(r.name))
}

/** Every row of the tables the admin API writes, to compare before and after. */
async function dump (query: Query): Promise<unknown> {
  const tables = await tableNames(query)
  const out: Record<string, unknown> = {}
  for (const table of ['computers', 'gpus', 'llms', 'diffusors', 'speech_models', 'assignments', 'assignment_gpus', 'api_keys', 'maestro_assignment_drains']) {
    if (!tables.includes(table)) continue
    // fixed names from the list above
    out[table] = JSON.parse(JSON.stringify(await query(`SELECT * FROM ${table}`)))
  }
  return out
}

t.test('an unmigrated database: every change that needs the migration answers 409 naming it', async t => {
  const fleet = await startFleet(t, { gpus: [1], upstreams: [{ model: 'llama3', gpus: [0] }], options: { ADMIN_TOKEN: TOKEN } })
  const gw = await fleet.replica()
  const before = await dump(fleet.db.query)

  const needMigration: Array<[string, string, unknown, RegExp]> = [
    ['POST', '/admin/api-keys', { name: 'ci', rpm: 60 }, /no api_keys table/],
    ['PATCH', '/admin/api-keys/ci', { rpm: 5 }, /no api_keys table/],
    ['DELETE', '/admin/api-keys/ci', undefined, /no api_keys table/],
    ['POST', '/admin/assignments/1/drain', undefined, /no table for drained assignments/],
    ['PATCH', '/admin/assignments/1', { maxParallel: 3 }, /no assignments\.max_parallel column/],
    ['POST', '/admin/assignments', { name: 'wide', model: 'llama3', port: 11434, gpuIds: [1], maxParallel: 2 }, /no assignments\.max_parallel column/]
  ]
  for (const [method, path, body, what] of needMigration) {
    const answer = await call(gw, method, path, body)
    t.equal(answer.status, 409, `${method} ${path}`)
    t.match(answer.body?.error, what, `${method} ${path} says what is missing`)
    t.match(answer.body?.error, /run npm run migrate$/, `${method} ${path} names the migration`)
  }
  t.same(await dump(fleet.db.query), before, 'nothing written')
  t.notOk((await tableNames(fleet.db.query)).includes('api_keys'), 'no api_keys table made behind the operator\'s back')

  // What needs no table of the gateway's own works as before.
  const keys = await call(gw, 'GET', '/admin/api-keys')
  t.equal(keys.status, 200, 'the key list reads as empty without the table')
  t.same(keys.body, [])
  const undrain = await call(gw, 'POST', '/admin/assignments/1/undrain')
  t.equal(undrain.status, 200, 'undrain: nothing can be drained without the table, so there is nothing to store')
  t.equal(undrain.body.drained, false)
  t.equal((await call(gw, 'PATCH', '/admin/assignments/1', { maxParallel: 1 })).status, 200, 'maxParallel 1 is what the table holds already')
  t.equal(await generate(gw), 200, 'and the gateway serves on')

  // Once migrated, the same key is created.
  await migrate(fleet.db.query)
  const created = await call(gw, 'POST', '/admin/api-keys', { name: 'ci', rpm: 60 })
  t.equal(created.status, 201, 'after npm run migrate the key is created')
})

/** One past each numeric column's range, as [method, path, body, field named in the error]. */
const PAST_THE_BOUND: Array<[string, string, unknown, string]> = [
  ['POST', '/admin/gpus', { name: 'big', vramGb: 1e308, computerId: 1 }, 'vramGb'],
  // FLOAT: MariaDB takes 3.402823466e38 and refuses 3.4028235e38
  ['POST', '/admin/gpus', { name: 'big', vramGb: 3.4028235e38, computerId: 1 }, 'vramGb'],
  ['POST', '/admin/gpus', { name: 'big', vramGb: 8, computerId: 1, weight: 3.4028235e38 }, 'weight'],
  ['POST', '/admin/gpus', { name: 'big', vramGb: 8, computerId: 1, weight: -3.4028235e38 }, 'weight'],
  ['POST', '/admin/gpus', { name: 'big', vramGb: 8, computerId: 2147483648 }, 'computerId'],
  ['PATCH', '/admin/gpus/1', { vramGb: 1e308 }, 'vramGb'],
  ['PATCH', '/admin/gpus/1', { weight: 3.4028235e38 }, 'weight'],
  ['PATCH', '/admin/gpus/1', { computerId: 2147483648 }, 'computerId'],
  // DOUBLE: JSON's 1e309 is Infinity, which no column holds
  ['POST', '/admin/models', '{"kind":"llm","name":"huge","size":1e309}', 'size'],
  ['POST', '/admin/assignments', { name: 'far', model: 'llama3', port: 65536, gpuIds: [1] }, 'port'],
  ['POST', '/admin/assignments', { name: 'far', model: 'llama3', port: 0, gpuIds: [1] }, 'port'],
  ['POST', '/admin/assignments', { name: 'far', model: 'llama3', port: 11434, gpuIds: [1], maxParallel: 1025 }, 'maxParallel'],
  ['POST', '/admin/assignments', { name: 'far', model: 'llama3', port: 11434, gpuIds: [2147483648] }, 'gpuIds'],
  ['PATCH', '/admin/assignments/1', { port: 65536 }, 'port'],
  ['PATCH', '/admin/assignments/1', { maxParallel: 1025 }, 'maxParallel'],
  ['PATCH', '/admin/assignments/1', { gpuIds: [2147483648] }, 'gpuIds'],
  ['POST', '/admin/api-keys', { name: 'big', maxConcurrent: 1_000_000_001 }, 'maxConcurrent'],
  ['POST', '/admin/api-keys', { name: 'big', maxQueued: 1_000_000_001 }, 'maxQueued'],
  ['POST', '/admin/api-keys', { name: 'big', rpm: 1_000_000_001 }, 'rpm'],
  ['PATCH', '/admin/api-keys/present', { maxConcurrent: 1_000_000_001 }, 'maxConcurrent'],
  ['PATCH', '/admin/api-keys/present', { maxQueued: 1_000_000_001 }, 'maxQueued'],
  ['PATCH', '/admin/api-keys/present', { rpm: 1_000_000_001 }, 'rpm']
]

async function pastTheBound (t: Test, gw: Gateway, stored: () => Promise<unknown>): Promise<void> {
  t.equal((await call(gw, 'POST', '/admin/api-keys', { name: 'present' })).status, 201, 'a key to change')
  const before = await stored()
  for (const [method, path, body, field] of PAST_THE_BOUND) {
    const answer = await call(gw, method, path, body)
    const shown = typeof body === 'string' ? body : JSON.stringify(body)
    t.equal(answer.status, 400, `${method} ${path} ${shown}`)
    t.match(answer.body?.error, new RegExp(`^${field}\\b`), `${method} ${path} ${shown} names ${field}`)
  }
  t.same(await stored(), before, 'nothing written')

  // The bound itself is stored, and reads back.
  const atBound = await call(gw, 'POST', '/admin/gpus', { name: 'widest', vramGb: 3.402823466e38, computerId: 1, weight: -3.402823466e38 })
  t.equal(atBound.status, 201, 'FLOAT\'s own maximum is taken')
  const read = await call(gw, 'GET', `/admin/gpus/${String(atBound.body?.id)}`)
  t.ok(read.body?.vramGb > 3.4e38 && read.body?.weight < -3.4e38, `and reads back (${String(read.body?.vramGb)}, ${String(read.body?.weight)})`)
}

t.test('numbers past their column on MariaDB: 400 naming the field, nothing written', async t => {
  const fleet = await startFleet(t, { gpus: [1], migrate: true, upstreams: [{ model: 'llama3', gpus: [0] }], options: { ADMIN_TOKEN: TOKEN } })
  const gw = await fleet.replica()
  await pastTheBound(t, gw, async () => await dump(fleet.db.query))
})

t.test('numbers past their column in embedded mode: the same 400s, the file untouched', async t => {
  const sim = await startSimulator({ gpuIds: ['1'], models: ['llama3'] })
  t.teardown(() => sim.close())
  const file = await writeInventoryFile(t, [{ name: 'ollama', model: 'llama3', port: sim.port, gpus: [1] }])
  const gw = await startEmbeddedGateway(t, { INVENTORY_FILE: file, ADMIN_TOKEN: TOKEN })
  await pastTheBound(t, gw, async () => await readFile(file, 'utf8'))
})

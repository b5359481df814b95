// The admin API in embedded mode: changes go to INVENTORY_FILE, replaced atomically (temp file in
// the same directory, then rename), and the gateway serves from the new file at once.
import t from 'tap'
import { createHash } from 'node:crypto'
import { readdir, readFile, stat, writeFile } from 'node:fs/promises'
import { dirname } from 'node:path'
import { startEmbeddedGateway, writeInventoryFile } from './helpers/embedded.js'
import { startSimulator } from './helpers/upstream-simulator.js'
import type { Gateway } from './helpers/gateway.js'

const TOKEN = 'embedded-admin-token'
/** The file lists one API key (so proxied requests need it): this is its secret. */
const KEY = 'file-key-secret'

async function call (gw: Gateway, method: string, path: string, body?: unknown): Promise<{ status: number, body: any }> {
  const res = await fetch(gw.url + path, {
    method,
    headers: { authorization: `Bearer ${TOKEN}`, ...(body === undefined ? {} : { 'content-type': 'application/json' }) },
    body: body === undefined ? undefined : JSON.stringify(body)
  })
  const text = await res.text()
  return { status: res.status, body: text === '' ? undefined : JSON.parse(text) }
}

async function generate (gw: Gateway, model: string): Promise<{ status: number, assignment: string | null }> {
  const res = await fetch(`${gw.url}/api/generate`, {
    method: 'POST',
    headers: { 'content-type': 'application/json', authorization: `Bearer ${KEY}` },
    body: JSON.stringify({ model, prompt: 'hi', stream: false })
  })
  await res.arrayBuffer()
  return { status: res.status, assignment: res.headers.get('x-maestro-assignment') }
}

t.test('embedded mode: the file is written atomically and used at once', async t => {
  const first = await startSimulator({ gpuIds: ['1'], models: ['llama3'] })
  const second = await startSimulator({ gpuIds: ['2'], models: ['phi3'] })
  t.teardown(async () => { await first.close(); await second.close() })
  const file = await writeInventoryFile(t, [{ name: 'ollama', model: 'llama3', port: first.port, gpus: [1] }])
  // An operator's comment and API keys: a rewrite keeps both.
  const original = JSON.parse(await readFile(file, 'utf8'))
  original._comment = 'kept across rewrites'
  original.computers[0]._note = 'the box under the desk'
  original.apiKeys = [{ name: 'ci', sha256: createHash('sha256').update(KEY).digest('hex'), priority: 'low' }]
  await writeFile(file, JSON.stringify(original))
  const gw = await startEmbeddedGateway(t, { INVENTORY_FILE: file, ADMIN_TOKEN: TOKEN })

  t.same((await call(gw, 'GET', '/admin/assignments')).body, [
    { id: 1, name: 'ollama', model: 'llama3', kind: 'llm', port: first.port, gpuIds: [1], maxParallel: 1, drained: false }
  ])
  t.equal((await generate(gw, 'phi3')).status, 404)

  const inodeBefore = (await stat(file)).ino
  // A reader that keeps reading the file while it is rewritten never sees it half-written.
  let reads = 0
  let torn = 0
  let reading = true
  const reader = (async () => {
    while (reading) {
      const text = await readFile(file, 'utf8')
      reads++
      try { JSON.parse(text) } catch { torn++ }
    }
  })()

  const gpu = await call(gw, 'POST', '/admin/gpus', { name: 'second GPU', vramGb: 12, computerId: 1, weight: 2 })
  t.equal(gpu.status, 201)
  t.equal(gpu.body.id, 2)
  // (the new file was made while the old one existed, so it cannot have the old inode; later ones may reuse it)
  t.not((await stat(file)).ino, inodeBefore, 'replaced by a rename, not rewritten in place')
  t.equal((await call(gw, 'POST', '/admin/assignments', { name: 'phi', model: 'phi3', port: second.port, gpuIds: [2] })).status, 400,
    'a model the file does not list needs a kind')
  const made = await call(gw, 'POST', '/admin/assignments', { name: 'phi', model: 'phi3', kind: 'llm', port: second.port, gpuIds: [2], maxParallel: 3 })
  t.equal(made.status, 201)
  t.same(made.body, { id: 2, name: 'phi', model: 'phi3', kind: 'llm', port: second.port, gpuIds: [2], maxParallel: 3, drained: false })
  const served = await generate(gw, 'phi3')
  t.same(served, { status: 200, assignment: 'phi' }, 'served right after the answer: the file was read again')

  // More writes while the reader runs.
  for (let i = 0; i < 20; i++) {
    t.equal((await call(gw, 'PATCH', '/admin/gpus/2', { weight: i })).status, 200)
  }
  t.equal((await call(gw, 'POST', '/admin/assignments/1/drain')).status, 200)
  reading = false
  await reader
  t.ok(reads > 0, `the file was read ${reads} times during the writes`)
  t.equal(torn, 0, 'never half-written')
  t.same((await readdir(dirname(file))).filter((f) => f !== 'inventory.json'), [], 'no temp file left behind')

  const written = JSON.parse(await readFile(file, 'utf8'))
  t.equal(written._comment, 'kept across rewrites')
  t.equal(written.computers[0]._note, 'the box under the desk')
  t.same(written.apiKeys, original.apiKeys, 'API keys kept')
  t.same(written.assignments[1], { id: 2, name: 'phi', model: 'phi3', kind: 'llm', port: second.port, gpus: [2], parallel: 3 })
  t.equal(written.assignments[0].drained, true, 'drained is kept in the file')
  t.same(written.gpus[1], { id: 2, name: 'second GPU', vram: 12, computer: 1, weight: 19 })

  t.equal((await generate(gw, 'llama3')).status, 503, 'the drained one takes no request')
  t.equal((await call(gw, 'POST', '/admin/assignments/1/undrain')).status, 200)
  t.same(await generate(gw, 'llama3'), { status: 200, assignment: 'ollama' })
  t.notOk('drained' in JSON.parse(await readFile(file, 'utf8')).assignments[0], 'undrained: the field goes')

  // Refusals leave the file as it was.
  const before = await readFile(file, 'utf8')
  t.equal((await call(gw, 'DELETE', '/admin/gpus/2')).status, 409, 'a GPU still in an assignment')
  t.equal((await call(gw, 'POST', '/admin/computers', { name: 'box2', ip: 'not an address' })).status, 400)
  t.equal((await call(gw, 'POST', '/admin/models', { kind: 'llm', name: '*' })).status, 400, "'*' is no model in a file")
  t.equal((await call(gw, 'DELETE', '/admin/assignments/7')).status, 404)
  t.equal(await readFile(file, 'utf8'), before, 'the file is untouched')

  t.equal((await call(gw, 'DELETE', '/admin/assignments/2')).status, 204)
  t.equal((await call(gw, 'DELETE', '/admin/gpus/2')).status, 204)
  t.equal((await generate(gw, 'phi3')).status, 404, 'gone at once')
})

t.test('embedded mode without INVENTORY_FILE: the built-in inventory is read-only', async t => {
  const gw = await startEmbeddedGateway(t, { ADMIN_TOKEN: TOKEN })
  t.equal((await call(gw, 'GET', '/admin/computers')).status, 200, 'readable')
  const r = await call(gw, 'POST', '/admin/computers', { name: 'x', ip: '10.0.0.1' })
  t.equal(r.status, 409)
  t.match(r.body.error, /INVENTORY_FILE/)
})

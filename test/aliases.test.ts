// Model aliases (CONTRACT 17): a request naming an alias is leased and forwarded for its target
// (the upstream sees the target in the body), and every answer names the alias again (JSON answers,
// each NDJSON line, each SSE chunk, Anthropic's message_start, the Responses API's response);
// x-maestro-model names the model that answered; /api/tags and /v1/models list the alias; a key's
// models list may name the alias or its target; bad aliases are refused and nothing is written;
// the same through the inventory file. Real MariaDB, Redis, the simulator, the ollama and openai clients.
import t from 'tap'
import { readFile, writeFile } from 'node:fs/promises'
import { PassThrough, Readable } from 'node:stream'
import { text } from 'node:stream/consumers'
import { Ollama } from 'ollama'
import OpenAI from 'openai'
import { startFleet, type Gateway } from './helpers/gateway.js'
import { eventually, insertKey } from './helpers/api-keys.js'
import { startSimulator } from './helpers/upstream-simulator.js'
import { startEmbeddedGateway, writeInventoryFile } from './helpers/embedded.js'
import { renameModel } from '../services/http/stream-framing.js'
import { withModel } from '../services/http/ollama-normalizer.js'
import { parseInventoryFile } from '../services/fleet/inventory.js'

const ADMIN = 'admin-secret'
const admin = (gw: Gateway, method: string, path: string, body?: unknown): Promise<Response> =>
  fetch(gw.url + path, {
    method,
    headers: { authorization: `Bearer ${ADMIN}`, ...(body === undefined ? {} : { 'content-type': 'application/json' }) },
    body: body === undefined ? undefined : JSON.stringify(body)
  })

const bodiesSeen = (requests: Array<{ path: string, body: any }>, path: string): string[] =>
  requests.filter((r) => r.path === path).map((r) => r.body?.model)

t.test('the renamer: every "model" member of the target, split at any byte, nothing else', async (t) => {
  const answer = '{"model":"m","message":{"content":"say \\"model\\":\\"m\\""},"x":"m"}\n' +
    'data: {"id":"1","model":"m:latest","choices":[]}\n\n' +
    'event: message_start\ndata: {"type":"message_start","message":{"id":"x","model": "m"}}\n\n' +
    '{"model":"mm","é":"ü"}\n'
  const want = '{"model":"fast","message":{"content":"say \\"model\\":\\"m\\""},"x":"m"}\n' +
    'data: {"id":"1","model":"fast","choices":[]}\n\n' +
    'event: message_start\ndata: {"type":"message_start","message":{"id":"x","model": "fast"}}\n\n' +
    '{"model":"mm","é":"ü"}\n'
  const bytes = Buffer.from(answer, 'utf8')
  let every = true
  for (let cut = 1; cut < bytes.length; cut++) {
    const source = new PassThrough()
    const out = renameModel(source, { from: 'm', to: 'fast' })
    source.write(bytes.subarray(0, cut))
    source.end(bytes.subarray(cut))
    const got = await text(out)
    if (got !== want) { every = false; t.equal(got, want, `split at byte ${cut}`); break }
  }
  t.ok(every, 'the same answer wherever the chunks are cut')
  const split = await text(renameModel(Readable.from([bytes.subarray(0, 12), bytes.subarray(12, 70), bytes.subarray(70)]), { from: 'm', to: 'fast' }))
  t.equal(split, want, 'three chunks')
  // A line is never held back waiting for the next chunk.
  const source = new PassThrough()
  const out = renameModel(source, { from: 'm', to: 'fast' })
  source.write('{"model":"m","done":false}\n')
  const first = await new Promise<string>((resolve) => out.once('data', (c: Buffer) => resolve(c.toString())))
  t.equal(first, '{"model":"fast","done":false}\n', 'a whole line goes on at once')
  source.end()
  t.equal(withModel('{"a":{"model":"x"},"model" : "fast","b":["model"]}', 'm'), '{"a":{"model":"x"},"model" : "m","b":["model"]}', 'only the top-level member is rewritten')
  t.equal(withModel('{"\\u006dodel":"fast","s":"\\"model\\":\\"fast\\"","model":"f\\"ast"}', 'm'), '{"\\u006dodel":"m","s":"\\"model\\":\\"fast\\"","model":"m"}', 'an escaped key and every occurrence; quoted text untouched')
  t.equal(withModel('{"name":"fast","n":1.50}', 'm', 'name'), '{"name":"m","n":1.50}', "`name` (/api/show), other bytes as sent")
})

t.test('an alias round trip: ollama and openai clients, streamed and not, Anthropic and Responses streams; listings; key lists; refusals', async (t) => {
  const fleet = await startFleet(t, { gpus: [1], migrate: true, upstreams: [{ model: 'm', gpus: [0], simulator: { tokens: 4, tokenDelayMs: 1 } }] })
  await insertKey(fleet.db.query, 'lists-alias', 's-alias', { models: '["fast"]' })
  await insertKey(fleet.db.query, 'lists-target', 's-target', { models: '["m"]' })
  await insertKey(fleet.db.query, 'lists-other', 's-other', { models: '["zzz"]' })
  const gw = await fleet.replica({ ADMIN_TOKEN: ADMIN, UPSTREAM_POLL_MS: 100 })
  const sim = fleet.upstreams[0]

  // refusals first: nothing is written
  t.equal((await admin(gw, 'POST', '/admin/aliases', { alias: 'fast', model: 'nope' })).status, 400, 'an alias of a missing model: 400')
  t.equal((await admin(gw, 'POST', '/admin/aliases', { alias: 'm:latest', model: 'm' })).status, 409, "an alias named as a model is: 409")
  t.same(await fleet.db.query('SELECT alias FROM maestro_model_aliases'), [], 'nothing written')
  const created = await admin(gw, 'POST', '/admin/aliases', { alias: 'fast', model: 'm' })
  t.equal(created.status, 201)
  t.same(await created.json(), { alias: 'fast', model: 'm' })
  const chained = await admin(gw, 'POST', '/admin/aliases', { alias: 'quick', model: 'fast' })
  t.equal(chained.status, 400, 'an alias of an alias: 400')
  t.match((await chained.json()).error, /is an alias/)
  t.equal((await admin(gw, 'POST', '/admin/aliases', { alias: 'FAST', model: 'm' })).status, 409, 'the same alias again: 409')
  t.same(await fleet.db.query('SELECT alias, model FROM maestro_model_aliases'), [{ alias: 'fast', model: 'm' }], 'one row: the refusals wrote nothing')
  t.same(await (await admin(gw, 'GET', '/admin/aliases')).json(), [{ alias: 'fast', model: 'm' }])

  const ollama = new Ollama({ host: gw.url, headers: { Authorization: 'Bearer s-alias' } })
  const chat = await ollama.chat({ model: 'fast', messages: [{ role: 'user', content: 'hi' }], stream: false })
  t.equal(chat.model, 'fast', 'ollama chat: the answer names the alias')
  const lines: string[] = []
  for await (const part of await ollama.chat({ model: 'fast', messages: [{ role: 'user', content: 'hi' }], stream: true })) lines.push(part.model)
  t.ok(lines.length >= 4, `streamed chat: ${lines.length} lines`)
  t.same([...new Set(lines)], ['fast'], 'every streamed line names the alias')
  const generate = await ollama.generate({ model: 'fast', prompt: 'hi', stream: false })
  t.equal(generate.model, 'fast', 'ollama generate')
  const genLines: string[] = []
  for await (const part of await ollama.generate({ model: 'fast', prompt: 'hi', stream: true })) genLines.push(part.model)
  t.same([...new Set(genLines)], ['fast'], 'every streamed generate line')
  t.same([...new Set([...bodiesSeen(sim.requests, '/api/chat'), ...bodiesSeen(sim.requests, '/api/generate')])], ['m'], 'the upstream saw the target every time')

  const shown = await ollama.show({ model: 'fast' })
  t.ok(shown.details != null, '/api/show of the alias answers')
  t.same(bodiesSeen(sim.requests, '/api/show'), ['m'], "and asks the server by its target's name")

  const openai = new OpenAI({ baseURL: gw.url + '/v1', apiKey: 's-target', maxRetries: 0 })
  const completion = await openai.chat.completions.create({ model: 'fast', messages: [{ role: 'user', content: 'hi' }] })
  t.equal(completion.model, 'fast', 'openai chat: the alias')
  const chunks: string[] = []
  for await (const chunk of await openai.chat.completions.create({ model: 'fast', messages: [{ role: 'user', content: 'hi' }], stream: true })) chunks.push(chunk.model)
  t.ok(chunks.length >= 4)
  t.same([...new Set(chunks)], ['fast'], 'every SSE chunk names the alias')
  t.same([...new Set(bodiesSeen(sim.requests, '/v1/chat/completions'))], ['m'], 'the upstream saw the target')

  for (const [path, body] of [
    ['/v1/messages', { model: 'fast', max_tokens: 8, stream: true, messages: [{ role: 'user', content: 'hi' }] }],
    ['/v1/responses', { model: 'fast', input: 'hi', stream: true }]
  ] as const) {
    const res = await fetch(gw.url + path, { method: 'POST', headers: { authorization: 'Bearer s-alias', 'content-type': 'application/json' }, body: JSON.stringify(body) })
    t.equal(res.status, 200, path)
    t.equal(res.headers.get('x-maestro-model'), 'm', `${path}: x-maestro-model names the model that answered`)
    const events = await res.text()
    t.match(events, /"model":"fast"/, `${path}: the stream names the alias`)
    t.notMatch(events, /"model":"m"/, `${path}: never the target`)
  }

  // the key lists: the alias, or its target; the alias does not open the target
  const as = (secret: string, model: string, to: Gateway = gw): Promise<Response> => fetch(to.url + '/api/generate', {
    method: 'POST', headers: { authorization: `Bearer ${secret}`, 'content-type': 'application/json' }, body: JSON.stringify({ model, prompt: 'x', stream: false })
  })
  t.equal((await as('s-other', 'fast')).status, 403, 'a key listing neither: 403')
  t.equal((await as('s-alias', 'm')).status, 403, 'a key listing the alias only may not name the target')
  t.equal((await as('s-target', 'fast')).status, 200, 'a key listing the target may use the alias')

  // listings: the alias as an entry of its own, with the target's details
  t.ok(await eventually(async () => {
    const tags = await (await fetch(gw.url + '/api/tags', { headers: { authorization: 'Bearer s-alias' } })).json() as { models: Array<{ name: string, details?: unknown }> }
    return tags.models.some((m) => m.name === 'fast')
  }, 3000), '/api/tags lists the alias')
  const tags = await (await fetch(gw.url + '/api/tags', { headers: { authorization: 'Bearer s-alias' } })).json() as { models: Array<{ name: string, model: string, details?: unknown }> }
  const target = tags.models.find((m) => m.name.startsWith('m'))
  t.same(tags.models.find((m) => m.name === 'fast'), { ...target, name: 'fast', model: 'fast' }, "the target's details under the alias's name")
  const models = await openai.models.list()
  t.ok(models.data.some((m) => m.id === 'fast'), '/v1/models lists the alias')

  // another replica uses a change within a second, as every fleet change
  const other = await fleet.replica({ ADMIN_TOKEN: ADMIN })
  t.equal((await admin(gw, 'POST', '/admin/aliases', { alias: 'team/quick:v1', model: 'm' })).status, 201, 'a name with a slash and a tag')
  const since = performance.now()
  t.ok(await eventually(async () => (await as('s-target', 'team/quick:v1', other)).status === 200, 1000), 'the other replica serves the new alias within a second')
  t.comment(`seen by the other replica after ${Math.round(performance.now() - since)} ms`)
  t.equal((await admin(gw, 'DELETE', '/admin/aliases/team/quick:v1')).status, 204, 'deleted by its name, slash and all')

  t.equal((await admin(gw, 'DELETE', '/admin/aliases/fast')).status, 204)
  t.equal((await as('s-target', 'fast')).status, 404, 'a deleted alias is no model')
  t.equal((await admin(gw, 'DELETE', '/admin/aliases/fast')).status, 404)
})

t.test('embedded mode: aliases in the inventory file, written by the admin API, refused when they do not hold', async (t) => {
  const sim = await startSimulator({ models: ['m'] })
  t.teardown(() => sim.close())
  const file = await writeInventoryFile(t, [{ name: 'one', model: 'm', port: sim.port, gpus: [1] }])
  const inventory = JSON.parse(await readFile(file, 'utf8'))
  await writeFile(file, JSON.stringify({ ...inventory, aliases: { fast: 'm' } }))
  const gw = await startEmbeddedGateway(t, { INVENTORY_FILE: file, ADMIN_TOKEN: ADMIN })

  const ollama = new Ollama({ host: gw.url })
  const answer = await ollama.chat({ model: 'fast', messages: [{ role: 'user', content: 'hi' }], stream: false })
  t.equal(answer.model, 'fast', 'an alias from the file')
  t.same(bodiesSeen(sim.requests, '/api/chat'), ['m'], 'forwarded as its target')

  t.equal((await admin(gw, 'POST', '/admin/aliases', { alias: 'quick', model: 'fast' })).status, 400, 'alias of an alias')
  t.equal((await admin(gw, 'POST', '/admin/aliases', { alias: 'quick', model: 'gone' })).status, 400, 'alias of a missing model')
  t.equal((await admin(gw, 'POST', '/admin/aliases', { alias: 'fast', model: 'm' })).status, 409, 'duplicate')
  t.equal((await admin(gw, 'POST', '/admin/aliases', { alias: 'm', model: 'm' })).status, 409, "a model's own name")
  t.same(JSON.parse(await readFile(file, 'utf8')).aliases, { fast: 'm' }, 'the file is unchanged')
  t.equal((await admin(gw, 'POST', '/admin/aliases', { alias: 'quick', model: 'm' })).status, 201)
  t.same(JSON.parse(await readFile(file, 'utf8')).aliases, { fast: 'm', quick: 'm' }, 'written to the file')
  t.equal((await ollama.generate({ model: 'quick', prompt: 'x', stream: false })).model, 'quick', 'used at once')

  const base = { computers: [{ id: 1, name: 'c', ip: '127.0.0.1' }], gpus: [{ id: 1, computer: 1 }], assignments: [{ id: 1, name: 'a', model: 'm', kind: 'llm', port: 1, gpus: [1] }] }
  t.throws(() => parseInventoryFile({ ...base, aliases: { x: 'nope' } }, 'f'), /aliases\["x"\] no model "nope"/, 'a file alias of a missing model')
  t.throws(() => parseInventoryFile({ ...base, aliases: { x: 'm', y: 'x' } }, 'f'), /aliases\["y"\] "x" is an alias/, 'a file alias of an alias')
  t.throws(() => parseInventoryFile({ ...base, aliases: { M: 'm' } }, 'f'), /is the name of a model/, "a file alias with a model's name")
})

t.test('a database not migrated yet: an alias is 409 saying to run npm run migrate', async (t) => {
  const fleet = await startFleet(t, { gpus: [1], upstreams: [{ model: 'm', gpus: [0] }] })
  const gw = await fleet.replica({ ADMIN_TOKEN: ADMIN })
  const res = await admin(gw, 'POST', '/admin/aliases', { alias: 'fast', model: 'm' })
  t.equal(res.status, 409)
  t.match((await res.json()).error, /run npm run migrate/)
  t.same(await (await admin(gw, 'GET', '/admin/aliases')).json(), [], 'none listed')
  t.equal((await fetch(gw.url + '/api/generate', { method: 'POST', body: JSON.stringify({ model: 'm', prompt: 'x', stream: false }) })).status, 200, 'requests work as before')
})

t.test('a reservation of an alias (CONTRACT 18: a key\'s scope, aliases resolved) holds a server of its target', async (t) => {
  const fleet = await startFleet(t, { gpus: [1], migrate: true, upstreams: [{ model: 'm', gpus: [0] }] })
  await insertKey(fleet.db.query, 'lists-alias', 's-alias', { models: '["fast"]' })
  await insertKey(fleet.db.query, 'lists-other', 's-other', { models: '["zzz"]' })
  // written by hand, as an operator may: the inventory reads the table
  await fleet.db.query("INSERT INTO maestro_model_aliases (alias, model) VALUES ('fast', 'm')")
  const gw = await fleet.replica()
  const reserve = async (secret: string): Promise<Response> => await fetch(gw.url + '/gpu/reserve', {
    method: 'POST', headers: { authorization: `Bearer ${secret}`, 'content-type': 'application/json' }, body: JSON.stringify({ outputType: 'text', model: 'fast' })
  })
  t.equal((await reserve('s-other')).status, 403, 'a key listing neither: 403')
  const reserved = await reserve('s-alias')
  t.equal(reserved.status, 200, 'a key listing the alias reserves it')
  const lease = await reserved.json() as { port: number, leaseId: string }
  t.equal(lease.port, fleet.upstreams[0].port, "on its target's server")
  t.equal((await fetch(gw.url + '/gpu/release', {
    method: 'POST', headers: { authorization: 'Bearer s-alias', 'content-type': 'application/json' }, body: JSON.stringify({ leaseId: lease.leaseId })
  })).status, 200)
})

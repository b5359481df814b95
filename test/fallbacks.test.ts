// Model fallbacks (CONTRACT 17): a request whose model has no undrained or reachable server, or
// whose expected wait passes FALLBACK_AFTER_MS, is served by the first fallback that can serve it
// sooner, before any lease is taken; x-maestro-model names the model that answered (on every leased
// answer); never a fallback the key may not use (then the request goes as it would without
// fallbacks). Real MariaDB, Redis, the simulator, the ollama and openai clients.
import t, { type Test } from 'tap'
import { Ollama } from 'ollama'
import OpenAI from 'openai'
import { startFleet, type Gateway, type TestFleet } from './helpers/gateway.js'
import { insertKey } from './helpers/api-keys.js'

const ADMIN = 'admin-secret'
const admin = (gw: Gateway, method: string, path: string, body?: unknown): Promise<Response> =>
  fetch(gw.url + path, {
    method,
    headers: { authorization: `Bearer ${ADMIN}`, ...(body === undefined ? {} : { 'content-type': 'application/json' }) },
    body: body === undefined ? undefined : JSON.stringify(body)
  })

/** Model `m` on GPU 0 (slow when asked), its fallback `b` on GPU 1; keys: one for both, one for `m` only. */
async function fleetOf (t: Test, slow = false): Promise<TestFleet> {
  const fleet = await startFleet(t, {
    gpus: [1, 1],
    migrate: true,
    upstreams: [
      { model: 'm', gpus: [0], simulator: slow ? { tokens: 20, tokenDelayMs: 40 } : { tokens: 3, tokenDelayMs: 1 } },
      { model: 'b', gpus: [1], simulator: { tokens: 3, tokenDelayMs: 1 } }
    ]
  })
  await insertKey(fleet.db.query, 'both', 's-both', { models: '["m", "b"]' })
  await insertKey(fleet.db.query, 'only-m', 's-only-m', { models: '["m"]' })
  return fleet
}

const generate = (gw: Gateway, secret: string, model = 'm'): Promise<Response> => fetch(gw.url + '/api/generate', {
  method: 'POST',
  headers: { authorization: `Bearer ${secret}`, 'content-type': 'application/json' },
  body: JSON.stringify({ model, prompt: 'x', stream: false })
})

const modelsSeen = (fleet: TestFleet, i: number): string[] => fleet.upstreams[i].requests.filter((r) => r.path === '/api/generate' || r.path === '/api/chat').map((r) => r.body?.model)

async function assignmentOf (gw: Gateway, model: string): Promise<string> {
  const list = await (await admin(gw, 'GET', '/admin/assignments')).json() as Array<{ id: number, model: string }>
  return String(list.find((a) => a.model === model)?.id)
}

t.test('the admin API: GET and PUT /admin/fallbacks/:model, refusals write nothing', async (t) => {
  const fleet = await fleetOf(t)
  const gw = await fleet.replica({ ADMIN_TOKEN: ADMIN })
  t.same(await (await admin(gw, 'GET', '/admin/fallbacks/m')).json(), { model: 'm', fallbacks: [] }, 'none yet')
  t.equal((await admin(gw, 'PUT', '/admin/fallbacks/m', { fallbacks: ['nope'] })).status, 400, 'a missing fallback')
  t.equal((await admin(gw, 'PUT', '/admin/fallbacks/m', { fallbacks: ['m:latest'] })).status, 400, 'the model itself')
  t.equal((await admin(gw, 'PUT', '/admin/fallbacks/m', { fallbacks: ['b', 'B'] })).status, 400, 'a fallback twice')
  t.equal((await admin(gw, 'PUT', '/admin/fallbacks/nope', { fallbacks: ['b'] })).status, 400, 'a missing model')
  t.same(await fleet.db.query('SELECT * FROM maestro_model_fallbacks'), [], 'nothing written')
  const put = await admin(gw, 'PUT', '/admin/fallbacks/m', { fallbacks: ['b'] })
  t.equal(put.status, 200)
  t.same(await put.json(), { model: 'm', fallbacks: ['b'] })
  t.same(await (await admin(gw, 'GET', '/admin/fallbacks/m')).json(), { model: 'm', fallbacks: ['b'] })
  t.same(await fleet.db.query('SELECT model, position, fallback FROM maestro_model_fallbacks'), [{ model: 'm', position: 0, fallback: 'b' }])
  t.equal((await admin(gw, 'PUT', '/admin/fallbacks/m', { fallbacks: [] })).status, 200)
  t.same(await fleet.db.query('SELECT * FROM maestro_model_fallbacks'), [], 'an empty list removes them')
})

t.test("a drained model's requests go to its fallback; x-maestro-model says so; never to a model the key may not use", async (t) => {
  const fleet = await fleetOf(t)
  const gw = await fleet.replica({ ADMIN_TOKEN: ADMIN })
  const plain = await generate(gw, 's-both')
  t.equal(plain.status, 200)
  t.equal(plain.headers.get('x-maestro-model'), 'm', 'every leased answer names its model')
  t.equal((await admin(gw, 'PUT', '/admin/fallbacks/m', { fallbacks: ['b'] })).status, 200)
  t.equal((await admin(gw, 'POST', `/admin/assignments/${await assignmentOf(gw, 'm')}/drain`)).status, 200)

  const ollama = new Ollama({ host: gw.url, headers: { Authorization: 'Bearer s-both' } })
  const answer = await ollama.generate({ model: 'm', prompt: 'x', stream: false })
  t.equal(answer.model, 'b', "the answer's model is the fallback that answered, as its upstream wrote it")
  t.same(modelsSeen(fleet, 1), ['b'], 'the fallback saw its own name in the body')
  const res = await generate(gw, 's-both')
  t.equal(res.status, 200)
  t.equal(res.headers.get('x-maestro-model'), 'b', 'x-maestro-model: the fallback')

  const narrow = await generate(gw, 's-only-m')
  t.equal(narrow.status, 503, 'a key that may not use the fallback: 503 drained, as without fallbacks')
  t.match((await narrow.json()).error, /drained/)
  t.same(modelsSeen(fleet, 1), ['b', 'b'], 'the fallback saw nothing of it')
})

t.test("an unreachable model's requests go to its fallback (openai client)", async (t) => {
  const fleet = await fleetOf(t)
  const gw = await fleet.replica({ ADMIN_TOKEN: ADMIN })
  t.equal((await admin(gw, 'PUT', '/admin/fallbacks/m', { fallbacks: ['b'] })).status, 200)
  await fleet.upstreams[0].close()
  const openai = new OpenAI({ baseURL: gw.url + '/v1', apiKey: 's-both', maxRetries: 0 })
  const { data, response } = await openai.chat.completions.create({ model: 'm', messages: [{ role: 'user', content: 'hi' }] }).withResponse()
  t.equal(response.headers.get('x-maestro-model'), 'b', 'answered by the fallback')
  t.equal(data.model, 'b')
  t.same(fleet.upstreams[1].requests.filter((r) => r.path === '/v1/chat/completions').map((r) => r.body.model), ['b'])
  // now m sits out a cooldown: the next request goes straight to the fallback
  const again = await generate(gw, 's-both')
  t.equal(again.headers.get('x-maestro-model'), 'b')
  const narrow = await generate(gw, 's-only-m')
  t.equal(narrow.status, 502, 'a key that may not use the fallback: 502 unreachable, as without fallbacks')
})

t.test('a request whose expected wait passes FALLBACK_AFTER_MS goes to a fallback that can serve it sooner', async (t) => {
  const fleet = await fleetOf(t, true)
  const gw = await fleet.replica({ ADMIN_TOKEN: ADMIN, FALLBACK_AFTER_MS: 200 })
  t.equal((await admin(gw, 'PUT', '/admin/fallbacks/m', { fallbacks: ['b'] })).status, 200)
  // one whole request teaches the gateway m's service time (20 tokens × 40 ms)
  const learn = await generate(gw, 's-both')
  t.equal(learn.headers.get('x-maestro-model'), 'm', 'a free server: no fallback')
  await learn.text()

  // hold m's only server with a slow streamed request
  const ollama = new Ollama({ host: gw.url, headers: { Authorization: 'Bearer s-both' } })
  const held = await ollama.generate({ model: 'm', prompt: 'x', stream: true })
  const first = await held[Symbol.asyncIterator]().next()
  t.equal(first.value?.model, 'm', 'the slow request runs on m')

  const narrowP = generate(gw, 's-only-m')
  const res = await generate(gw, 's-both')
  t.equal(res.status, 200)
  t.equal(res.headers.get('x-maestro-model'), 'b', 'expected to wait past FALLBACK_AFTER_MS: served by the fallback')
  t.equal((await res.json()).model, 'b')
  const narrow = await narrowP
  t.equal(narrow.headers.get('x-maestro-model'), 'm', 'a key that may not use the fallback waits for m')
  await narrow.text()
  for await (const part of held) if (part.done) break
  t.same(modelsSeen(fleet, 1), ['b'], 'only the one request went to the fallback')
})

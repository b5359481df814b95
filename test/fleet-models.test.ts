// Fleet-wide model management (issue 11): /api/pull on every server, unload where loaded,
// WARM_MODELS, and the refused model-store routes, through the real `ollama` client.
import t, { type Test } from 'tap'
import { setTimeout as sleep } from 'node:timers/promises'
import { Ollama } from 'ollama'
import { assertAllFree, startFleet, type TestFleet } from './helpers/gateway.js'
import { failPulls, pullsOpen } from '../scripts/simulator/ollama-extras.js'
import { startSimulator } from './helpers/upstream-simulator.js'

const TOKEN = 'admin-secret'

async function until (what: string, condition: () => boolean | Promise<boolean>, ms = 5000): Promise<void> {
  const deadline = performance.now() + ms
  while (!await condition()) {
    if (performance.now() > deadline) throw new Error(`timed out waiting for ${what}`)
    await sleep(10)
  }
}

const tagsOf = async (url: string): Promise<string[]> =>
  ((await (await fetch(`${url}/api/tags`)).json()) as { models: Array<{ name: string }> }).models.map((m) => m.name)

async function settled (t: Test, fleet: TestFleet, gw: { url: string }): Promise<void> {
  await fleet.recorder.whenIdle()
  await assertAllFree(t, gw)
  t.same(fleet.recorder.overlaps, [], 'no GPU ever held by two requests at once')
}

/** Two Ollama servers assigned `qwen3` that do not have it yet. */
async function pullFleet (t: Test, tokenDelayMs = 5): Promise<TestFleet> {
  return await startFleet(t, {
    gpus: [1, 1],
    upstreams: [
      { model: 'qwen3', name: 'box-a', gpus: [0], simulator: { models: ['llama3.2'], tokenDelayMs } },
      { model: 'qwen3', name: 'box-b', gpus: [1], simulator: { models: ['llama3.2'], tokenDelayMs } }
    ],
    options: { ADMIN_TOKEN: TOKEN }
  })
}

t.test('a pull reaches every server assigned the model, streams both servers\' progress, ends in success', async (t) => {
  const fleet = await pullFleet(t)
  const gw = await fleet.replica()
  const ollama = new Ollama({ host: gw.url, headers: { Authorization: `Bearer ${TOKEN}` } })
  // both servers' GPUs held by reservations: a pull that took a lease would wait for them
  const admin = { authorization: `Bearer ${TOKEN}` }
  const reserve = async (): Promise<{ leaseId: string }> => await (await fetch(`${gw.url}/gpu/reserve`, {
    method: 'POST', headers: admin, body: JSON.stringify({ outputType: 'text', model: 'qwen3' }), signal: AbortSignal.timeout(3000)
  })).json() as { leaseId: string }
  const reservations = [await reserve(), await reserve()]
  t.same(await fleet.heldGpus(), [...fleet.gpuIds].sort(), 'every GPU of the model is leased')
  const parts: Array<Record<string, any>> = []
  const pulled = (async () => { for await (const part of await ollama.pull({ model: 'qwen3', stream: true })) parts.push(part) })()
  await Promise.race([pulled, sleep(5000).then(() => { throw new Error('the pull waited for a GPU') })])
  for (const { leaseId } of reservations) await fetch(`${gw.url}/gpu/release`, { method: 'POST', headers: admin, body: JSON.stringify({ leaseId }) })
  t.same(parts.at(-1), { status: 'success' }, 'the last line is the fleet\'s success')
  t.ok(parts.slice(0, -1).every((p) => p.server === 'box-a' || p.server === 'box-b'), 'every progress line says its server')
  for (const server of ['box-a', 'box-b']) {
    const mine = parts.filter((p) => p.server === server)
    t.ok(mine.some((p) => p.status === 'pulling manifest'), `${server}: manifest line`)
    t.ok(mine.some((p) => typeof p.digest === 'string' && p.total > 0 && p.completed > 0), `${server}: layer progress with digest, total, completed`)
    t.ok(mine.some((p) => p.status === 'writing manifest'), `${server}: writing manifest`)
    t.equal(mine.at(-1)?.status, `pulled on ${server}`, `${server}: its own success, not a client-stopping "success"`)
  }
  t.equal(parts.filter((p) => p.status === 'success').length, 1, 'only the fleet\'s last line says success')
  for (const sim of fleet.upstreams) {
    const pulls = sim.requests.filter((r) => r.path === '/api/pull')
    t.equal(pulls.length, 1, 'each server got one pull')
    t.same(pulls[0].body, { model: 'qwen3', stream: true })
    t.ok((await tagsOf(sim.url)).includes('qwen3:latest'), 'the model is on the server now')
  }

  // not streamed: one answer at the end
  const res = await ollama.pull({ model: 'qwen3', stream: false })
  t.same(res, { status: 'success' })
  t.same(fleet.recorder.events, [], 'pulls take no GPU')
  await settled(t, fleet, gw)
})

t.test('one failing server ends the pull in an error line naming it; stream:false answers 502', async (t) => {
  const fleet = await pullFleet(t)
  const gw = await fleet.replica()
  failPulls(fleet.upstreams[1], 'pull model manifest: file does not exist')
  const res = await fetch(`${gw.url}/api/pull`, { method: 'POST', headers: { authorization: `Bearer ${TOKEN}` }, body: JSON.stringify({ model: 'qwen3' }) })
  t.equal(res.status, 200)
  t.match(res.headers.get('content-type'), /application\/x-ndjson/)
  const lines = (await res.text()).trim().split('\n').map((l) => JSON.parse(l))
  t.same(lines.at(-1), { error: 'box-b: pull model manifest: file does not exist' }, 'the last line is the error, naming the server')
  t.ok(lines.some((l) => l.server === 'box-a' && l.status === 'pulled on box-a'), 'the other server\'s pull ran to its end')
  t.ok(lines.some((l) => l.server === 'box-b' && /^failed on box-b/.test(l.status)), 'the failure is also a progress line')
  t.notOk(lines.slice(0, -1).some((l) => 'error' in l), 'no error line before the last (ollama-js stops at the first)')

  const ollama = new Ollama({ host: gw.url, headers: { Authorization: `Bearer ${TOKEN}` } })
  await t.rejects(async () => { for await (const _ of await ollama.pull({ model: 'qwen3', stream: true })) {} },
    { message: 'box-b: pull model manifest: file does not exist' }, 'ollama-js raises the error line')
  await t.rejects(ollama.pull({ model: 'qwen3', stream: false }), { name: 'ResponseError', status_code: 502, error: 'box-b: pull model manifest: file does not exist' })
  await settled(t, fleet, gw)
})

t.test('pull: 401 without the admin token, 404 for a model without an assignment, 400 without a model', async (t) => {
  const fleet = await pullFleet(t)
  const gw = await fleet.replica()
  await t.rejects(new Ollama({ host: gw.url }).pull({ model: 'qwen3' }), { name: 'ResponseError', status_code: 401 })
  await t.rejects(new Ollama({ host: gw.url, headers: { Authorization: 'Bearer wrong' } }).pull({ model: 'qwen3' }), { name: 'ResponseError', status_code: 401 })
  const ollama = new Ollama({ host: gw.url, headers: { Authorization: `Bearer ${TOKEN}` } })
  await t.rejects(ollama.pull({ model: 'mistral' }), { name: 'ResponseError', status_code: 404, error: "model 'mistral' not found" })
  const empty = await fetch(`${gw.url}/api/pull`, { method: 'POST', headers: { authorization: `Bearer ${TOKEN}` }, body: '{}' })
  t.equal(empty.status, 400)
  t.same(await empty.json(), { error: 'model is required' })
  for (const sim of fleet.upstreams) t.equal(sim.requests.filter((r) => r.path === '/api/pull').length, 0, 'no server was asked')
})

t.test('a * assignment serves any model: a model no assignment names is pulled on the * servers', async (t) => {
  const fleet = await startFleet(t, {
    gpus: [1, 1],
    upstreams: [
      { model: 'qwen3', name: 'named', gpus: [0], simulator: { models: ['qwen3'], tokenDelayMs: 1 } },
      { model: '*', name: 'any', gpus: [1], simulator: { models: ['llama3.2'], tokenDelayMs: 1 } }
    ]
  })
  const gw = await fleet.replica()
  const [named, any] = fleet.upstreams
  const ollama = new Ollama({ host: gw.url })
  t.same(await ollama.pull({ model: 'mistral' }), { status: 'success' })
  t.equal(any.requests.filter((r) => r.path === '/api/pull').length, 1, 'the * server pulled it')
  t.equal(named.requests.filter((r) => r.path === '/api/pull').length, 0, 'the server of another model did not')
  t.ok((await tagsOf(any.url)).includes('mistral:latest'))
  t.same(await ollama.pull({ model: 'qwen3' }), { status: 'success' })
  t.equal(named.requests.filter((r) => r.path === '/api/pull').length, 1, 'a named model goes to its own servers')
  t.equal(any.requests.filter((r) => r.path === '/api/pull').length, 1)
})

t.test('a model pulled onto * servers is listed (once) by /api/tags and /v1/models when every one of them has it', async (t) => {
  const fleet = await startFleet(t, {
    gpus: [1, 1],
    upstreams: [
      { model: '*', name: 'any-1', gpus: [0], simulator: { models: ['llama3.2'], tokenDelayMs: 1 } },
      { model: '*', name: 'any-2', gpus: [1], simulator: { models: ['llama3.2'], tokenDelayMs: 1 } }
    ],
    options: { UPSTREAM_POLL_MS: 100 }
  })
  const gw = await fleet.replica()
  const ollama = new Ollama({ host: gw.url })
  const listed = async (): Promise<{ tags: string[], v1: string[] }> => ({
    tags: (await ollama.list()).models.map((m) => m.name).sort(),
    v1: ((await (await fetch(`${gw.url}/v1/models`)).json()) as { data: Array<{ id: string }> }).data.map((m) => m.id).sort()
  })
  await until('the first poll', async () => (await listed()).tags.length > 0)
  t.same(await listed(), { tags: ['llama3.2:latest'], v1: ['llama3.2:latest'] })
  // on one of the two only (pulled there directly): not offered, a request could land on the other
  const direct = await new Ollama({ host: fleet.upstreams[0].url }).pull({ model: 'mistral' })
  t.same(direct, { status: 'success' })
  await sleep(400)
  t.same(await listed(), { tags: ['llama3.2:latest'], v1: ['llama3.2:latest'] }, 'a model on one server of two is not listed')
  t.same(await ollama.pull({ model: 'mistral' }), { status: 'success' }, 'pulled through the gateway: on both now')
  await until('mistral listed', async () => (await listed()).tags.includes('mistral:latest'))
  t.same(await listed(), { tags: ['llama3.2:latest', 'mistral:latest'], v1: ['llama3.2:latest', 'mistral:latest'] }, 'listed once, in both lists')
})

t.test('a client that leaves a pull cancels it on every server', async (t) => {
  const fleet = await pullFleet(t, 60)
  const gw = await fleet.replica()
  const controller = new AbortController()
  const res = await fetch(`${gw.url}/api/pull`, {
    method: 'POST', headers: { authorization: `Bearer ${TOKEN}` }, body: JSON.stringify({ model: 'qwen3' }), signal: controller.signal
  })
  const reader = (res.body as ReadableStream<Uint8Array>).getReader()
  await reader.read() // the first progress line
  await until('both servers pulling', () => fleet.upstreams.every((s) => s.requests.some((r) => r.path === '/api/pull')))
  controller.abort()
  // (the background poll keeps a connection of its own to each server)
  await until('the servers\' pull connections closed', () => fleet.upstreams.every((s) => pullsOpen(s) === 0))
  // a full pull takes 9 lines × 60 ms: had it gone on, the model would be listed by now
  await sleep(700)
  for (const sim of fleet.upstreams) t.notOk((await tagsOf(sim.url)).includes('qwen3:latest'), 'the pull did not finish unseen')
})

t.test('an unload reaches every server where the model is loaded and no other, each under its lease', async (t) => {
  const fleet = await startFleet(t, {
    gpus: [1, 1, 1],
    upstreams: [
      { model: 'm', name: 'a', gpus: [0], simulator: { models: ['m'], resident: ['m'] } },
      { model: 'm', name: 'b', gpus: [1], simulator: { models: ['m'], resident: ['m'] } },
      { model: 'm', name: 'c', gpus: [2], simulator: { models: ['m'] } }
    ]
  })
  const gw = await fleet.replica()
  const [a, b, c] = fleet.upstreams
  const ollama = new Ollama({ host: gw.url })
  const loaded = async (): Promise<Array<{ name: string, servers?: string[] }>> => (await ollama.ps()).models as any
  t.same((await loaded()).map((m) => [m.name, m.servers]), [['m:latest', ['a', 'b']]], '/api/ps: loaded on a and b, listed once')
  // a request running on a: the unload there waits for it (its lease)
  const busy = ollama.generate({ model: 'm', prompt: 'hi', stream: false })
  await until('a busy', () => a.running() + b.running() > 0)
  const answer = await ollama.generate({ model: 'm', prompt: '', keep_alive: 0 })
  t.equal(answer.done_reason, 'unload')
  t.equal(answer.done, true)
  await busy
  t.same(a.resident(), [], 'unloaded on a')
  t.same(b.resident(), [], 'unloaded on b')
  t.same(c.requests.filter((r) => r.method === 'POST'), [], 'c, where it was not loaded, was sent nothing')
  t.same(await loaded(), [], '/api/ps: loaded nowhere now')
  for (const sim of [a, b]) {
    const unloads = sim.requests.filter((r) => r.path === '/api/generate' && r.body.keep_alive === 0)
    t.equal(unloads.length, 1, 'one unload request per loaded server')
  }

  // chat with no messages: the same, and now it is loaded nowhere
  const chat = await ollama.chat({ model: 'm', messages: [], keep_alive: 0 })
  t.equal(chat.done_reason, 'unload')
  t.equal(fleet.upstreams.flatMap((s) => s.requests.filter((r) => r.path === '/api/chat')).length, 0, 'nothing loaded: no server asked')

  // without keep_alive 0 it is an ordinary leased load on one server
  const load = await ollama.generate({ model: 'm', prompt: '' })
  t.equal(load.done_reason, 'load')
  t.equal(fleet.upstreams.filter((s) => s.resident().length > 0).length, 1, 'loaded on one server')
  await settled(t, fleet, gw)
})

t.test('WARM_MODELS loads each model on every server assigned it at start', async (t) => {
  const fleet = await startFleet(t, {
    gpus: [1, 1, 1],
    upstreams: [
      { model: 'm', name: 'a', gpus: [0], simulator: { models: ['m'] } },
      { model: 'm', name: 'b', gpus: [1], simulator: { models: ['m'] } },
      { model: 'other', name: 'c', gpus: [2], simulator: { models: ['other'] } }
    ],
    options: { WARM_MODELS: 'm, missing' }
  })
  const gw = await fleet.replica()
  const [a, b, c] = fleet.upstreams
  await until('m loaded on a and b', () => a.resident().length === 1 && b.resident().length === 1)
  for (const sim of [a, b]) {
    const load = sim.requests.find((r) => r.path === '/api/generate')
    t.same(load?.body, { model: 'm', prompt: '', keep_alive: -1, stream: false }, 'an empty-prompt load with the gateway\'s keep_alive')
  }
  t.same(c.requests.filter((r) => r.method === 'POST'), [], 'a server not assigned a warm model is left alone')
  await settled(t, fleet, gw)
})

t.test('WARM_MODELS loads again on a server that comes back from unreachable', async (t) => {
  const fleet = await startFleet(t, {
    gpus: [1, 1],
    upstreams: [
      { model: 'm', name: 'a', gpus: [0], simulator: { models: ['m'] } },
      { model: 'm', name: 'b', gpus: [1], simulator: { models: ['m'] } }
    ],
    options: { WARM_MODELS: 'm', UPSTREAM_POLL_MS: 100 }
  })
  const gw = await fleet.replica()
  const [a, b] = fleet.upstreams
  await until('m loaded on a and b', () => a.resident().length === 1 && b.resident().length === 1)
  // a restarts: down for a few polls, then up with nothing loaded
  await a.close()
  await sleep(400)
  const restarted = await startSimulator({ port: a.port, gpuIds: [fleet.gpuIds[0]], recorder: fleet.recorder, models: ['m'] })
  t.teardown(restarted.close)
  await until('m loaded again on the restarted server', () => restarted.resident().length === 1)
  t.match(restarted.requests.find((r) => r.path === '/api/generate')?.body, { model: 'm', prompt: '' })
  t.equal(b.requests.filter((r) => r.path === '/api/generate').length, 1, 'the server that stayed up was not loaded again')
  await settled(t, fleet, gw)
})

t.test('the fleet\'s model store is managed per server: refusals that ollama-js shows as messages', async (t) => {
  const fleet = await startFleet(t, { gpus: [1], upstreams: [{ model: 'm', gpus: [0] }] })
  const gw = await fleet.replica()
  const ollama = new Ollama({ host: gw.url })
  const refused = { name: 'ResponseError', status_code: 501, error: /managed per server/ }
  await t.rejects(ollama.delete({ model: 'm' }), refused, 'delete')
  await t.rejects(ollama.copy({ source: 'm', destination: 'm2' }), refused, 'copy')
  await t.rejects(ollama.create({ model: 'm2', from: 'm' }), refused, 'create')
  await t.rejects(ollama.push({ model: 'm' }), refused, 'push')
  await t.rejects(ollama.push({ model: 'm', stream: true }), refused, 'push, streamed')
  for (const method of ['HEAD', 'POST']) {
    const res = await fetch(`${gw.url}/api/blobs/sha256:${'0'.repeat(64)}`, { method, body: method === 'POST' ? Buffer.alloc(100_000) : undefined })
    t.equal(res.status, 501, `${method} /api/blobs`)
    t.match(res.headers.get('content-type'), /application\/json/)
    if (method === 'POST') t.match(await res.json(), { error: /managed per server/ })
  }
  t.same(fleet.upstreams[0].requests, [], 'nothing reached the server')
})

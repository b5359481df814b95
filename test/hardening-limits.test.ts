// Hardening, round 2 (issue 15; the bodies held in memory: test/body-memory.test.ts): model name length, case-variant
// keys, upstream redirects, the catalogue from the background poll, malformed upstream lists,
// internal error text on open routes, the 502 text, upload pins, slow readers. Each test here
// fails on the tree before the issue was fixed.
import t, { type Test } from 'tap'
import http from 'node:http'
import net from 'node:net'
import type { AddressInfo } from 'node:net'
import { writeFile } from 'node:fs/promises'
import { setTimeout as sleep } from 'node:timers/promises'
import { UploadPins } from '../services/leases/upload-pins.js'
import { assertAllFree, startFleet } from './helpers/gateway.js'
import { startEmbeddedGateway, writeInventoryFile } from './helpers/embedded.js'
import { startDiffusionSimulator, startSimulator, startSpeechSimulator, type Simulator } from './helpers/upstream-simulator.js'

interface Answer { status: number, headers: Headers, text: string, body: any }

async function post (url: string, body: string | Buffer, headers: Record<string, string> = {}): Promise<Answer> {
  const res = await fetch(url, { method: 'POST', body: body as BodyInit, headers })
  const text = await res.text()
  let parsed: unknown
  try { parsed = JSON.parse(text) } catch { parsed = undefined }
  return { status: res.status, headers: res.headers, text, body: parsed }
}

async function get (url: string): Promise<Answer> {
  const res = await fetch(url)
  const text = await res.text()
  let parsed: unknown
  try { parsed = JSON.parse(text) } catch { parsed = undefined }
  return { status: res.status, headers: res.headers, text, body: parsed }
}

/** A plain HTTP server for wire cases the simulators do not cover; its requests are recorded. */
async function rawServer (t: Test, handle: (req: http.IncomingMessage, res: http.ServerResponse) => void): Promise<{ port: number, url: string, seen: string[] }> {
  const seen: string[] = []
  const sockets = new Set<net.Socket>()
  const server = http.createServer((req, res) => { seen.push(`${req.method ?? ''} ${req.url ?? ''}`); req.resume(); handle(req, res) })
  server.on('connection', (s) => { sockets.add(s); s.once('close', () => sockets.delete(s)) })
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve))
  t.teardown(async () => { for (const s of sockets) s.destroy(); await new Promise((resolve) => server.close(resolve)) })
  const port = (server.address() as AddressInfo).port
  return { port, url: `http://127.0.0.1:${port}`, seen }
}

async function simulator (t: Test, options: Parameters<typeof startSimulator>[0] = {}): Promise<Simulator> {
  const sim = await startSimulator(options)
  t.teardown(() => sim.close())
  return sim
}

/* ------------------------------------------------------------------------------------------ */
/* 2. model names                                                                              */
/* ------------------------------------------------------------------------------------------ */

t.test('a 1 MB model name is 400 on every route that takes a model, and /metrics does not grow', async (t) => {
  const sim = await simulator(t, { models: ['m'] })
  const sd = await startDiffusionSimulator({})
  t.teardown(() => sd.close())
  const file = await writeInventoryFile(t, [{ name: 'llm', model: '*', port: sim.port, gpus: [1] }, { name: 'sd', model: '*', kind: 'diffusor', port: sd.port, gpus: [2] }])
  const gw = await startEmbeddedGateway(t, { INVENTORY_FILE: file })
  const long = 'x'.repeat(1024 * 1024)
  const routes: Array<[string, (model: unknown) => unknown]> = [
    ['/api/chat', (model) => ({ model, messages: [] })],
    ['/api/generate', (model) => ({ model, prompt: 'x' })],
    ['/api/embed', (model) => ({ model, input: 'x' })],
    ['/api/embeddings', (model) => ({ model, prompt: 'x' })],
    ['/api/show', (model) => ({ model })],
    ['/api/show', (name) => ({ name })],
    ['/v1/chat/completions', (model) => ({ model, messages: [] })],
    ['/v1/completions', (model) => ({ model, prompt: 'x' })],
    ['/v1/embeddings', (model) => ({ model, input: 'x' })],
    ['/v1/images/generations', (model) => ({ model, prompt: 'x' })],
    ['/txt2img', (model) => ({ model, prompt: 'x' })],
    ['/img2img', (model) => ({ model, prompt: 'x', file_id: 'f' })],
    ['/gpu/reserve', (model) => ({ outputType: 'text', model })]
  ]
  // Every route answered once with a short bad model first, so its label set exists already.
  for (const [path, body] of routes) await post(gw.url + path, JSON.stringify(body(42)))
  await fetch(gw.url + '/metrics') // its own label set, too
  // The gateway's own metrics (the process's GC metrics gain labels as collections of new kinds happen).
  const scrape = async (): Promise<string> => (await (await fetch(gw.url + '/metrics')).text()).split('\n').filter((l) => !/^(# [A-Z]+ )?maestro_(nodejs|process)_/.test(l)).join('\n')
  const before = await scrape()
  for (const [path, body] of routes) {
    const res = await post(gw.url + path, JSON.stringify(body(long)))
    t.equal(res.status, 400, path)
    t.match(res.text, /longer than 256 characters/, `${path}: says why`)
    t.ok(res.text.length < 1000, `${path}: the name is not echoed`)
  }
  t.equal(sim.requests.length, 0, 'no long name reached an upstream')
  const after = await scrape()
  t.comment(`/metrics (the gateway's own): ${before.length} bytes before, ${after.length} after`)
  t.ok(Math.abs(after.length - before.length) < 1000, '/metrics about the same size (counts and timings change, no new label)')
  t.ok(after.split('\n').every((l) => l.length < 1000), 'no metric line carries a long name')
  const longest = await post(gw.url + '/api/generate', JSON.stringify({ model: 'y'.repeat(256), prompt: 'x', stream: false }))
  // taken: forwarded to the '*' assignment, whose server does not have the model (its own 404);
  // 'not 400' let a 500 pass
  t.equal(longest.status, 404, `256 characters are taken (${longest.text.slice(0, 80)})`)
  t.equal(sim.requests.at(-1)?.body.model, 'y'.repeat(256), 'and reached the upstream')
})

t.test('a speech upload\'s model (from ?model= or the field before the file) over 256 characters is 400, before any upstream', async (t) => {
  const speech = await startSpeechSimulator({ models: ['whisper-1'] })
  t.teardown(() => speech.close())
  const file = await writeInventoryFile(t, [{ name: 'stt', model: '*', kind: 'speech', port: speech.port, gpus: [1] }])
  const gw = await startEmbeddedGateway(t, { INVENTORY_FILE: file })
  const upload = (model: string): { body: string, headers: Record<string, string> } => {
    const b = 'maestro-boundary'
    return {
      body: `--${b}\r\nContent-Disposition: form-data; name="model"\r\n\r\n${model}\r\n--${b}\r\nContent-Disposition: form-data; name="file"; filename="a.wav"\r\nContent-Type: audio/wav\r\n\r\nRIFF\r\n--${b}--\r\n`,
      headers: { 'content-type': `multipart/form-data; boundary=${b}` }
    }
  }
  for (const path of ['/v1/audio/transcriptions', '/v1/audio/translations']) {
    const inQuery = await post(`${gw.url}${path}?model=${'q'.repeat(8000)}`, upload('').body, upload('').headers)
    t.equal(inQuery.status, 400, `${path}: ?model= of 8000 characters`)
    t.match(inQuery.text, /longer than 256 characters/)
    const { body, headers } = upload('f'.repeat(60_000))
    const inField = await post(gw.url + path, body, headers)
    t.equal(inField.status, 400, `${path}: a model field of 60000 characters`)
    t.match(inField.text, /longer than 256 characters/)
    t.ok(inField.text.length < 1000, 'the name is not echoed')
  }
  t.equal(speech.requests.length, 0, 'no long name reached the speech server')
  const { body, headers } = upload('w'.repeat(256))
  t.not((await post(gw.url + '/v1/audio/transcriptions', body, headers)).status, 400, '256 characters are taken')
})

/* ------------------------------------------------------------------------------------------ */
/* 3. case-variant keys                                                                        */
/* ------------------------------------------------------------------------------------------ */

t.test('top-level keys that fold to model, stream or keep_alive are 400 on every route that forwards a body', async (t) => {
  const fleet = await startFleet(t, {
    gpus: [1, 1],
    upstreams: [{ model: 'small', gpus: [0], simulator: { models: ['small', 'big'] } }, { model: 'sd', kind: 'diffusor', gpus: [1] }]
  })
  const gw = await fleet.replica()
  const variants = [
    '{"model":"small","Model":"big","prompt":"x"}',
    '{"MODEL":"big","model":"small","prompt":"x"}',
    '{"model":"small","prompt":"x","KEEP_ALIVE":0}',
    '{"model":"small","prompt":"x","\\u212Aeep_alive":0}',
    '{"model":"small","prompt":"x","\u212Aeep_alive":0}',
    '{"model":"small","prompt":"x","Stream":false}',
    '{"model":"small","prompt":"x","\u017Ftream":false}',
    '{"model":"small","prompt":"x","\\u017ftream":false}',
    '{"model":"small","prompt":"x","\\u004dodel":"big"}'
  ]
  const routes = ['/api/chat', '/api/generate', '/api/embed', '/api/embeddings', '/api/show', '/v1/chat/completions', '/v1/completions', '/v1/embeddings', '/txt2img', '/img2img', '/v1/images/generations']
  for (const path of routes) {
    for (const body of variants) {
      const res = await post(gw.url + path, path === '/txt2img' || path === '/img2img' || path === '/v1/images/generations' ? body.replace('"small"', '"sd"') : body)
      t.equal(res.status, 400, `${path} ${body}`)
      t.match(res.text, /case variant/, `${path}: says why`)
    }
  }
  t.equal(fleet.upstreams.reduce((n, u) => n + u.requests.length, 0), 0, 'none reached an upstream')
  // Keys that only look alike, and the exact keys, go through.
  for (const body of ['{"model":"small","prompt":"x","stream":false,"keep_alive":5,"models":1,"Modal":2,"keep-alive":3,"streams":4}', '{"model":"small","prompt":"x","stream":false,"modeL_":1}']) {
    t.equal((await post(gw.url + '/api/generate', body)).status, 200, body)
  }
  t.same(fleet.upstreams[0].requests.map((r) => r.body.model), ['small', 'small'], 'the upstream only ever ran the leased model')
})

/* ------------------------------------------------------------------------------------------ */
/* 4, 5, 6. the catalogue                                                                      */
/* ------------------------------------------------------------------------------------------ */

t.test('an upstream that redirects is never followed: the redirect target receives nothing', async (t) => {
  const target = await rawServer(t, (_req, res) => res.end('{"version":"9.9.9-evil","models":[{"name":"evil","model":"evil"}]}'))
  const redirecting = await rawServer(t, (req, res) => {
    res.writeHead(req.url === '/api/ps' ? 307 : 302, { location: `${target.url}${req.url ?? '/'}` }).end()
  })
  const sd = await rawServer(t, (_req, res) => { res.writeHead(303, { location: `${target.url}/txt2img` }).end() })
  const file = await writeInventoryFile(t, [
    { name: 'redirects', model: '*', port: redirecting.port, gpus: [1] },
    { name: 'sd-redirects', model: 'sd', kind: 'diffusor', port: sd.port, gpus: [2] }
  ])
  const gw = await startEmbeddedGateway(t, { INVENTORY_FILE: file, UPSTREAM_POLL_MS: 100 })
  await sleep(400)
  const version = await get(gw.url + '/api/version')
  t.equal(version.status, 200)
  t.not(version.body.version, '9.9.9-evil', 'the version is not the redirect target\'s')
  for (const path of ['/api/tags', '/api/ps', '/v1/models']) {
    const res = await get(gw.url + path)
    t.equal(res.status, 200, path)
    t.notMatch(res.text, /evil/, `${path}: nothing from the redirect target`)
  }
  const image = await post(gw.url + '/v1/images/generations', '{"model":"sd","prompt":"x"}')
  t.equal(image.status, 502, 'an image call answered with a redirect is that upstream\'s failure')
  t.ok(redirecting.seen.some((r) => r === 'GET /api/ps'), 'the upstream was polled')
  t.same(target.seen, [], 'the redirect target never received a request')
})

t.test('50 concurrent /api/tags cause at most one poll\'s worth of upstream calls; silent upstreams slow nothing', async (t) => {
  const sims = await Promise.all([1, 2, 3].map(async (i) => await simulator(t, { models: [`m${i}`] })))
  // Four upstreams that accept connections and never answer.
  const silent = await Promise.all([1, 2, 3, 4].map(async () => await rawServer(t, () => {})))
  const file = await writeInventoryFile(t, [
    ...sims.map((s, i) => ({ name: `sim${i}`, model: `m${i + 1}`, port: s.port, gpus: [i + 1] })),
    ...silent.map((s, i) => ({ name: `silent${i}`, model: `quiet${i}`, port: s.port, gpus: [i + 10] }))
  ])
  const gw = await startEmbeddedGateway(t, { INVENTORY_FILE: file, UPSTREAM_POLL_MS: 60_000 })
  const calls = (): number => sims.reduce((n, s) => n + s.requests.length + s.polls.length, 0) + silent.reduce((n, s) => n + s.seen.length, 0)
  const before = calls()
  const started = performance.now()
  const answers = await Promise.all(Array.from({ length: 50 }, async () => await get(gw.url + '/api/tags')))
  const ms = performance.now() - started
  t.ok(answers.every((a) => a.status === 200), 'all answered')
  t.same(answers[0].body.models.map((m: any) => m.name).sort(), ['m1:latest', 'm2:latest', 'm3:latest', 'quiet0', 'quiet1', 'quiet2', 'quiet3'].sort())
  const made = calls() - before
  // One poll is /api/ps, /api/tags and /api/version per upstream: 7 upstreams, 21 calls.
  t.ok(made <= 3 * 7, `${made} upstream calls for 50 requests`)
  t.ok(ms < 2000, `50 answers in ${ms.toFixed(0)} ms with four silent upstreams`)
  const version = performance.now()
  t.equal((await get(gw.url + '/api/version')).body.version, '0.33.0', 'the version of an upstream that answers')
  t.ok(performance.now() - version < 500, '/api/version waits for no silent upstream')
})

t.test('malformed entries of an upstream\'s lists are skipped; the other upstreams\' models stay listed', async (t) => {
  const good = await simulator(t, { models: ['fine'] })
  const bad = await rawServer(t, (req, res) => {
    res.writeHead(200, { 'content-type': 'application/json' })
    if (req.url === '/api/version') res.end('{"version":{"no":1}}')
    else res.end(JSON.stringify({ models: [{ name: 42 }, { model: null }, 'text', null, [1], { name: '' }, { name: 'x'.repeat(300) }, { name: 'ok:1b', details: 'not an object' }] }))
  })
  const broken = await rawServer(t, (_req, res) => { res.writeHead(200, { 'content-type': 'application/json' }).end('{"models":') })
  const file = await writeInventoryFile(t, [
    { name: 'good', model: 'fine', port: good.port, gpus: [1] },
    { name: 'bad', model: '*', port: bad.port, gpus: [2] },
    { name: 'broken', model: 'other', port: broken.port, gpus: [3] }
  ])
  const gw = await startEmbeddedGateway(t, { INVENTORY_FILE: file })
  const tags = await get(gw.url + '/api/tags')
  t.equal(tags.status, 200)
  t.same(tags.body.models.map((m: any) => m.name).sort(), ['fine:latest', 'ok:1b', 'other'])
  t.ok(tags.body.models.every((m: any) => typeof m.name === 'string' && typeof m.model === 'string'), 'every entry has a string name and model')
  t.equal(tags.body.models.find((m: any) => m.name === 'fine:latest')?.details?.format, 'gguf', 'details from the upstream that answered')
  const models = await get(gw.url + '/v1/models')
  t.equal(models.status, 200)
  t.same(models.body.data.map((m: any) => m.id).sort(), ['fine:latest', 'ok:1b', 'other'])
  t.equal((await get(gw.url + '/v1/models/ok:1b')).status, 200)
  t.equal((await get(gw.url + '/api/ps')).status, 200)
  t.equal((await get(gw.url + '/api/version')).body.version, '0.33.0', 'a version that is not a string is skipped')
})

t.test('/api/ps lists a model loaded on two servers once, with both; residency follows the gateway\'s own traffic', async (t) => {
  const fleet = await startFleet(t, {
    gpus: [1, 1, 1],
    upstreams: [
      { model: 'shared', gpus: [0], name: 'a', simulator: { resident: ['shared'] } },
      { model: 'shared', gpus: [1], name: 'b', simulator: { resident: ['shared'] } },
      { model: 'solo', gpus: [2], name: 'c' }
    ],
    options: { UPSTREAM_POLL_MS: 100 }
  })
  const gw = await fleet.replica()
  const ps = await get(gw.url + '/api/ps')
  t.equal(ps.status, 200)
  const shared = ps.body.models.filter((m: any) => m.name.startsWith('shared'))
  t.equal(shared.length, 1, 'listed once')
  t.same(shared[0]?.servers?.sort(), ['a', 'b'], 'with the servers it is loaded on')
  await fleet.upstreams[2].close()
})

/* ------------------------------------------------------------------------------------------ */
/* 7, 8. error text, upload pins, slow readers                                                 */
/* ------------------------------------------------------------------------------------------ */

t.test('/health never shows the inventory loader\'s text: file contents or driver messages', async (t) => {
  const sim = await simulator(t, { models: ['m'] })
  const file = await writeInventoryFile(t, [{ name: 'only', model: '*', port: sim.port, gpus: [1] }])
  const gw = await startEmbeddedGateway(t, { INVENTORY_FILE: file, INVENTORY_REFRESH_MS: 100 })
  await writeFile(file, 'SECRET-TOKEN-IN-FILE {{{')
  await sleep(400)
  const file503 = await get(gw.url + '/health')
  t.equal(file503.body.inventory.ok, false, 'the failed refresh is reported')
  t.notMatch(file503.text, /SECRET|JSON|inventory\.json|maestro-inventory/, `no file contents or path: ${file503.text}`)

  const fleet = await startFleet(t, { gpus: [1], upstreams: [{ model: 'm', gpus: [0] }], options: { INVENTORY_REFRESH_MS: 100 } })
  const db = await fleet.replica()
  await fleet.db.query('DROP TABLE assignment_gpus')
  await sleep(400)
  const dbHealth = await get(db.url + '/health')
  t.equal(dbHealth.body.inventory.ok, false)
  t.notMatch(dbHealth.text, /assignment_gpus|doesn't exist|ER_|SELECT|Table/, `no driver text: ${dbHealth.text}`)
})

t.test('a 502 does not carry the upstream error\'s text', async (t) => {
  // An answer Node cannot parse: the proxy fails after the upstream saw the request.
  const garbled = await rawServer(t, (req, res) => {
    if (req.method === 'GET') { res.writeHead(404).end(); return }
    res.socket?.end('HTTP/1.1 200 OK\r\nContent-Length: 12\r\nContent-Length: 13\r\n\r\nhello')
  })
  const file = await writeInventoryFile(t, [{ name: 'garbled', model: 'g', port: garbled.port, gpus: [1] }])
  const gw = await startEmbeddedGateway(t, { INVENTORY_FILE: file })
  const res = await post(gw.url + '/api/generate', '{"model":"g","prompt":"x"}')
  t.equal(res.status, 502)
  t.same(res.body, { error: "upstream 'garbled' failed" }, 'the assignment\'s name only')
  t.notMatch(res.text, /127\.0\.0\.1|:\d{4,5}/, 'no address')
})

t.test('in-process upload pins: capped, and a pin set again moves to the newest place', async (t) => {
  const pins = new UploadPins(undefined, '', 3)
  for (const id of ['a', 'b', 'c']) await pins.pin(id, `server-${id}`)
  await pins.pin('a', 'server-a2')
  await pins.pin('d', 'server-d')
  t.equal(await pins.find('b'), undefined, 'the oldest pin went first')
  t.equal(await pins.find('a'), 'server-a2', 'the refreshed pin stayed, with its new server')
  t.equal(await pins.find('c'), 'server-c')
  t.equal(await pins.find('d'), 'server-d')
  for (let i = 0; i < 100; i++) await pins.pin(`x${i}`, 's')
  t.equal(await pins.find('a'), undefined, 'never more than the cap')
  t.equal(await pins.find('x99'), 's')
})

t.test('a client that keeps reading, but slower than the answer comes, loses it once it has held it back too long', async (t) => {
  const line = JSON.stringify({ response: 'x'.repeat(65_000), done: false }) + '\n'
  let open = 0
  const firehose = await rawServer(t, (req, res) => {
    if (req.method === 'GET') { res.writeHead(404).end(); return }
    open++
    res.once('close', () => { open-- })
    res.writeHead(200, { 'content-type': 'application/x-ndjson' })
    const pump = (): void => { while (!res.destroyed && res.write(line)); }
    res.on('drain', pump)
    pump()
  })
  const file = await writeInventoryFile(t, [{ name: 'firehose', model: 'f', port: firehose.port, gpus: [1] }])
  const gw = await startEmbeddedGateway(t, { INVENTORY_FILE: file, UPSTREAM_HEADERS_TIMEOUT_MS: 1500 })
  const socket = net.connect(Number(new URL(gw.url).port), '127.0.0.1')
  t.teardown(() => socket.destroy())
  const body = '{"model":"f","prompt":"x"}'
  socket.write(`POST /api/generate HTTP/1.1\r\nHost: x\r\nContent-Length: ${body.length}\r\n\r\n${body}`)
  await new Promise((resolve) => socket.once('data', resolve))
  // Takes what has arrived every 100 ms: never silent for the 1.5 s the idle limit waits (nor for
  // the upstream's body timeout), but slower than the answer comes, so it holds it back all along.
  socket.pause()
  let read = 0
  const trickle = setInterval(() => { read += (socket.read() as Buffer | null)?.length ?? 0 }, 100)
  t.teardown(() => clearInterval(trickle))
  const started = performance.now()
  while (open > 0 && performance.now() - started < 12_000) await sleep(50)
  const endedMs = performance.now() - started
  t.equal(open, 0, `the upstream answer was ended ${endedMs.toFixed(0)} ms into the trickle (${read} bytes read)`)
  t.ok(endedMs < 8000)
})

/* ------------------------------------------------------------------------------------------ */
/* 1. waiters across every model (QUEUE_MAX_TOTAL), over HTTP; the bytes: body-memory.test.ts  */
/* ------------------------------------------------------------------------------------------ */

t.test('QUEUE_MAX_TOTAL bounds the waiters of every model together: 503 with Retry-After past it, the waiters still served', async (t) => {
  const fleet = await startFleet(t, {
    gpus: [1, 1],
    upstreams: [
      { model: 'qa', gpus: [0], simulator: { tokens: 30, tokenDelayMs: 50 } },
      { model: 'qb', gpus: [1], simulator: { tokens: 30, tokenDelayMs: 50 } }
    ],
    // each model's own queue has room: only the total can refuse
    options: { QUEUE_MAX: 10, QUEUE_MAX_TOTAL: 2 }
  })
  const gw = await fleet.replica()
  const generate = async (model: string, stream: boolean): Promise<Response> =>
    await fetch(`${gw.url}/api/generate`, { method: 'POST', body: JSON.stringify({ model, prompt: 'x', stream }) })
  // Both GPUs held by streams (about 1.5 s each), read to their first line.
  const holders = await Promise.all(['qa', 'qb'].map(async (model) => await generate(model, true)))
  const readers = holders.map((res) => res.body!.getReader())
  await Promise.all(readers.map(async (r) => await r.read()))
  // One waiter for each model: the total is reached.
  const waiters = [generate('qa', false), generate('qb', false)]
  const waiting = async (): Promise<number> => {
    const status = await (await fetch(`${gw.url}/gpu/status`)).json() as { waiting: Array<{ depth: number }> }
    return status.waiting.reduce((n, q) => n + q.depth, 0)
  }
  for (let i = 0; i < 100 && await waiting() < 2; i++) await sleep(20)
  t.equal(await waiting(), 2, 'two requests wait, one per model')

  const refused = await post(`${gw.url}/api/generate`, JSON.stringify({ model: 'qa', prompt: 'x', stream: false }))
  t.equal(refused.status, 503, 'a third waiter, of a model whose own queue has room, is refused')
  t.ok(Number(refused.headers.get('retry-after')) > 0, `Retry-After: ${refused.headers.get('retry-after')}`)
  t.same(refused.body, { error: 'too many requests are waiting for a GPU' }, 'in the Ollama error format')

  // Drain the holders: each waiter then gets its GPU.
  await Promise.all(readers.map(async (r) => { while (!(await r.read()).done) { /* to the end */ } }))
  const served = await Promise.all(waiters)
  t.same(served.map((r) => r.status), [200, 200], 'the waiters are served once the GPUs are free')
  await Promise.all(served.map(async (r) => await r.text()))
  t.same(fleet.recorder.overlaps, [], 'no GPU overlap')
  await assertAllFree(t, gw)
})

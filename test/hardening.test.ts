// Hostile input (issue 4): bad bodies, hostile model names, huge and endless requests, path and
// header tricks. Every case runs against the real gateway on real MariaDB and Redis, and checks
// that nothing crashed, no lease was left behind and nothing reached an upstream it should not.
import t, { type Test } from 'tap'
import http from 'node:http'
import net from 'node:net'
import type { AddressInfo } from 'node:net'
import { setTimeout as sleep } from 'node:timers/promises'
import Fastify from 'fastify'
import { Redis } from 'ioredis'
import maestro from '../app.js'
import { queueLabel, queueName } from '../services/leases/lease-store.js'
import { modelKey } from '../services/fleet/model-name.js'
import { httpServerOptions, type HttpServerOptions } from '../services/http/http-server.js'
import { createTestDatabase, seedInventory } from './helpers/database.js'
import { startFleet, startGateway, type TestFleet } from './helpers/gateway.js'
import { rawRequest } from './helpers/raw-http.js'
import { REDIS_URL, testPrefix } from './helpers/redis.js'

type Style = 'ollama' | 'diffusion' | 'openai'

interface Answer { status: number, headers: Headers, text: string, body: any }

async function post (url: string, body: string, headers: Record<string, string> = {}): Promise<Answer> {
  const res = await fetch(url, { method: 'POST', body, headers })
  const text = await res.text()
  let parsed: unknown
  try { parsed = JSON.parse(text) } catch { parsed = undefined }
  return { status: res.status, headers: res.headers, text, body: parsed }
}

/** The message of a gateway-made error in the route's style, or a description of what is wrong. */
function errorMessage (style: Style, body: any): string | { wrongShape: unknown } {
  if (style === 'openai') {
    const e = body?.error
    const ok = typeof e?.message === 'string' && ['invalid_request_error', 'not_found_error', 'api_error'].includes(e.type) &&
      e.param === null && e.code === null && Object.keys(body).length === 1
    return ok ? e.message : { wrongShape: body }
  }
  if (typeof body?.error !== 'string') return { wrongShape: body }
  if (style === 'diffusion') return body.detail === body.error && Object.keys(body).length === 2 ? body.error : { wrongShape: body }
  return Object.keys(body).length === 1 ? body.error : { wrongShape: body }
}

/** Every lease of the fleet released (releases are asynchronous: give them a moment). */
async function allFree (fleet: TestFleet, withinMs = 3000): Promise<string[]> {
  const until = performance.now() + withinMs
  let held = await fleet.heldGpus()
  while (held.length > 0 && performance.now() < until) {
    await sleep(50)
    held = await fleet.heldGpus()
  }
  return held
}

const requestsSeen = (fleet: TestFleet): number => fleet.upstreams.reduce((n, u) => n + u.requests.length, 0)

/** One llm (`m`, GPU 0) and one diffusion model (`sd`, GPU 1). */
async function smallFleet (t: Test, options = {}, simulator = {}): Promise<TestFleet> {
  return await startFleet(t, {
    gpus: [1, 1],
    upstreams: [{ model: 'm', gpus: [0], simulator }, { model: 'sd', kind: 'diffusor', gpus: [1] }],
    options
  })
}

const BODY_ROUTES: Array<{ path: string, style: Style }> = [
  { path: '/api/chat', style: 'ollama' },
  { path: '/api/generate', style: 'ollama' },
  { path: '/api/embed', style: 'ollama' },
  { path: '/api/embeddings', style: 'ollama' },
  { path: '/api/show', style: 'ollama' },
  { path: '/txt2img', style: 'diffusion' },
  { path: '/img2img', style: 'diffusion' },
  { path: '/v1/chat/completions', style: 'openai' },
  { path: '/v1/completions', style: 'openai' },
  { path: '/v1/embeddings', style: 'openai' },
  { path: '/v1/images/generations', style: 'openai' },
  { path: '/gpu/reserve', style: 'ollama' }
]

t.test('bodies that are not a JSON object with a model answer 400 in the route\'s format, reach no upstream and take no lease', async (t) => {
  const fleet = await smallFleet(t)
  const gw = await fleet.replica()
  const notAnObject = ['[1,2]', '"text"', '42', 'null', 'true', '', '   ', '[]']
  const badModel = ['{"model":42}', '{"model":""}', '{"model":null}', '{"model":["m"]}', '{"model":{"name":"m"}}', '{"model":true}', '{"prompt":"x"}']
  const notJson = ['{"model":', '{model:"m"}', "{'model':'m'}", '{"model":"m",}', '\u0000', 'model=m&prompt=x', '\ufeff{"model":"m"}', '{"model":"m"}garbage']
  for (const { path, style } of BODY_ROUTES) {
    for (const body of [...notAnObject, ...badModel, ...notJson]) {
      const res = await post(gw.url + path, body, { 'content-type': 'application/json' })
      const label = `${path} ${JSON.stringify(body)}`
      t.equal(res.status, 400, label)
      const message = errorMessage(style, res.body)
      t.type(message, 'string', `${label}: ${res.text}`)
      if (typeof message !== 'string' || path.startsWith('/v1/') || path.startsWith('/gpu/')) continue
      // The contract's own words, where it has them.
      if (notJson.includes(body)) t.match(message, /invalid JSON body/, label)
      else if (notAnObject.includes(body)) t.equal(message, 'request body must be a JSON object', label)
      else t.equal(message, 'model is required', label)
    }
  }
  t.equal(requestsSeen(fleet), 0, 'no upstream saw any of it')
  t.same(await allFree(fleet), [], 'no lease taken')
  t.equal((await post(gw.url + '/api/generate', '{"model":"m","prompt":"x","stream":false}')).status, 200, 'still serving')
})

const HOSTILE_NAMES = [
  // the longest name taken (longer ones are 400: test/hardening-limits.test.ts)
  'x'.repeat(256),
  'nul\u0000byte', 'control\u0001\u0008\u001b[31m\u007f', 'new\nline\r\n', 'tab\there',
  "quote'; DROP TABLE gpus; --", 'double"quote', 'back\\slash', '100%', 'under_score', 'star*', 'what?', '[ab]', '{}', '{"$ne":1}',
  'a:b:c', ':', 'm:latest:latest', '*', '**', '__proto__', 'constructor', 'toString',
  'llama 🦙', 'ünïcödé', 'right\u202eleft', 'e\u0301', 'zero\u200bwidth', '\ud800lone', '\uffff', 'ＭＯＤＥＬ',
  '../../etc/passwd', 'http://evil/', '$(reboot)', '`id`', '%00', '%2e%2e'
]

t.test('model names of any length and character are matched as text: 404 with the name, nothing else', async (t) => {
  const fleet = await smallFleet(t)
  const gw = await fleet.replica()
  const tables = ['computers', 'gpus', 'llms', 'diffusors', 'assignments', 'assignment_gpus']
  const snapshot = async (): Promise<string> => JSON.stringify(await Promise.all(tables.map(async (table) => await fleet.db.query(`SELECT * FROM \`${table}\` ORDER BY 1`))))
  const before = await snapshot()
  for (const name of HOSTILE_NAMES) {
    const label = JSON.stringify(name.slice(0, 40))
    const chat = await post(gw.url + '/api/chat', JSON.stringify({ model: name, messages: [] }))
    t.equal(chat.status, 404, label)
    t.equal(errorMessage('ollama', chat.body), `model '${name}' not found`, `${label}: the name comes back intact`)
    const image = await post(gw.url + '/txt2img', JSON.stringify({ model: name, prompt: 'x' }))
    t.equal(image.status, 404, label)
    t.equal(errorMessage('diffusion', image.body), `model '${name}' not found`, label)
    const openai = await post(gw.url + '/v1/chat/completions', JSON.stringify({ model: name, messages: [] }))
    t.equal(openai.status, 404, label)
    t.type(errorMessage('openai', openai.body), 'string', label)
    const show = await post(gw.url + '/api/show', JSON.stringify({ model: name }))
    t.equal(show.status, 404, label)
  }
  t.equal(await snapshot(), before, 'the inventory tables are untouched')
  t.equal(requestsSeen(fleet), 0)
  t.same(await allFree(fleet), [])
  t.equal((await post(gw.url + '/api/generate', '{"model":"M:latest","prompt":"x","stream":false}')).status, 200, 'still serving')
})

t.test('models whose names look like globs, LIKE patterns or key separators never share a queue or a lease', async (t) => {
  // Pairs that would collide if a name were ever a Redis glob, an SQL LIKE pattern or split at ':'.
  const pairs: Array<[string, string]> = [['m*', 'mx'], ['m?', 'my'], ['m[ab]', 'ma'], ['m%', 'mpct'], ['m_', 'mu'], ["m'", 'mq'], ['m{x}', 'mx2'], ['m\nx', 'm x'], ['q:x', 'q']]
  const models = pairs.flat()
  for (const [a, b] of pairs) {
    t.not(queueName('llm', modelKey(a)), queueName('llm', modelKey(b)), `${JSON.stringify(a)} / ${JSON.stringify(b)}`)
    t.match(queueName('llm', modelKey(a)), /^[0-9a-f]+$/, 'queue names are hex: no glob, no separator')
  }
  const fleet = await startFleet(t, {
    gpus: models.map(() => 1),
    upstreams: models.map((model, i) => ({ model, gpus: [i], simulator: { tokens: 8, tokenDelayMs: 100 } }))
  })
  const gw = await fleet.replica()
  const generate = async (model: string): Promise<{ status: number, queueMs: number, assignment: string | null }> => {
    const res = await fetch(gw.url + '/api/generate', { method: 'POST', body: JSON.stringify({ model, prompt: 'x' }) })
    await res.text()
    // NaN when the header is missing, so neither bound below passes without it
    return { status: res.status, queueMs: Number(res.headers.get('x-maestro-queue-ms') ?? NaN), assignment: res.headers.get('x-maestro-assignment') }
  }
  // Each glob-like model is busy with one request and has a second one waiting in its queue;
  // its look-alike must still be served at once, from its own queue and on its own GPU.
  const redis = new Redis(REDIS_URL)
  t.teardown(() => redis.disconnect())
  // every busy one leased before the second ones are sent (polled: on 2 shared cores 200 ms was not always enough)
  const leaseCount = async (): Promise<number> => (await redis.keys(fleet.prefix.replace(/[*?[\]\\]/g, '\\$&') + 'lease:*')).length
  const busy = pairs.map(([a]) => generate(a))
  for (const deadline = performance.now() + 3000; await leaseCount() < pairs.length && performance.now() < deadline;) await sleep(20)
  const waiting = pairs.map(([a]) => generate(a))
  await sleep(200)

  const keys = await redis.keys(fleet.prefix.replace(/[*?[\]\\]/g, '\\$&') + '*')
  const leaseQueues: string[] = []
  for (const key of keys) {
    t.match(key.slice(fleet.prefix.length), /^[A-Za-z0-9:|#._-]+$/, `key ${JSON.stringify(key)} holds no model text`)
    if (key.startsWith(fleet.prefix + 'lease:')) leaseQueues.push(queueLabel(await redis.hget(key, 'queue') as string))
  }
  t.same(leaseQueues.sort(), pairs.map(([a]) => `llm:${modelKey(a)}`).sort(), 'one lease per glob-like model, each on its own queue')

  const lookAlikes = await Promise.all(pairs.map(([, b]) => generate(b)))
  for (const [i, [a, b]] of pairs.entries()) {
    t.equal(lookAlikes[i].status, 200, JSON.stringify(b))
    t.ok(lookAlikes[i].queueMs < 150, `${JSON.stringify(b)} did not queue behind ${JSON.stringify(a)} (${lookAlikes[i].queueMs} ms)`)
    t.equal(lookAlikes[i].assignment, `${b}-${models.indexOf(b) + 1}`.replace(/[^\x20-\x7e]/g, encodeURIComponent))
  }
  const [first, second] = [await Promise.all(busy), await Promise.all(waiting)]
  for (const [i, [a]] of pairs.entries()) {
    t.equal(first[i].status, 200, JSON.stringify(a))
    t.equal(second[i].status, 200, JSON.stringify(a))
    t.ok(second[i].queueMs > 300, `the second ${JSON.stringify(a)} waited for the first (${second[i].queueMs} ms)`)
  }
  for (const [i, model] of models.entries()) {
    t.same(fleet.upstreams[i].requests.map((r) => r.body.model), models.filter((m) => m === model).flatMap((m) => pairs.some(([a]) => a === m) ? [m, m] : [m]),
      `${JSON.stringify(model)}'s server saw only its own model`)
  }
  await fleet.recorder.whenIdle()
  t.same(fleet.recorder.overlaps, [])
  t.same(await allFree(fleet), [])
})

t.test('duplicate keys: the last one counts, as it does for Ollama (Go) and FastAPI (Python)', async (t) => {
  const fleet = await smallFleet(t)
  const gw = await fleet.replica()
  const served = await post(gw.url + '/api/generate', '{"model":"nope","prompt":"x","model":"m","stream":false}')
  t.equal(served.status, 200)
  t.equal(fleet.upstreams[0].requests.at(-1)?.body.model, 'm', 'the upstream reads the same model the lease was taken for')
  const refused = await post(gw.url + '/api/generate', '{"model":"m","prompt":"x","model":"nope"}')
  t.equal(refused.status, 404)
  t.equal(refused.body.error, "model 'nope' not found")
  const twice = await post(gw.url + '/api/generate', '{"model":"m","prompt":"x","stream":false,"keep_alive":"1h","keep_alive":"2h"}')
  t.equal(twice.status, 200)
  t.notMatch(fleet.upstreams[0].requests.at(-1)?.rawBody, /"[12]h"/, 'every keep_alive was forced, not only the first')
  t.same(await allFree(fleet), [])
})

t.test('deeply nested bodies neither overflow the stack nor hang', async (t) => {
  const fleet = await smallFleet(t)
  const gw = await fleet.replica({ BODY_LIMIT: 8 * 1024 * 1024 })
  for (const depth of [100_000, 1_000_000]) {
    const arrays = '['.repeat(depth) + ']'.repeat(depth)
    let started = performance.now()
    const refused = await post(gw.url + '/api/chat', arrays)
    const refusedMs = performance.now() - started
    t.equal(refused.status, 400, `${depth} nested arrays`)
    t.equal(refused.body.error, 'request body must be a JSON object')

    const inside = `{"model":"m","prompt":"x","stream":false,"context":${arrays}}`
    started = performance.now()
    const forwarded = await post(gw.url + '/api/generate', inside)
    const forwardedMs = performance.now() - started
    t.equal(forwarded.status, 200, `${depth} nested arrays inside a request`)
    t.equal(fleet.upstreams[0].requests.at(-1)?.rawBody.length, inside.length + ',"keep_alive":-1'.length, 'forwarded whole, only keep_alive added')

    const objects = '{"model":"m","prompt":"x","stream":false,"options":' + '{"a":'.repeat(depth) + '1' + '}'.repeat(depth) + '}'
    started = performance.now()
    const nested = await post(gw.url + '/api/generate', objects)
    const nestedMs = performance.now() - started
    t.equal(nested.status, 200, `${depth} nested objects inside a request`)
    t.comment(`depth ${depth}: refused in ${refusedMs.toFixed(0)} ms, forwarded in ${forwardedMs.toFixed(0)} ms, nested objects in ${nestedMs.toFixed(0)} ms`)
    t.ok(Math.max(refusedMs, forwardedMs, nestedMs) < 20_000, 'no request took anywhere near a hang')
  }
  t.same(await allFree(fleet), [])
})

t.test('content types: JSON is read whatever the type says; multipart and garbled types get a clear 400', async (t) => {
  const fleet = await smallFleet(t)
  const gw = await fleet.replica()
  const body = '{"model":"m","prompt":"x","stream":false}'
  for (const type of ['application/json', 'application/x-www-form-urlencoded', 'text/plain', 'application/octet-stream', 'application/json; charset=latin1', 'image/png']) {
    t.equal((await post(gw.url + '/api/generate', body, { 'content-type': type })).status, 200, type)
  }
  const none = await rawRequest(gw.url, `POST /api/generate HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: ${body.length}\r\n\r\n${body}`)
  t.equal(none.responses[0]?.status, 200, 'no Content-Type at all')
  t.equal(fleet.upstreams[0].requests.at(-1)?.headers['content-type'], 'application/json', 'the upstream is told it is JSON')

  const form = new FormData()
  form.append('model', 'm')
  form.append('file', new Blob(['png']), 'a.png')
  for (const path of ['/api/generate', '/txt2img']) {
    const res = await fetch(gw.url + path, { method: 'POST', body: form })
    const answer = await res.json() as any
    t.equal(res.status, 400, `multipart on ${path}`)
    t.equal(answer.error, 'request body must be JSON, not multipart/form-data')
  }
  for (const type of [';;;', 'json', '/', 'application/', 'a b/c']) {
    const res = await post(gw.url + '/api/generate', body, { 'content-type': type })
    t.equal(res.status, 400, `Content-Type ${JSON.stringify(type)}`)
    t.equal(res.body.error, 'Content-Type header is not a valid media type')
  }
  t.same(await allFree(fleet), [])
})

t.test('a body over BODY_LIMIT is refused with 413 without being read', async (t) => {
  const limit = 4096
  const fleet = await smallFleet(t, { BODY_LIMIT: limit })
  const gw = await fleet.replica()
  const seenBefore = requestsSeen(fleet)

  // Declared too large: answered at once, the connection closed, the body never read.
  for (const path of ['/api/generate', '/txt2img', '/upload', '/v1/chat/completions', '/nowhere']) {
    const declared = await rawRequest(gw.url, `POST ${path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 1000000000\r\n\r\n{"model":"m"`, { timeoutMs: 5000 })
    t.equal(declared.responses[0]?.status, 413, `${path} with a declared gigabyte`)
    t.ok(declared.closed, 'connection closed instead of reading a gigabyte')
    t.ok(declared.elapsedMs < 3000, `answered in ${declared.elapsedMs.toFixed(0)} ms`)
  }
  const style = await rawRequest(gw.url, `POST /txt2img HTTP/1.1\r\nHost: x\r\nContent-Length: ${limit + 1}\r\n\r\n`, { timeoutMs: 5000 })
  t.same(JSON.parse(style.responses[0].body), { error: 'request body is too large', detail: 'request body is too large' }, 'in the route\'s own format')

  // Chunked without end: cut off where it crosses the limit.
  for (const path of ['/api/generate', '/upload']) {
    const chunk = 'x'.repeat(500)
    const pieces = [`POST ${path} HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\nTransfer-Encoding: chunked\r\n\r\n`,
      ...Array.from({ length: 100 }, () => `${chunk.length.toString(16)}\r\n${chunk}\r\n`)]
    const chunked = await rawRequest(gw.url, pieces, { pauseMs: 20, timeoutMs: 5000 })
    t.equal(chunked.responses[0]?.status, 413, `endless chunked body on ${path}`)
    t.ok(chunked.closed)
    t.ok(chunked.elapsedMs < 1500, `cut off after about ${limit} of 50000 bytes (${chunked.elapsedMs.toFixed(0)} ms)`)
  }
  // At the limit exactly: accepted.
  const prefix = '{"model":"m","prompt":"'
  const exact = prefix + 'y'.repeat(limit - prefix.length - '","stream":false}'.length) + '","stream":false}'
  t.equal(Buffer.byteLength(exact), limit)
  t.equal((await post(gw.url + '/api/generate', exact)).status, 200, 'a body of exactly BODY_LIMIT bytes')
  t.equal((await post(gw.url + '/api/generate', exact + ' ')).status, 413, 'one byte more')
  t.equal(requestsSeen(fleet) - seenBefore, 1, 'only the body within the limit reached an upstream')
  t.same(await allFree(fleet), [])
})

/** A listening gateway with the standalone server's timeouts (shortened). */
async function listeningGateway (t: Test, fleet: TestFleet, timeouts: HttpServerOptions): Promise<string> {
  const app = Fastify({ logger: false, ...httpServerOptions(timeouts) })
  await app.register(maestro, { dotenv: false, ...fleet.options })
  await app.listen({ port: 0, host: '127.0.0.1' })
  t.teardown(async () => await app.close())
  return `http://127.0.0.1:${(app.server.address() as AddressInfo).port}`
}

t.test('server timeouts end slow requests, never slow answers', async (t) => {
  const defaults = httpServerOptions()
  t.ok(defaults.requestTimeout >= 60_000, 'bodies get at least a minute')
  t.ok(defaults.http.headersTimeout > 0 && defaults.http.headersTimeout <= defaults.requestTimeout)
  t.equal(defaults.connectionTimeout, 0, 'no idle limit that would cut an answer waiting for a lease')

  const fleet = await smallFleet(t, {}, { tokens: 25, tokenDelayMs: 150 })
  const url = await listeningGateway(t, fleet, { headersTimeoutMs: 1000, requestTimeoutMs: 2000, checkIntervalMs: 100 })
  const body = '{"model":"m","prompt":"x"}'

  // Headers one byte at a time, slower than the headers timeout.
  const head = `POST /api/generate HTTP/1.1\r\nHost: x\r\nContent-Length: ${body.length}\r\nX-Slow: ${'s'.repeat(100)}\r\n\r\n`
  const trickle = await rawRequest(url, [...head], { pauseMs: 50, timeoutMs: 10_000 })
  t.ok(trickle.closed, `headers trickled byte by byte: closed after ${trickle.elapsedMs.toFixed(0)} ms`)
  t.ok(trickle.elapsedMs < 4000)
  t.equal(trickle.responses.length, 1, 'one answer before the close')
  t.equal(trickle.responses[0]?.status, 408)

  // A body that never finishes.
  const endless = await rawRequest(url, `POST /api/generate HTTP/1.1\r\nHost: x\r\nContent-Length: ${body.length + 100}\r\n\r\n${body}`, { timeoutMs: 10_000 })
  t.ok(endless.closed, `unfinished body: closed after ${endless.elapsedMs.toFixed(0)} ms`)
  t.ok(endless.elapsedMs > 1500 && endless.elapsedMs < 5000)
  t.equal(endless.responses[0]?.status, 408)
  t.same(JSON.parse(endless.responses[0].body), { error: 'request not received in time' })
  t.equal(endless.responses[0].headers.connection, 'close')
  t.equal(requestsSeen(fleet), 0, 'neither reached an upstream')
  t.same(await allFree(fleet), [])

  // A streamed answer that outlasts the request timeout, and one that waits for it: both whole.
  const started = performance.now()
  const [long, queued] = await Promise.all([0, 300].map(async (delay) => {
    await sleep(delay)
    const res = await fetch(url + '/api/generate', { method: 'POST', body })
    return { queueMs: Number(res.headers.get('x-maestro-queue-ms')), lines: (await res.text()).trim().split('\n').map((l) => JSON.parse(l)) }
  }))
  t.ok(performance.now() - started > 6000, 'the answers took several request timeouts')
  t.equal(long.lines.length, 26, 'a 4 s stream arrived whole')
  t.equal(long.lines.at(-1).done, true)
  t.ok(queued.queueMs > 2500, `the second waited ${queued.queueMs} ms for the GPU`)
  t.equal(queued.lines.at(-1).done, true, 'and was then served whole')
  t.same(await allFree(fleet), [])
})

/** A bare upstream for wire-level cases the simulators do not cover, in its own inventory. */
async function customUpstream (t: Test, model: string, handle: (req: http.IncomingMessage, res: http.ServerResponse, body: string) => void): Promise<{
  /** the gateway in front of it */
  gatewayUrl: string
  prefix: string
  host: string
  gpuId: string
  requests: Array<{ url: string, headers: http.IncomingHttpHeaders, body: string }>
  /** connections open to the upstream */
  open: () => number
}> {
  const requests: Array<{ url: string, headers: http.IncomingHttpHeaders, body: string }> = []
  // Connections that carried a client's request (the gateway's background polls are answered apart).
  const sockets = new Set<net.Socket>()
  const server = http.createServer((req, res) => {
    if (/upstream-poll$/.test(req.headers['user-agent'] ?? '')) {
      res.writeHead(200, { 'content-type': 'application/json', connection: 'close' }).end(req.url === '/api/version' ? '{"version":"0.33.0"}' : '{"models":[]}')
      return
    }
    sockets.add(req.socket)
    req.socket.once('close', () => sockets.delete(req.socket))
    let body = ''
    req.on('data', (c: Buffer) => { body += c.toString() })
    req.on('end', () => {
      requests.push({ url: req.url ?? '', headers: req.headers, body })
      handle(req, res, body)
    })
  })
  const all = new Set<net.Socket>()
  server.on('connection', (socket) => { all.add(socket); socket.once('close', () => all.delete(socket)) })
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve))
  t.teardown(async () => { for (const s of all) s.destroy(); await new Promise((resolve) => server.close(resolve)) })
  const port = (server.address() as AddressInfo).port
  const db = await createTestDatabase(t)
  const seeded = await seedInventory(db.query, { gpus: [{ weight: 1 }], llms: [model], assignments: [] })
  await seedInventory(db.query, { computers: [], assignments: [{ name: `${model}-upstream`, model, port, gpus: [seeded.gpus[0]] }] })
  const prefix = testPrefix(t)
  const gw = await startGateway(t, { MARIADB_URL: db.url, REDIS_URL, REDIS_KEY_PREFIX: prefix, UPSTREAM_HEADERS_TIMEOUT_MS: 1500, API_KEYS: 'gateway-key' })
  return { gatewayUrl: gw.url, prefix, host: `127.0.0.1:${port}`, gpuId: String(seeded.gpus[0]), requests, open: () => sockets.size }
}

async function heldUnder (prefix: string): Promise<string[]> {
  const redis = new Redis(REDIS_URL)
  try {
    return await redis.keys(prefix.replace(/[*?[\]\\]/g, '\\$&') + 'gpu:*')
  } finally {
    redis.disconnect()
  }
}

t.test('a client that stops reading an answer loses it after UPSTREAM_HEADERS_TIMEOUT_MS, and its GPU is freed', async (t) => {
  // An upstream that streams as fast as it is read, for ever.
  const line = JSON.stringify({ response: 'x'.repeat(65_000), done: false }) + '\n'
  const upstream = await customUpstream(t, 'firehose', (_req, res) => {
    res.writeHead(200, { 'content-type': 'application/x-ndjson' })
    const pump = (): void => { while (!res.destroyed && res.write(line)); }
    res.on('drain', pump)
    pump()
  })
  const { port } = new URL(upstream.gatewayUrl)
  const socket = net.connect(Number(port), '127.0.0.1')
  t.teardown(() => socket.destroy())
  const body = '{"model":"firehose","prompt":"x"}'
  socket.write(`POST /api/generate HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer gateway-key\r\nContent-Length: ${body.length}\r\n\r\n${body}`)
  await new Promise((resolve) => socket.once('data', resolve))
  socket.pause() // and reads nothing more
  const started = performance.now()
  t.equal(upstream.open(), 1, 'streaming')
  while (upstream.open() > 0 && performance.now() - started < 15_000) await sleep(50)
  const endedMs = performance.now() - started
  t.equal(upstream.open(), 0, `the upstream request was ended ${endedMs.toFixed(0)} ms after the client stopped reading`)
  t.ok(endedMs < 10_000)
  // freed after UPSTREAM_CANCEL_GRACE_MS (250 ms), the time an upstream takes to notice the cut
  for (const deadline = performance.now() + 1500; (await heldUnder(upstream.prefix)).length > 0 && performance.now() < deadline;) await sleep(25)
  t.same(await heldUnder(upstream.prefix), [], 'and its GPU freed, although the client never left')
})

t.test('a slow client that keeps reading is not cut off', async (t) => {
  const fleet = await smallFleet(t, { UPSTREAM_HEADERS_TIMEOUT_MS: 1500 }, { tokens: 12, tokenDelayMs: 300 })
  const gw = await fleet.replica()
  const res = await fetch(gw.url + '/api/generate', { method: 'POST', body: '{"model":"m","prompt":"x"}' })
  const lines = (await res.text()).trim().split('\n').map((l) => JSON.parse(l))
  t.equal(lines.length, 13)
  t.equal(lines.at(-1).done, true, 'a 3.6 s stream with 300 ms gaps under a 1.5 s limit arrived whole')
  t.same(await allFree(fleet), [])
})

t.test('never an open proxy: no request target, Host or encoding trick changes the upstream or its path', async (t) => {
  const fleet = await smallFleet(t)
  const gw = await fleet.replica()
  const evilSeen: string[] = []
  let evilConnections = 0
  const evil = http.createServer((req, res) => { evilSeen.push(`${req.method} ${req.url}`); res.end('evil') })
  evil.on('connection', () => { evilConnections++ })
  await new Promise<void>((resolve) => evil.listen(0, '127.0.0.1', resolve))
  t.teardown(() => evil.close())
  const evilHost = `127.0.0.1:${(evil.address() as AddressInfo).port}`
  const [llm, sd] = fleet.upstreams

  const cases: Array<{ method: string, route: string, body: string, upstream: typeof llm, polled?: boolean }> = [
    { method: 'POST', route: '/api/generate', body: '{"model":"m","prompt":"x","stream":false}', upstream: llm },
    { method: 'POST', route: '/api/show', body: '{"model":"m"}', upstream: llm },
    { method: 'POST', route: '/v1/chat/completions', body: '{"model":"m","messages":[{"role":"user","content":"x"}]}', upstream: llm },
    { method: 'POST', route: '/txt2img', body: '{"model":"sd","prompt":"x"}', upstream: sd },
    // answered from the background poll: reaches no upstream at all
    { method: 'GET', route: '/api/tags', body: '', upstream: llm, polled: true }
  ]
  for (const c of cases) {
    const tail = c.route.slice(c.route.lastIndexOf('/') + 1)
    const head = c.route.slice(0, c.route.lastIndexOf('/'))
    // Targets that must reach the route's own path on the assignment's server (or nowhere).
    const reaching = [c.route, `${c.route}?url=http://${evilHost}/x&path=../../admin`, `http://${evilHost}${c.route}`, `http://${evilHost}${c.route}?x=1`, `${c.route}#http://${evilHost}/`]
    const refused = [`//${evilHost}${c.route}`, `${c.route}/../../x`, `${c.route}/..`, `${head}/%2e%2e/${tail}`, `${head}%2F${tail}`, `${c.route}%2F..%2F..%2Fx`,
      `${c.route}/`, `/${c.route}`, `${c.route}%00`, `${c.route};http://${evilHost}`, `http://${evilHost}`, `http://${evilHost}/`, `${c.route}/http://${evilHost}/x`,
      `/x/..${c.route}`, `/.${c.route}`, `${c.route.toUpperCase()}`, `${c.route}@${evilHost}`]
    for (const target of [...reaching, ...refused]) {
      const before = c.upstream.requests.length
      const request = `${c.method} ${target} HTTP/1.1\r\nHost: ${evilHost}\r\nX-Forwarded-Host: ${evilHost}\r\nX-Original-URL: /x\r\nConnection: close\r\n` +
        `Content-Length: ${Buffer.byteLength(c.body)}\r\n\r\n${c.body}`
      const answer = await rawRequest(gw.url, request)
      const seen = c.upstream.requests.slice(before)
      const label = `${c.method} ${target}`
      const first = answer.responses[0]
      if (reaching.includes(target)) {
        t.equal(first?.status, 200, label)
        if (c.polled === true) t.equal(seen.length, 0, `${label} answered without an upstream request`)
        else t.ok(seen.length >= 1, `${label} reached the upstream`)
      } else if (/^http:\/\/[^/]+\/?$/.test(target)) {
        // The absolute form of `/`: the gateway's own answer.
        t.equal(c.method === 'GET' ? first?.body : first?.status, c.method === 'GET' ? 'Ollama is running' : 404, label)
        t.equal(seen.length, 0, `${label} reached no upstream`)
      } else {
        t.ok(first?.status === 404 || first?.status === 400, `${label} refused (${first?.status})`)
        t.equal(seen.length, 0, `${label} reached no upstream`)
      }
      for (const r of seen) {
        t.equal(r.url, c.route, `${label}: the upstream saw the route's own path, no query`)
        t.equal(r.headers.host, c.upstream.host, `${label}: Host is the assignment's`)
        // /api/tags is asked by the gateway itself; the forwarded routes pass other headers as sent.
        if (c.method === 'POST') t.equal(r.headers['x-forwarded-host'], evilHost, `${label}: other headers as sent`)
      }
    }
  }
  for (const target of [evilHost, `http://${evilHost}/`, '127.0.0.1:22']) {
    const tunnel = await rawRequest(gw.url, `CONNECT ${target} HTTP/1.1\r\nHost: ${target}\r\n\r\nGET / HTTP/1.1\r\nHost: ${evilHost}\r\n\r\n`)
    t.ok(tunnel.closed, `CONNECT ${target}: connection closed`)
    t.notMatch(tunnel.raw, /^HTTP\/1\.1 2/, 'no tunnel established')
  }
  t.same(evilSeen, [], 'the other server was never contacted')
  t.equal(evilConnections, 0, 'not even connected to')
  t.same(await allFree(fleet), [])
})

t.test('headers: hop-by-hop ones dropped both ways, x-maestro-* and x-request-id are the gateway\'s, the API key stays home', async (t) => {
  const upstream = await customUpstream(t, 'h', (_req, res) => {
    res.writeHead(200, {
      'content-type': 'application/json',
      connection: 'close, x-up-hop',
      'x-up-hop': 'secret',
      'keep-alive': 'timeout=999',
      'proxy-authenticate': 'Basic realm="upstream"',
      upgrade: 'h2c',
      trailer: 'x-checksum',
      'x-maestro-gpus': 'forged',
      'X-Maestro-Assignment': 'forged',
      'x-maestro-extra': 'forged',
      'x-request-id': 'from-upstream',
      'x-end-to-end': 'kept'
    })
    res.end('{"done":true}')
  })
  const answer = await new Promise<{ status: number, headers: http.IncomingHttpHeaders, raw: string[] }>((resolve, reject) => {
    const req = http.request(upstream.gatewayUrl + '/api/generate', {
      method: 'POST',
      headers: {
        connection: 'keep-alive, x-client-hop',
        'x-client-hop': 'secret',
        'keep-alive': 'timeout=5',
        te: 'trailers',
        trailer: 'x-checksum',
        upgrade: 'h2c',
        'proxy-authorization': 'Basic cHJveHk6cHc=',
        'proxy-connection': 'keep-alive',
        authorization: 'Bearer gateway-key',
        'x-maestro-gpus': '999',
        'x-request-id': 'client-id-1',
        'x-end-to-end': 'kept',
        'content-type': 'application/json',
        // for the gateway, which has answered it; undici refuses to forward it (this was a 502)
        expect: '100-continue'
      }
    }, (res) => {
      res.resume()
      res.on('end', () => resolve({ status: res.statusCode ?? 0, headers: res.headers, raw: res.rawHeaders }))
    })
    req.on('error', reject)
    req.end('{"model":"h","prompt":"x"}')
  })
  t.equal(answer.status, 200)
  const sent = upstream.requests.at(-1)!.headers
  for (const name of ['x-client-hop', 'keep-alive', 'te', 'trailer', 'upgrade', 'proxy-authorization', 'proxy-connection', 'authorization', 'transfer-encoding', 'expect']) {
    t.equal(sent[name], undefined, `request header ${name} not forwarded`)
  }
  t.not(sent.connection, 'keep-alive, x-client-hop', 'the client\'s Connection is not forwarded')
  t.equal(sent['x-end-to-end'], 'kept')
  t.equal(sent.host, upstream.host)
  t.equal(sent['x-request-id'], 'client-id-1')

  for (const name of ['x-up-hop', 'proxy-authenticate', 'upgrade', 'trailer', 'x-maestro-extra']) {
    t.equal(answer.headers[name], undefined, `response header ${name} not passed on`)
  }
  t.notMatch(answer.headers['keep-alive'] ?? '', /999/, 'the upstream\'s Keep-Alive is not passed on')
  t.equal(answer.headers['x-maestro-gpus'], upstream.gpuId, 'x-maestro-gpus is the gateway\'s')
  t.equal(answer.headers['x-maestro-assignment'], 'h-upstream')
  t.equal(answer.raw.filter((h) => /^x-maestro-gpus$/i.test(h)).length, 1, 'once')
  t.equal(answer.headers['x-request-id'], 'client-id-1')
  t.equal(answer.headers['x-end-to-end'], 'kept')

  // A response the gateway makes itself carries no x-maestro-* a client asked for.
  const notFound = await fetch(upstream.gatewayUrl + '/api/generate', {
    method: 'POST', body: '{"model":"nope"}', headers: { authorization: 'Bearer gateway-key', 'x-maestro-gpus': '1', 'x-maestro-assignment': 'a' }
  })
  t.equal(notFound.status, 404)
  t.equal(notFound.headers.get('x-maestro-gpus'), null)
  t.equal(notFound.headers.get('x-maestro-assignment'), null)
  // A request id that is not a sane token is replaced, never echoed.
  const odd = await fetch(upstream.gatewayUrl + '/', { headers: { 'x-request-id': 'a b"<script>' } })
  t.match(odd.headers.get('x-request-id'), /^[0-9a-f-]{36}$/)
})

t.test('conflicting or malformed framing is refused with a clean 400 before any lease', async (t) => {
  const fleet = await smallFleet(t)
  const gw = { url: await listeningGateway(t, fleet, {}) }
  const body = '{"model":"m","prompt":"x","stream":false}'
  const head = 'POST /api/generate HTTP/1.1\r\nHost: x\r\n'
  const malformed = [
    `${head}Content-Length: ${body.length}\r\nTransfer-Encoding: chunked\r\n\r\n${body.length.toString(16)}\r\n${body}\r\n0\r\n\r\n`,
    `${head}Transfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n${body.length.toString(16)}\r\n${body}\r\n0\r\n\r\n`,
    `${head}Content-Length: ${body.length}\r\nContent-Length: 5\r\n\r\n${body}`,
    `${head}Content-Length: ${body.length}, 5\r\n\r\n${body}`,
    `${head}Content-Length: -1\r\n\r\n${body}`,
    `${head}Content-Length: 1e3\r\n\r\n${body}`,
    `${head}Content-Length: 0x29\r\n\r\n${body}`,
    `${head}Content-Length : ${body.length}\r\n\r\n${body}`,
    `${head} Content-Length: ${body.length}\r\n\r\n${body}`,
    `${head}Transfer-Encoding: gzip\r\n\r\n${body}`,
    `${head}Transfer-Encoding: chunked, identity\r\n\r\n${body}`,
    `${head}Transfer-Encoding: chunked\r\nTransfer-Encoding: identity\r\n\r\n${body}`,
    `${head}Transfer-Encoding: xchunked\r\n\r\n${body}`,
    `${head}Transfer-Encoding: chunked\r\n\r\nzz\r\n${body}\r\n0\r\n\r\n`,
    `${head}Content-Length: ${body.length}\r\nX-Bad\u0000Header: 1\r\n\r\n${body}`,
    `${head}Content-Length: ${body.length}\r\nX-Split: a\rb\r\n\r\n${body}`,
    `${head}Content-Length: ${body.length}\nX-Bare-LF: 1\r\n\r\n${body}`,
    `POST /api/generate HTTP/1.1\r\nContent-Length: ${body.length}\r\n\r\n${body}`,
    `POST /api/generate HTTP/9.9\r\nHost: x\r\nContent-Length: ${body.length}\r\n\r\n${body}`,
    `P\u00d6ST /api/generate HTTP/1.1\r\nHost: x\r\nContent-Length: ${body.length}\r\n\r\n${body}`,
    `BREW /api/generate HTTP/1.1\r\nHost: x\r\nContent-Length: ${body.length}\r\n\r\n${body}`,
    `POST /api/gen erate HTTP/1.1\r\nHost: x\r\nContent-Length: ${body.length}\r\n\r\n${body}`,
    `${head}X-Huge: ${'h'.repeat(70_000)}\r\nContent-Length: ${body.length}\r\n\r\n${body}`
  ]
  for (const request of malformed) {
    const answer = await rawRequest(gw.url, Buffer.from(request, 'latin1'), { timeoutMs: 5000 })
    const label = JSON.stringify(request.slice(0, 90))
    const first = answer.responses[0]
    t.ok(first?.status === 400 || first?.status === 431, `${label}: ${first?.status}`)
    t.ok(answer.closed, `${label}: connection closed`)
    t.equal(first?.headers.connection, 'close', `${label}: and the answer says so`)
    if (!request.includes('Host:')) continue // Node's own bare 400 for a request without Host
    t.same(Object.keys(JSON.parse(first?.body ?? 'null') ?? {}), ['error'], `${label}: a JSON error`)
    t.match(JSON.parse(first?.body ?? '{}').error, first?.status === 431 ? /^request headers too large$/ : /^malformed HTTP request/)
  }
  const huge = await rawRequest(gw.url, `HEAD /health HTTP/1.1\r\nHost: x\r\nX-Huge: ${'h'.repeat(70_000)}\r\n\r\n`, { head: true })
  t.equal(huge.responses[0]?.status, 431, 'HEAD with huge headers')
  t.match(huge.raw, /\r\n\r\n$/, 'answered without a body, as a HEAD answer must be')
  t.equal(requestsSeen(fleet), 0, 'no upstream saw any of them')
  t.same(await allFree(fleet), [])
  t.equal((await post(gw.url + '/api/generate', body)).status, 200, 'still serving')
})

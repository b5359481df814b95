// API_KEYS and ADMIN_TOKEN (issue 4): which route asks for what, how a refusal looks, and that a
// gateway credential never travels on to an upstream. Real fleet, real MariaDB and Redis.
import t, { type Test } from 'tap'
import type { AddressInfo } from 'node:net'
import Fastify from 'fastify'
import OpenAI from 'openai'
import { Ollama } from 'ollama'
import maestro, { type MaestroOptions } from '../app.js'
import { bearerToken } from '../plugins/auth.js'
import { startFleet, type TestFleet } from './helpers/gateway.js'
import { rawRequest } from './helpers/raw-http.js'

type Level = 'open' | 'api-key' | 'admin'
type Style = 'ollama' | 'diffusion' | 'openai' | 'anthropic'

/*
 * Who may call what, decided once for the whole gateway:
 * - open: what clients and load balancers probe before they know of any key (`/`, `/api/version`,
 *   health), and what monitoring reads: the lease status (open in the original proxy) and metrics;
 * - admin: the lease API's write routes and cache clearing (ADMIN_TOKEN; an API key when only
 *   API_KEYS is set, since a reservation takes GPUs like a proxied request);
 * - api-key: everything else, the model lists included; this is also the default of a
 *   route that says nothing, so a new route is never left open by accident.
 */
const OPEN = ['GET /', 'HEAD /', 'GET /health', 'HEAD /health', 'GET /health/live', 'HEAD /health/live', 'GET /health/ready', 'HEAD /health/ready',
  'GET /api/version', 'HEAD /api/version', 'GET /gpu/status', 'HEAD /gpu/status', 'GET /metrics', 'HEAD /metrics',
  // the console and its feed (CONTRACT 13: readable by whoever may read /gpu/status)
  'GET /gpu/events', 'HEAD /gpu/events', 'GET /ui', 'HEAD /ui', 'GET /ui/', 'HEAD /ui/', 'GET /ui/:file', 'HEAD /ui/:file']
const ADMIN = ['POST /gpu/reserve', 'POST /gpu/ping', 'POST /gpu/release', 'DELETE /gpu/cache', 'DELETE /cache', 'POST /api/pull']
/** The lease API (the rest of ADMIN are admin routes proper: CONTRACT 18, a key may not call them). */
const LEASE = ['POST /gpu/reserve', 'POST /gpu/ping', 'POST /gpu/release']
/** The OpenAPI document and its page (`/docs`, `/docs/json`, its files): reading about the API needs no key. */
const isDocs = (route: string): boolean => /^(GET|HEAD) \/docs(\/|$)/.test(route)
/** The admin API: the admin token (CONTRACT 13). */
const isAdminApi = (route: string): boolean => route.split(' ')[1].startsWith('/admin/')
/** Routes the contract names that need a key; every other registered route must need one too. */
const API_KEY = ['POST /api/chat', 'POST /api/generate', 'POST /api/embed', 'POST /api/embeddings', 'POST /api/show', 'GET /api/tags', 'GET /api/ps',
  'POST /txt2img', 'POST /img2img', 'POST /upload', 'POST /v1/chat/completions', 'POST /v1/completions', 'POST /v1/embeddings',
  'GET /v1/models', 'GET /v1/models/*', 'POST /v1/images/generations']

const BODIES: Record<string, string> = {
  'POST /api/chat': '{"model":"m","messages":[{"role":"user","content":"x"}],"stream":false}',
  'POST /api/generate': '{"model":"m","prompt":"x","stream":false}',
  'POST /api/embed': '{"model":"m","input":"x"}',
  'POST /api/embeddings': '{"model":"m","prompt":"x"}',
  'POST /api/show': '{"model":"m"}',
  'POST /txt2img': '{"model":"sd","prompt":"x"}',
  'POST /img2img': '{"model":"sd","prompt":"x","file_id":"none"}',
  'POST /v1/chat/completions': '{"model":"m","messages":[{"role":"user","content":"x"}]}',
  'POST /v1/completions': '{"model":"m","prompt":"x"}',
  'POST /v1/embeddings': '{"model":"m","input":"x"}',
  'POST /v1/images/generations': '{"model":"sd","prompt":"x","response_format":"b64_json"}',
  // models without an assignment: the answer shows the guard let the request through, no lease is taken
  'POST /gpu/reserve': '{"outputType":"text","model":"nope"}',
  'POST /gpu/ping': '{"leaseId":"nope"}',
  'POST /gpu/release': '{"leaseId":"nope"}',
  'POST /api/pull': '{"model":"nope"}'
}

const styleOf = (url: string): Style => url === '/v1/messages' ? 'anthropic' : url.startsWith('/v1/') ? 'openai' : ['/txt2img', '/img2img', '/upload'].includes(url) ? 'diffusion' : 'ollama'

function errorText (style: Style, body: any): string | undefined {
  if (style === 'anthropic') return body?.type === 'error' && body.error?.type === 'authentication_error' ? body.error.message : undefined
  if (style === 'openai') return body?.error?.type === 'invalid_request_error' && body.error.param === null && body.error.code === null ? body.error.message : undefined
  if (style === 'diffusion') return body?.detail === body?.error ? body?.error : undefined
  return Object.keys(body ?? {}).length === 1 ? body?.error : undefined
}

interface Listening { url: string, routes: string[] }

/** A gateway on the fleet that also reports every route it registered ("METHOD url"). */
async function gateway (t: Test, fleet: TestFleet, options: MaestroOptions): Promise<Listening> {
  const app = Fastify({ logger: false })
  const routes: string[] = []
  app.addHook('onRoute', (route) => {
    for (const method of [route.method].flat()) routes.push(`${method} ${route.url}`)
  })
  await app.register(maestro, { dotenv: false, ...fleet.options, ...options })
  await app.listen({ port: 0, host: '127.0.0.1' })
  t.teardown(async () => await app.close())
  return { url: `http://127.0.0.1:${(app.server.address() as AddressInfo).port}`, routes: [...new Set(routes)] }
}

async function fleetOf (t: Test): Promise<TestFleet> {
  return await startFleet(t, {
    gpus: [1, 1],
    upstreams: [{ model: 'm', gpus: [0] }, { model: 'sd', kind: 'diffusor', gpus: [1] }]
  })
}

async function call (base: string, route: string, authorization?: string): Promise<{ status: number, headers: Headers, body: any }> {
  const [method, pattern] = route.split(' ')
  const url = pattern.replace('*', 'm')
  const headers: Record<string, string> = authorization != null ? { authorization } : {}
  let body: string | FormData | undefined = BODIES[route]
  if (route === 'POST /upload') {
    body = new FormData()
    body.append('file', new Blob(['png']), 'a.png')
  } else if (body != null) headers['content-type'] = 'application/json'
  const res = await fetch(base + url, { method, headers, body })
  // An event stream never ends: its headers say enough.
  if (res.headers.get('content-type')?.startsWith('text/event-stream') === true) {
    await res.body?.cancel()
    return { status: res.status, headers: res.headers, body: undefined }
  }
  const text = await res.text()
  let parsed: unknown
  try { parsed = JSON.parse(text) } catch { parsed = text }
  return { status: res.status, headers: res.headers, body: parsed }
}

/**
 * What each guarded route answers once its guard has let the request through (with BODIES above):
 * the route's own answer, so a 500 or a wrong refusal behind the guard fails too.
 */
const PASSED: Record<string, number> = {
  ...Object.fromEntries(API_KEY.map((route) => [route, 200])),
  'POST /img2img': 404, // the upstream's own {"detail":"File not found"}: file_id "none"
  // models and leases that do not exist: the route ran and said so
  'POST /gpu/reserve': 404,
  'DELETE /admin/aliases/*': 404, // no alias named 'm'
  'POST /gpu/ping': 404,
  'POST /gpu/release': 404,
  'DELETE /gpu/cache': 200,
  'DELETE /cache': 200,
  'POST /api/pull': 404 // model 'nope' has no assignment
}

/**
 * What any registered route answers once let through, sent as `call` sends it: PASSED's, else a
 * model-store route refused for the whole fleet (501), a route given no body or a literal ':id'
 * (400), or a listing (200). Exact, so a guarded route failing behind its guard (a 500, a wrong
 * refusal) fails the test: 'not 401' let those pass.
 */
function passedStatus (route: string): number {
  if (PASSED[route] != null) return PASSED[route]
  const [method, url] = route.split(' ')
  if (/^\/api\/(delete|copy|create|push|blobs\/)/.test(url)) return 501
  if (url.includes(':') || !['GET', 'HEAD'].includes(method)) return 400
  return 200
}

const KEYS = { API_KEYS: ' key-one , key-two ', ADMIN_TOKEN: 'admin-secret' }

t.test('with API_KEYS and ADMIN_TOKEN every route asks for what it should, and a refusal is a 401 in the route\'s format', async (t) => {
  const fleet = await fleetOf(t)
  const gw = await gateway(t, fleet, KEYS)
  for (const route of [...OPEN, ...ADMIN, ...API_KEY]) t.ok(gw.routes.includes(route), `${route} exists`)

  for (const route of gw.routes) {
    const level: Level = OPEN.includes(route) || isDocs(route) ? 'open' : ADMIN.includes(route) || isAdminApi(route) ? 'admin' : 'api-key'
    const [method, url] = route.split(' ')
    const style = styleOf(url)
    const anonymous = await call(gw.url, route)
    if (level === 'open') {
      // a route with a parameter is asked for a file that does not exist
      t.equal(anonymous.status, /[:*]/.test(url) ? 404 : 200, `${route} is open`)
      continue
    }
    t.equal(anonymous.status, 401, `${route} without credentials`)
    t.match(anonymous.headers.get('www-authenticate'), /^Bearer realm="ai-maestro-proxy"$/, `${route}: WWW-Authenticate`)
    t.ok(anonymous.headers.get('x-request-id'), `${route}: the refusal has a request id`)
    if (method !== 'HEAD') t.equal(errorText(style, anonymous.body), 'authentication required: send Authorization: Bearer <key>', `${route}: ${style} format`)

    const wrong = await call(gw.url, route, 'Bearer key-three')
    t.equal(wrong.status, 401, `${route} with a wrong key`)
    t.match(wrong.headers.get('www-authenticate'), /error="invalid_token"/)
    if (method !== 'HEAD') t.equal(errorText(style, wrong.body), 'invalid API key or token')

    const admin = await call(gw.url, route, 'Bearer admin-secret')
    t.equal(admin.status, passedStatus(route), `${route} with the admin token`)
    const key = await call(gw.url, route, 'Bearer key-two')
    if (level === 'admin') t.equal(key.status, 401, `${route} refuses an API key`)
    else t.equal(key.status, passedStatus(route), `${route} with an API key`)
  }
  t.same(await fleet.heldGpus(), [], 'nothing left leased')
})

t.test('only Bearer with an exact key counts', async (t) => {
  const fleet = await fleetOf(t)
  const gw = await gateway(t, fleet, KEYS)
  const accepted = ['Bearer key-one', 'bearer key-one', 'BEARER key-two', 'Bearer  key-one', 'Bearer\tkey-one']
  const refused = ['key-one', 'Basic key-one', 'Basic a2V5LW9uZQ==', 'Bearer', 'Bearer ', 'Bearer key-one extra', 'Bearer KEY-ONE', 'Bearer key-on',
    'Bearer key-one2', 'Bearer key-one,key-two', 'Bearer  ', 'Token key-one', 'Bearer "key-one"', 'Bearer key\u00adone', 'Bearer ' + 'k'.repeat(10_000),
    'Bearer key-one, key-two', 'Bearer ,key-one']
  for (const authorization of accepted) t.equal((await call(gw.url, 'POST /api/generate', authorization)).status, 200, JSON.stringify(authorization))
  for (const authorization of refused) t.equal((await call(gw.url, 'POST /api/generate', authorization)).status, 401, JSON.stringify(authorization))
  t.equal(bearerToken('Bearer abc'), 'abc')
  t.equal(bearerToken('bearer \t abc \t'), 'abc')
  t.equal(bearerToken('Bearer a b'), undefined)
  t.equal(bearerToken('Basic abc'), undefined)
  t.equal(bearerToken(undefined), undefined)
  t.equal(fleet.upstreams[0].requests.filter((r) => r.headers.authorization != null).length, 0, 'no upstream ever saw an Authorization header')
})

t.test('the real clients pass their key as Bearer', async (t) => {
  const fleet = await fleetOf(t)
  const gw = await gateway(t, fleet, KEYS)
  const ollama = new Ollama({ host: gw.url, headers: { Authorization: 'Bearer key-one' } })
  const answer = await ollama.generate({ model: 'm', prompt: 'x' })
  t.equal(answer.done, true, 'ollama client with a key')
  const refused = await new Ollama({ host: gw.url }).generate({ model: 'm', prompt: 'x' }).catch((err) => err)
  t.equal(refused.status_code, 401, 'ollama client without a key')
  t.equal(refused.error, 'authentication required: send Authorization: Bearer <key>')

  const openai = new OpenAI({ baseURL: gw.url + '/v1', apiKey: 'key-two', maxRetries: 0 })
  const chat = await openai.chat.completions.create({ model: 'm', messages: [{ role: 'user', content: 'x' }] })
  t.ok(chat.choices[0].message.content, 'openai client with a key')
  const wrong = await new OpenAI({ baseURL: gw.url + '/v1', apiKey: 'nope', maxRetries: 0 }).models.list().catch((err) => err)
  t.ok(wrong instanceof OpenAI.AuthenticationError, 'openai client with a wrong key gets AuthenticationError')
  t.equal(wrong.status, 401)
  t.equal(wrong.error?.message, 'invalid API key or token')
  for (const r of fleet.upstreams[0].requests) t.equal(r.headers.authorization, undefined, `${r.path}: the key stayed at the gateway`)
  t.same(await fleet.heldGpus(), [])
})

t.test('a refused request is answered before its body is read and takes no lease', async (t) => {
  const fleet = await fleetOf(t)
  const gw = await gateway(t, fleet, KEYS)
  const huge = await rawRequest(gw.url, 'POST /api/generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100000000\r\n\r\n{"model":"m"', { timeoutMs: 5000 })
  t.equal(huge.responses[0]?.status, 401)
  t.ok(huge.closed, 'the connection is closed rather than a 100 MB body read')
  t.ok(huge.elapsedMs < 3000)
  const garbage = await call(gw.url, 'POST /api/generate')
  t.equal(garbage.status, 401)
  const badJson = await fetch(gw.url + '/api/generate', { method: 'POST', body: '{"model":' })
  t.equal(badJson.status, 401, 'not 400: the body is never looked at')
  t.equal(fleet.upstreams[0].requests.length, 0)
  t.same(await fleet.heldGpus(), [])

  const unknown = await fetch(gw.url + '/no/such/route')
  t.equal(unknown.status, 404, 'an unknown path is a 404 whoever asks')
})

t.test('ADMIN_TOKEN alone guards the lease API; the proxied routes stay open', async (t) => {
  const fleet = await fleetOf(t)
  const gw = await gateway(t, fleet, { ADMIN_TOKEN: 'admin-secret' })
  t.equal((await call(gw.url, 'POST /api/generate')).status, 200, 'no key needed')
  t.equal((await call(gw.url, 'POST /api/generate', 'Bearer admin-secret')).status, 200)
  t.equal(fleet.upstreams[0].requests.at(-1)?.headers.authorization, undefined, 'the admin token is not passed on')
  for (const route of ADMIN) {
    t.equal((await call(gw.url, route)).status, 401, `${route} without the token`)
    t.equal((await call(gw.url, route, 'Bearer admin-secret')).status, PASSED[route], `${route} with it`)
  }
  const reservation = await fetch(gw.url + '/gpu/reserve', { method: 'POST', headers: { authorization: 'Bearer admin-secret' }, body: '{"outputType":"text","model":"m"}' })
  t.equal(reservation.status, 200)
  const { leaseId } = await reservation.json() as { leaseId: string }
  t.same(await fleet.heldGpus(), [fleet.gpuIds[0]])
  const release = await fetch(gw.url + '/gpu/release', { method: 'POST', body: JSON.stringify({ leaseId }) })
  t.equal(release.status, 401, 'nobody else can release it')
  t.same(await fleet.heldGpus(), [fleet.gpuIds[0]])
  t.equal((await fetch(gw.url + '/gpu/release', { method: 'POST', headers: { authorization: 'Bearer admin-secret' }, body: JSON.stringify({ leaseId }) })).status, 200)
  t.same(await fleet.heldGpus(), [])
})

t.test('API_KEYS alone: the lease API\'s write routes need a key too (a reservation takes GPUs); pull and cache clearing refuse keys', async (t) => {
  const fleet = await fleetOf(t)
  const gw = await gateway(t, fleet, { API_KEYS: 'key-one' })
  for (const route of ADMIN) {
    t.equal((await call(gw.url, route)).status, 401, `${route} without a key`)
    t.equal((await call(gw.url, route, 'Bearer key-one')).status, LEASE.includes(route) ? PASSED[route] : 403, `${route} with a key`)
  }
  t.equal((await call(gw.url, 'GET /health')).status, 200)
  t.same(await fleet.heldGpus(), [])
})

t.test('neither set: everything open, and a client\'s own Authorization goes to the upstream as sent', async (t) => {
  const fleet = await fleetOf(t)
  const gw = await gateway(t, fleet, {})
  for (const route of [...API_KEY, ...ADMIN]) t.equal((await call(gw.url, route)).status, PASSED[route], route)
  t.equal((await call(gw.url, 'POST /api/generate', 'Bearer upstream-own-token')).status, 200)
  t.equal(fleet.upstreams[0].requests.at(-1)?.headers.authorization, 'Bearer upstream-own-token')
  t.same(await fleet.heldGpus(), [])
})

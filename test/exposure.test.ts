// Exposure (CONTRACT 18): cross-site writes refused by their Origin, and the admin routes without
// ADMIN_TOKEN answering only the loopback interface. Real MariaDB, Redis and simulators; the
// non-loopback client is this machine's own non-loopback address.
import t, { type Test } from 'tap'
import { networkInterfaces } from 'node:os'
import type { AddressInfo } from 'node:net'
import Fastify from 'fastify'
import maestro, { type MaestroOptions } from '../app.js'
import { globMatches, OriginPolicy } from '../services/clients/origins.js'
import { isLoopbackAddress } from '../services/clients/loopback.js'
import { startFleet, type TestFleet } from './helpers/gateway.js'
import { startSimulator } from './helpers/upstream-simulator.js'

interface Answer { status: number, headers: Headers, body: any }

async function send (url: string, method: string, body?: string, headers: Record<string, string> = {}): Promise<Answer> {
  const res = await fetch(url, { method, headers, body })
  const text = await res.text()
  let parsed: unknown
  try { parsed = JSON.parse(text) } catch { parsed = text }
  return { status: res.status, headers: res.headers, body: parsed }
}

/** What a page on another site can send without a CORS preflight: a `text/plain` POST. */
const crossSite = (origin: string, extra: Record<string, string> = {}): Record<string, string> => ({ origin, 'content-type': 'text/plain;charset=UTF-8', ...extra })

const GENERATE = JSON.stringify({ model: 'llama3.2', prompt: 'hi', stream: false })

/** One llama3.2 server on GPU 0, the gateway's own tables migrated (the admin API needs them). */
async function llamaFleet (t: Test): Promise<TestFleet> {
  return await startFleet(t, { gpus: [1], migrate: true, upstreams: [{ model: 'llama3.2', gpus: [0], name: 'llama-own' }] })
}

const TABLES = ['computers', 'gpus', 'llms', 'assignments', 'assignment_gpus']
async function tables (fleet: TestFleet): Promise<string> {
  return JSON.stringify(await Promise.all(TABLES.map(async (table) => await fleet.db.query(`SELECT * FROM \`${table}\` ORDER BY 1`))))
}

const generations = (sim: { requests: Array<{ path: string }> }): number => sim.requests.filter((r) => r.path === '/api/generate').length

/** A non-loopback IPv4 address of this machine (never another host). */
function ownExternalAddress (): string | undefined {
  for (const list of Object.values(networkInterfaces())) {
    for (const a of list ?? []) if (a.family === 'IPv4' && !a.internal && !a.address.startsWith('127.')) return a.address
  }
  return undefined
}

/** A gateway on every interface: reached at 127.0.0.1 from loopback, at `external` from this machine's other address. */
async function gatewayOnAllInterfaces (t: Test, options: MaestroOptions, external: string, trustProxy = false): Promise<{ loopback: string, external: string }> {
  const app = Fastify({ logger: false, forceCloseConnections: true, trustProxy })
  await app.register(maestro, { dotenv: false, ...options })
  await app.listen({ port: 0, host: '0.0.0.0' })
  t.teardown(async () => await app.close())
  const port = (app.server.address() as AddressInfo).port
  return { loopback: `http://127.0.0.1:${port}`, external: `http://${external}:${port}` }
}

t.test('the four-request attack from a page on another site is refused, writes nothing, and prompts stay on the fleet', async (t) => {
  const fleet = await llamaFleet(t)
  const attacker = await startSimulator({ gpuIds: ['attacker'], models: ['llama3.2'] })
  t.teardown(() => attacker.close())
  const gw = await fleet.replica()
  const before = await tables(fleet)
  const newGpuId = fleet.gpuIds.length + 1
  // A computer, a GPU on it weighted to win, an assignment of llama3.2 to the attacker's server, and a cache clear so it is used at once.
  const attack: Array<[string, string, string | undefined]> = [
    ['POST', '/admin/computers', JSON.stringify({ name: 'evil-box', ip: '127.0.0.1' })],
    ['POST', '/admin/gpus', JSON.stringify({ name: 'evil-gpu', vramGb: 24, computerId: 2, weight: 100 })],
    ['POST', '/admin/assignments', JSON.stringify({ name: 'evil', model: 'llama3.2', port: attacker.port, gpuIds: [newGpuId] })],
    ['DELETE', '/gpu/cache', undefined]
  ]
  for (const [method, path, body] of attack) {
    const res = await send(gw.url + path, method, body, crossSite('https://evil.example'))
    t.equal(res.status, 403, `${method} ${path} from https://evil.example`)
    t.match(res.body, { error: /origin "https:\/\/evil\.example".*ALLOWED_ORIGINS/ }, `${method} ${path}: says why, in the route's format`)
    t.same(Object.keys(res.body ?? {}), ['error'])
  }
  t.equal(await tables(fleet), before, 'nothing was written to the inventory')
  const prompt = await send(gw.url + '/api/generate', 'POST', GENERATE, { 'content-type': 'application/json' })
  t.equal(prompt.status, 200)
  t.equal(prompt.headers.get('x-maestro-assignment'), 'llama-own', 'the next prompt goes to the fleet\'s own server')
  t.equal(generations(attacker), 0, 'the attacker\'s server saw no prompt')

  // The same four requests from a loopback page (an allowed origin) do all that: the refusal above
  // is what stopped them. (The fleet's own server now has the model loaded, which outweighs any
  // weight: drained, it takes nothing new.)
  for (const [method, path, body] of [...attack, ['POST', '/admin/assignments/1/drain', undefined] as const]) {
    const res = await send(gw.url + path, method, body, crossSite('http://127.0.0.1:5173'))
    t.ok(res.status === 201 || res.status === 200, `${method} ${path} from a loopback page: ${res.status}`)
  }
  const hijacked = await send(gw.url + '/api/generate', 'POST', GENERATE, { 'content-type': 'application/json' })
  t.equal(hijacked.headers.get('x-maestro-assignment'), 'evil', 'allowed, the assignment is used at once')
  t.equal(generations(attacker), 1)
})

t.test('allowed origins: loopback and local apps by default, ALLOWED_ORIGINS and OLLAMA_ORIGINS with wildcards; names are never resolved', async (t) => {
  const fleet = await llamaFleet(t)
  const gw = await fleet.replica({ ALLOWED_ORIGINS: ' https://*.example.com , https://exact.test/', OLLAMA_ORIGINS: 'http://ollama-ui.lan:8080' })
  const allowed = [
    'http://localhost', 'http://localhost:3000', 'https://localhost:8443', 'http://127.0.0.1:5173', 'http://[::1]:8080', 'http://0.0.0.0:11434',
    'HTTP://LOCALHOST:3000', 'app://obsidian.md', 'file://', 'tauri://localhost', 'vscode-webview://1abc2def',
    'https://app.example.com', 'https://a.b.example.com', 'https://exact.test', 'http://ollama-ui.lan:8080'
  ]
  const refused = [
    'https://evil.example',
    // names that resolve to 127.0.0.1 (DNS rebinding) are names, not loopback
    'http://localtest.me', 'http://localtest.me:5000', 'http://127.0.0.1.nip.io', 'http://localhost.evil.example', 'http://evillocalhost', 'http://localhost.',
    'http://127.0.0.2', 'null', 'http://localhost, https://evil.example', 'http://localhost:80/path', 'http://user@localhost',
    'https://example.com', 'https://app.example.com.evil.example', 'http://app.example.com', 'https://exact.test:444', 'http://ollama-ui.lan', 'https://evil.example/.example.com'
  ]
  for (const origin of allowed) {
    const res = await send(gw.url + '/api/generate', 'POST', GENERATE, crossSite(origin))
    t.equal(res.status, 200, `${origin} may prompt`)
  }
  for (const origin of refused) {
    const res = await send(gw.url + '/api/generate', 'POST', GENERATE, crossSite(origin))
    t.equal(res.status, 403, `${origin} is refused`)
  }
  t.equal(generations(fleet.upstreams[0]), allowed.length, 'no refused request reached the server')

  const openai = await send(gw.url + '/v1/chat/completions', 'POST', JSON.stringify({ model: 'llama3.2', messages: [] }), crossSite('http://localtest.me'))
  t.equal(openai.status, 403)
  t.match(openai.body, { error: { message: /ALLOWED_ORIGINS/, type: 'invalid_request_error' } }, 'in the OpenAI error format')
  t.equal((await send(gw.url + '/api/tags', 'GET', undefined, { origin: 'https://evil.example' })).status, 200, 'reading is not a write: GET is unaffected')

  // Matching is linear: a pattern of many stars against a long origin that nearly matches.
  const policy = new OriginPolicy(['https://' + '*a'.repeat(50) + '*b'])
  const started = performance.now()
  t.notOk(policy.allows('https://' + 'a'.repeat(8000)))
  t.ok(performance.now() - started < 50, 'no backtracking')
  t.ok(globMatches(['https://', '.x.', '.com'], 'https://a.x.b.x.c.com'), 'a middle piece found at its first place')
  t.notOk(globMatches(['ab', 'ba'], 'aba'), 'prefix and suffix may not overlap')
})

t.test('a disallowed Origin with a valid API key or the admin token passes; without one it is refused', async (t) => {
  const fleet = await llamaFleet(t)
  const keyed = await fleet.replica({ API_KEYS: 'key-one', ADMIN_TOKEN: 'admin-secret' })
  const evil = (authorization?: string): Record<string, string> => crossSite('https://evil.example', authorization != null ? { authorization } : {})
  t.equal((await send(keyed.url + '/api/generate', 'POST', GENERATE, evil('Bearer key-one'))).status, 200, 'with a key')
  t.equal((await send(keyed.url + '/api/generate', 'POST', GENERATE, evil('Bearer admin-secret'))).status, 200, 'with the admin token')
  t.equal((await send(keyed.url + '/admin/models', 'POST', JSON.stringify({ kind: 'llm', name: 'phi3' }), evil('Bearer admin-secret'))).status, 201, 'the console from another origin, with its token')
  t.equal((await send(keyed.url + '/api/generate', 'POST', GENERATE, evil('Bearer key-two'))).status, 401, 'a wrong key is no key')
  t.equal((await send(keyed.url + '/api/generate', 'POST', GENERATE, evil())).status, 401)

  // Only ADMIN_TOKEN: the proxied routes need no key, so an unknown page is refused by its origin.
  const tokenOnly = await fleet.replica({ ADMIN_TOKEN: 'admin-secret' })
  t.equal((await send(tokenOnly.url + '/api/generate', 'POST', GENERATE, evil())).status, 403, 'no credential: refused by origin')
  t.equal((await send(tokenOnly.url + '/api/generate', 'POST', GENERATE, evil('Bearer admin-secret'))).status, 200, 'the token: passes')
  t.equal((await send(tokenOnly.url + '/api/generate', 'POST', GENERATE, evil('Bearer not-the-token'))).status, 403, 'a wrong token is no token')
})

t.test('no Origin (curl, SDKs): unaffected, a JSON body sent as form encoding (curl -d) included', async (t) => {
  const fleet = await llamaFleet(t)
  const gw = await fleet.replica()
  const form = { 'content-type': 'application/x-www-form-urlencoded' }
  const prompt = await send(gw.url + '/api/generate', 'POST', GENERATE, form)
  t.equal(prompt.status, 200)
  t.equal(prompt.body.done, true, 'the body was read as JSON')
  const made = await send(gw.url + '/admin/models', 'POST', JSON.stringify({ kind: 'llm', name: 'phi3' }), form)
  t.equal(made.status, 201, 'the admin API from loopback, curl -d style')
  t.same(await fleet.db.query("SELECT name FROM llms WHERE name = 'phi3'"), [{ name: 'phi3' }])
  t.equal((await send(gw.url + '/gpu/cache', 'DELETE')).status, 200)
})

t.test('without ADMIN_TOKEN the admin API, /api/pull and cache clearing answer only the loopback interface', async (t) => {
  const external = ownExternalAddress()
  if (external === undefined) {
    t.fail('this machine needs a non-loopback address for this test')
    return
  }
  t.notOk(isLoopbackAddress(external))
  const fleet = await llamaFleet(t)
  // trustProxy on: a forwarded 127.0.0.1 must still not count.
  const gw = await gatewayOnAllInterfaces(t, fleet.options, external, true)
  const admin: Array<[string, string, string | undefined, number]> = [
    ['GET', '/admin/computers', undefined, 200],
    ['POST', '/admin/models', JSON.stringify({ kind: 'llm', name: 'phi3' }), 201],
    ['POST', '/api/pull', JSON.stringify({ model: 'nope' }), 404],
    ['DELETE', '/gpu/cache', undefined, 200],
    ['DELETE', '/cache', undefined, 200]
  ]
  for (const [method, path, body] of admin) {
    const res = await send(gw.external + path, method, body, { 'content-type': 'application/json', 'x-forwarded-for': '127.0.0.1' })
    t.equal(res.status, 403, `${method} ${path} from ${external}`)
    t.match(res.body, { error: /set ADMIN_TOKEN/ }, `${method} ${path}: names ADMIN_TOKEN`)
  }
  t.same(await fleet.db.query("SELECT name FROM llms WHERE name = 'phi3'"), [], 'nothing written')
  for (const [method, path, body, status] of admin) {
    t.equal((await send(gw.loopback + path, method, body, { 'content-type': 'application/json' })).status, status, `${method} ${path} from loopback`)
  }
  // Not admin routes: prompts and the lease API keep their rules.
  t.equal((await send(gw.external + '/api/generate', 'POST', GENERATE, { 'content-type': 'application/json' })).status, 200, 'a prompt from the LAN')
  const reserved = await send(gw.external + '/gpu/reserve', 'POST', JSON.stringify({ outputType: 'text', model: 'llama3.2' }), { 'content-type': 'application/json' })
  t.equal(reserved.status, 200, 'a reservation from the LAN')
  t.equal((await send(gw.external + '/gpu/release', 'POST', JSON.stringify({ leaseId: reserved.body.leaseId }), { 'content-type': 'application/json' })).status, 200)
  t.same(await fleet.heldGpus(), [])
})

t.test('with API keys but no ADMIN_TOKEN a key gets 403 on /api/pull and cache clearing, and keeps the lease API', async (t) => {
  const fleet = await llamaFleet(t)
  const gw = await fleet.replica({ API_KEYS: 'key-one' })
  const key = { authorization: 'Bearer key-one', 'content-type': 'application/json' }
  for (const [method, path, body] of [['POST', '/api/pull', JSON.stringify({ model: 'llama3.2' })], ['DELETE', '/gpu/cache'], ['DELETE', '/cache'], ['GET', '/admin/computers']]) {
    const res = await send(gw.url + path, method as string, body, key)
    t.equal(res.status, 403, `${method} ${path} with a key`)
    t.match(res.body, { error: /ADMIN_TOKEN/ })
  }
  t.equal(fleet.upstreams[0].requests.filter((r) => r.path === '/api/pull').length, 0, 'nothing was pulled')
  t.equal((await send(gw.url + '/gpu/release', 'POST', JSON.stringify({ leaseId: 'nope' }), key)).status, 404, 'the lease API still takes the key')
  t.equal((await send(gw.url + '/api/generate', 'POST', GENERATE, key)).status, 200)
})

t.test('the start-up log says once that ADMIN_TOKEN is not set', async (t) => {
  const fleet = await llamaFleet(t)
  const lines: string[] = []
  await fleet.replica({}, { logLines: lines })
  const warnings = lines.map((l) => JSON.parse(l)).filter((l) => typeof l.msg === 'string' && l.msg.includes('ADMIN_TOKEN is not set'))
  t.equal(warnings.length, 1)
  t.equal(warnings[0]?.level, 40, 'a warn line')
  t.match(warnings[0]?.msg, /loopback/)
  const withToken: string[] = []
  await fleet.replica({ ADMIN_TOKEN: 'admin-secret' }, { logLines: withToken })
  t.notOk(withToken.some((l) => l.includes('ADMIN_TOKEN is not set')), 'not with a token')
})

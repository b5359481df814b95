// The fleet feed's reach (CONTRACT 18): GET /gpu/events without credentials tells what the open
// GET /gpu/status does, a key its own recent requests besides, the admin token everything; open
// streams are capped in all and per client; a slow reader is cut at its bound. Two replicas on real
// MariaDB and Redis with simulated upstreams, and the console in Debian's Chromium.
import t from 'tap'
import Fastify from 'fastify'
import { networkInterfaces } from 'node:os'
import { Writable } from 'node:stream'
import type { AddressInfo } from 'node:net'
import type { Test } from 'tap'
import type { Page } from 'playwright-core'
import maestro from '../app.js'
import { startFleet, type Gateway } from './helpers/gateway.js'
import { openFleetStream, type FleetStream } from './helpers/fleet-stream.js'
import { insertKey } from './helpers/api-keys.js'
import { buildConsole, startBrowser } from './helpers/browser.js'
import { StreamReader } from '../services/fleet/fleet-events.js'

const TOKEN = 'feed-scope-admin-token'
const SECRETS = { alice: 'alice-secret-0123456789abcdef', bob: 'bob-secret-0123456789abcdef' }
const bearer = (secret: string): Record<string, string> => ({ authorization: `Bearer ${secret}` })

/** Field names the feed must not carry to a reader without the admin token. */
const OPERATOR_ONLY = ['ip', 'address', 'loaded', 'host', 'pid', 'store', 'token']
/** ...and to one without a key either. */
const REQUESTS = ['recent', 'recentAdded', 'recentLimit', 'client']

/** Every field name anywhere in `value`, with the path to it. */
function fieldsOf (value: unknown, path = '', out: string[] = []): string[] {
  if (Array.isArray(value)) value.forEach((v, i) => fieldsOf(v, `${path}[${i}]`, out))
  else if (value != null && typeof value === 'object') {
    for (const [k, v] of Object.entries(value)) {
      out.push(`${path}.${k}`)
      fieldsOf(v, `${path}.${k}`, out)
    }
  }
  return out
}

/** The fields among `names` that any event of the stream carried. */
const carried = (stream: FleetStream, names: string[]): string[] =>
  stream.events.flatMap((e) => fieldsOf(e.data, e.event)).filter((p) => names.includes(p.slice(p.lastIndexOf('.') + 1)))

async function post (gw: Gateway, path: string, body: unknown, headers: Record<string, string>): Promise<{ status: number, body: any }> {
  const res = await fetch(gw.url + path, { method: 'POST', headers: { 'content-type': 'application/json', ...headers }, body: JSON.stringify(body) })
  return { status: res.status, body: await res.json() }
}

const generate = async (gw: Gateway, secret: string): Promise<number> =>
  (await fetch(`${gw.url}/api/generate`, { method: 'POST', headers: bearer(secret), body: JSON.stringify({ model: 'qwq', prompt: 'x', stream: false }) })).status

/** A fleet with ADMIN_TOKEN and the keys alice and bob (in the api_keys table). */
async function securedFleet (t: Pick<Test, 'teardown'>): Promise<Awaited<ReturnType<typeof startFleet>>> {
  const fleet = await startFleet(t, { gpus: [1], upstreams: [{ model: 'qwq', gpus: [0] }], migrate: true, options: { ADMIN_TOKEN: TOKEN } })
  for (const [name, secret] of Object.entries(SECRETS)) await insertKey(fleet.db.query, name, secret)
  return fleet
}

t.test('without the token the feed tells what /gpu/status does; a key sees its own requests; the token sees all', async (t) => {
  const fleet = await securedFleet(t)
  const [one, two] = [await fleet.replica(), await fleet.replica()]
  const port = fleet.upstreams[0].port
  const streams = {
    anonymous: await openFleetStream(one.url),
    alice: await openFleetStream(one.url, bearer(SECRETS.alice)),
    bob: await openFleetStream(one.url, bearer(SECRETS.bob)),
    admin: await openFleetStream(one.url, bearer(TOKEN))
  }
  for (const s of Object.values(streams)) t.teardown(s.close)
  const all = Object.values(streams)
  await Promise.all(all.map(async (s) => await s.until((st) => st.gpus.length === 1, 3000, 'a snapshot')))

  // traffic by both keys, through the other replica
  t.equal(await generate(two, SECRETS.alice), 200)
  t.equal(await generate(two, SECRETS.bob), 200)
  t.equal(await generate(two, SECRETS.alice), 200)
  const clients = (s: any): string[] => (s.recent ?? []).map((r: any) => r.client)
  await streams.admin.until((s) => clients(s).filter((c) => c === 'alice').length === 2 && clients(s).includes('bob'), 3000, 'both keys\' requests')
  // then a lease every reader must see: each stream's frames come in order, so all sent before it has come too
  const reserved = await post(two, '/gpu/reserve', { outputType: 'text', model: 'qwq' }, bearer(TOKEN))
  t.equal(reserved.status, 200)
  await Promise.all(all.map(async (s) => await s.until((st) => st.gpus[0].state === 'leased', 3000, 'the reservation')))
  t.equal((await post(two, '/gpu/release', { leaseId: reserved.body.leaseId }, bearer(TOKEN))).status, 200)
  await Promise.all(all.map(async (s) => await s.until((st) => st.gpus[0].state === 'idle', 3000, 'the release')))

  // anonymous: GPUs, leases, models, servers by name; nothing else, in the snapshot or any change
  const anonymous = streams.anonymous
  t.ok(anonymous.events.filter((e) => e.event === 'change').length >= 2, 'changes came after the traffic')
  t.same(carried(anonymous, [...OPERATOR_ONLY, ...REQUESTS]), [], 'no address, loaded model, replica host, security setting or request')
  for (const word of ['alice', 'bob', '127.0.0.1']) t.notOk(anonymous.text().includes(word), `"${word}" never sent`)
  const seen = anonymous.state() as any
  t.match(seen, { computers: [{ name: 'box', gpuIds: [fleet.gpuIds[0]] }], gpus: [{ id: fleet.gpuIds[0], state: 'idle' }], assignments: [{ name: 'qwq-1', model: 'qwq', slots: { capacity: 1 } }] })
  t.same(seen.admin, { resources: (streams.admin.state() as any).admin.resources }, 'which records the console can edit, not whether a token guards them')
  const leases = anonymous.events.filter((e) => e.event === 'change' && e.data.set?.gpus?.[0]?.state === 'leased')
  t.match(leases.at(-1)?.data.set.gpus[0], { model: 'qwq', assignment: 'qwq-1', purpose: 'reservation' }, 'a lease as /gpu/status tells it')

  // a key: the anonymous view and its own requests, never the other's
  for (const [name, other] of [['alice', 'bob'], ['bob', 'alice']]) {
    const stream = streams[name as 'alice' | 'bob']
    t.same(carried(stream, OPERATOR_ONLY), [], `${name}: no address, loaded model, replica host or security setting`)
    const mine = clients(stream.state())
    t.equal(mine.length, name === 'alice' ? 2 : 1, `${name} sees its own requests`)
    t.ok(mine.every((c) => c === name), `${name} sees only its own: ${mine.join()}`)
    t.notOk(stream.text().includes(other), `${other} never named to ${name}`)
  }

  // the admin token: everything
  const full = streams.admin.state() as any
  t.equal(full.assignments[0].address, `127.0.0.1:${port}`)
  t.equal(full.computers[0].ip, '127.0.0.1')
  t.equal(full.admin.token, true)
  t.ok(full.replicas.every((r: any) => typeof r.host === 'string' && typeof r.pid === 'number'), 'replica hosts')
  t.same(clients(full).sort(), ['alice', 'alice', 'bob'])
})

const remote = Object.values(networkInterfaces()).flat().find((i) => i != null && i.family === 'IPv4' && !i.internal)?.address
t.test('with neither keys nor token: loopback is the operator, another address the public', { skip: remote === undefined ? 'no non-loopback address here' : false }, async (t) => {
  const fleet = await startFleet(t, { gpus: [1], upstreams: [{ model: 'qwq', gpus: [0] }] })
  const app = Fastify({ logger: false, forceCloseConnections: true })
  await app.register(maestro, { dotenv: false, ...fleet.options })
  await app.listen({ port: 0, host: '0.0.0.0' })
  t.teardown(async () => { await app.close() })
  const { port } = app.server.address() as AddressInfo
  const loopback = await openFleetStream(`http://127.0.0.1:${port}`)
  const other = await openFleetStream(`http://${remote}:${port}`)
  t.teardown(loopback.close)
  t.teardown(other.close)
  const local = await loopback.until(() => true)
  const far = await other.until(() => true)
  t.equal((local as any).computers[0].ip, '127.0.0.1', 'loopback: the whole feed')
  t.ok(Array.isArray(local.recent))
  t.same(carried(other, [...OPERATOR_ONLY, ...REQUESTS]), [], `from ${remote}: the public view`)
  t.equal(far.gpus.length, 1)
})

t.test(`open streams: 100 in all, 10 per client, past either 429; a closed one frees its place`, async (t) => {
  const fleet = await startFleet(t, { gpus: [1], upstreams: [{ model: 'qwq', gpus: [0] }], migrate: true })
  const keys = Array.from({ length: 10 }, (_, i) => [`k${i}`, `secret-of-k${i}-0123456789`] as const)
  for (const [name, secret] of keys) await insertKey(fleet.db.query, name, secret)
  const gw = await fleet.replica()
  const open: AbortController[] = []
  t.teardown(() => { for (const c of open) c.abort() })
  /** Opens a stream; its status, and its body when refused. */
  const connect = async (headers: Record<string, string> = {}): Promise<{ status: number, body?: any, close: () => void }> => {
    const controller = new AbortController()
    const res = await fetch(`${gw.url}/gpu/events`, { headers, signal: controller.signal })
    if (res.status !== 200) return { status: res.status, body: await res.json(), close: () => {} }
    open.push(controller)
    // Read as a page does: a stream left unread falls behind and is cut (its place freed), which
    // a slow run (CI) reached before the last checks here and took for a miscount.
    const body = res.body?.getReader()
    void (async () => { try { while (body !== undefined && !(await body.read()).done); } catch {} })()
    return { status: 200, close: () => { controller.abort() } }
  }
  /** Opens one, again and again while it is refused (a closed stream's place is freed once the gateway sees it close). */
  const connectOnceFreed = async (headers: Record<string, string> = {}): Promise<number> => {
    const deadline = performance.now() + 3000
    for (;;) {
      const s = await connect(headers)
      if (s.status !== 429 || performance.now() > deadline) return s.status
      await new Promise((resolve) => setTimeout(resolve, 20))
    }
  }

  const k0 = bearer(keys[0][1])
  const first = []
  for (let i = 0; i < 10; i++) first.push(await connect(k0))
  t.same(first.map((s) => s.status), Array(10).fill(200), 'ten streams for one key')
  const eleventh = await connect(k0)
  t.equal(eleventh.status, 429, 'the eleventh of one key')
  t.match(eleventh.body, { error: /per client|this client/ }, 'in the route\'s format, saying why')
  first[0].close()
  t.equal(await connectOnceFreed(k0), 200, 'a closed stream frees its place')

  // 90 more from the other keys and the address: 100 open
  for (const [, secret] of keys.slice(1, 9)) for (let i = 0; i < 10; i++) t.equal((await connect(bearer(secret))).status, 200)
  const anonymous = []
  for (let i = 0; i < 10; i++) anonymous.push(await connect())
  t.same(anonymous.map((s) => s.status), Array(10).fill(200), 'ten without a key, from one address')
  const past = await connect(bearer(keys[9][1]))
  t.equal(past.status, 429, 'the 101st, of a key that has none open')
  t.match(past.body, { error: /on this gateway/ })
  anonymous[0].close()
  t.equal(await connectOnceFreed(bearer(keys[9][1])), 200, 'one closed: the next gets its place')
  t.equal((await connect()).status, 429, 'full again: the address, though below its ten, waits too')
})

t.test('a reader is cut once behind by more than its bound, never for one large snapshot it takes in', async (t) => {
  // A socket that takes in each write on the next turn: a frame larger than the bound waits a moment.
  const taking = new Writable({ highWaterMark: 1024, write (_chunk, _encoding, callback) { setImmediate(callback) } })
  let dropped = false
  const reader = new StreamReader(taking, 8 * 1024, () => { dropped = true })
  reader.write(`event: snapshot\ndata: ${'x'.repeat(20 * 1024)}\n\n`)
  t.notOk(dropped, 'a 20 KiB snapshot with an 8 KiB bound')
  if (!taking.destroyed) await new Promise((resolve) => taking.once('drain', resolve))
  reader.write('event: change\ndata: {}\n\n')
  t.notOk(dropped, 'and the changes after it')

  // One that takes in nothing: cut at the next frame once more than max(bound, the snapshot) waits.
  const stalled = new Writable({ highWaterMark: 1024, write () {} })
  let cut = false
  const slow = new StreamReader(stalled, 8 * 1024, () => { cut = true })
  const snapshot = `event: snapshot\ndata: ${'x'.repeat(20 * 1024)}\n\n`
  slow.write(snapshot)
  let frames = 0
  while (!cut && frames < 1000) { slow.write(`event: change\ndata: ${'y'.repeat(500)}\n\n`); frames++ }
  t.ok(cut, `cut after ${frames} frames`)
  t.ok(stalled.destroyed, 'its connection closed')
  t.ok(stalled.writableLength <= snapshot.length + 600, `at most a snapshot and one frame held (${stalled.writableLength})`)
})

t.test('the console in each view: anonymous, a key, the admin token', async (t) => {
  // The page's scripts, compiled as `npm run build` does (the gateway reads them when it starts).
  buildConsole()
  const browser = await startBrowser(t)
  const fleet = await securedFleet(t)
  const gw = await fleet.replica()
  t.equal(await generate(gw, SECRETS.alice), 200)
  t.equal(await generate(gw, SECRETS.bob), 200)
  const openPage = async (credential?: string): Promise<{ page: Page, errors: string[] }> => {
    const page = await browser.newPage()
    t.teardown(async () => { await page.close() })
    const errors: string[] = []
    page.on('pageerror', (err) => errors.push(err.message))
    if (credential !== undefined) await page.addInitScript((token) => { sessionStorage.setItem('maestro-admin-token', token) }, credential)
    await page.goto(`${gw.url}/ui/`)
    await page.waitForSelector('body[data-ready="true"]', { timeout: 5000 })
    return { page, errors }
  }
  const rowsAtLeast = async (page: Page, n: number): Promise<void> => {
    await page.waitForFunction((count: number) => document.querySelectorAll('#recent-rows tr').length >= count, n, { timeout: 3000 })
  }

  // the token: both requests, the server's address
  const admin = await openPage(TOKEN)
  await rowsAtLeast(admin.page, 2)
  t.same((await admin.page.locator('#recent-rows .r-client').allTextContents()).sort(), ['alice', 'bob'], 'token: every client\'s request')
  t.equal(await admin.page.locator('#assignment-rows .a-where').textContent(), `127.0.0.1:${fleet.upstreams[0].port}`, 'token: the server\'s address')
  t.same(admin.errors, [], 'no page errors')

  // a key: its own request only
  const alice = await openPage(SECRETS.alice)
  await rowsAtLeast(alice.page, 1)
  t.same(await alice.page.locator('#recent-rows .r-client').allTextContents(), ['alice'], 'key: its own request only')
  t.equal(await alice.page.locator('#assignment-rows .a-where').textContent(), '—', 'key: no address')
  t.same(alice.errors, [], 'no page errors')

  // nothing typed in: the fleet, no address, no requests (the list says what would show them)
  const anonymous = await openPage()
  t.equal(await anonymous.page.locator('.gpu').count(), 1, 'anonymous: the GPU')
  t.equal(await anonymous.page.locator('#assignment-rows .a-name').textContent(), 'qwq-1', 'and the server by name')
  t.equal(await anonymous.page.locator('#assignment-rows .a-where').textContent(), '—', 'no address')
  t.equal(await anonymous.page.locator('.computer-ip').textContent(), '', 'no computer address')
  t.equal(await anonymous.page.locator('#recent-rows tr').count(), 0, 'no requests')
  t.match(await anonymous.page.locator('#recent-empty').textContent(), /admin token/, 'saying what shows them')
  // the token typed in: the feed opens again with it and shows everything
  await anonymous.page.click('#admin-toggle')
  await anonymous.page.waitForSelector('#token-form:not([hidden])', { timeout: 3000 })
  await anonymous.page.fill('#admin-token', TOKEN)
  await anonymous.page.click('#token-form button[type="submit"]')
  await rowsAtLeast(anonymous.page, 2)
  t.equal(await anonymous.page.locator('#assignment-rows .a-where').textContent(), `127.0.0.1:${fleet.upstreams[0].port}`, 'the address, once the token is given')
  t.same(anonymous.errors, [], 'no page errors')
})

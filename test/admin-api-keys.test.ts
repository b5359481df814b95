// /admin/api-keys with two replicas on MariaDB and Redis: a created key works on the other replica,
// respects its maxConcurrent, stops working once revoked; its secret is answered once and appears
// in no list, log line or metric.
import t from 'tap'
import { performance } from 'node:perf_hooks'
import { setTimeout as sleep } from 'node:timers/promises'
import { Ollama } from 'ollama'
import { insertKey } from './helpers/api-keys.js'
import { startFleet, type Gateway } from './helpers/gateway.js'

const TOKEN = 'admin-token-for-key-tests'

async function admin (gw: Gateway, method: string, path: string, body?: unknown, token: string | null = TOKEN): Promise<{ status: number, body: any, text: string }> {
  const headers: Record<string, string> = {}
  if (token !== null) headers.authorization = `Bearer ${token}`
  if (body !== undefined) headers['content-type'] = 'application/json'
  const res = await fetch(gw.url + path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) })
  const text = await res.text()
  return { status: res.status, body: text === '' ? undefined : JSON.parse(text), text }
}

async function generate (gw: Gateway, key: string): Promise<{ status: number, retryAfter: string | null }> {
  const res = await fetch(`${gw.url}/api/generate`, {
    method: 'POST',
    headers: { 'content-type': 'application/json', authorization: `Bearer ${key}` },
    body: JSON.stringify({ model: 'llama3', prompt: 'hi', stream: false })
  })
  await res.arrayBuffer()
  return { status: res.status, retryAfter: res.headers.get('retry-after') }
}

/** Polls until `check` answers true, for up to 3 s; answers how long it took. */
async function within (check: () => Promise<boolean>): Promise<number> {
  const start = performance.now()
  while (!await check() && performance.now() - start < 3000) await sleep(10)
  return performance.now() - start
}

t.test('API keys through the admin API', async t => {
  const fleet = await startFleet(t, {
    gpus: [1, 1],
    migrate: true,
    upstreams: [{ model: 'llama3', gpus: [0], simulator: { tokens: 30, tokenDelayMs: 25 } }, { model: 'llama3', gpus: [1] }],
    options: { ADMIN_TOKEN: TOKEN }
  })
  const lines: string[] = []
  const a = await fleet.replica({}, { logLines: lines })
  const b = await fleet.replica()

  for (const [method, path] of [['GET', '/admin/api-keys'], ['POST', '/admin/api-keys'], ['PATCH', '/admin/api-keys/x'], ['DELETE', '/admin/api-keys/x']]) {
    t.equal((await admin(a, method, path, method === 'POST' || method === 'PATCH' ? { name: 'x' } : undefined, null)).status, 401, `${method} ${path} needs the token`)
  }

  const bad: Array<[string, unknown, number, RegExp]> = [
    ['a name with a space', { name: 'team a' }, 400, /^name: /],
    ['maxConcurrent 0', { name: 'team-a', maxConcurrent: 0 }, 400, /^maxConcurrent: /],
    ['rpm as a string', { name: 'team-a', rpm: '5' }, 400, /^rpm: /],
    ['a bad priority', { name: 'team-a', priority: 'urgent' }, 400, /^priority: /],
    ['a secret of its own', { name: 'team-a', key: 'mine' }, 400, /key/]
  ]
  for (const [name, body, status, message] of bad) {
    const r = await admin(a, 'POST', '/admin/api-keys', body)
    t.equal(r.status, status, name)
    t.match(r.body.error, message, name)
  }

  const made = await admin(a, 'POST', '/admin/api-keys', { name: 'team-a', priority: 'high', maxConcurrent: 1 })
  t.equal(made.status, 201)
  const secret: string = made.body.key
  t.match(secret, /^mst_/, 'the secret, answered once')
  t.match(made.body, { name: 'team-a', source: 'table', priority: 'high', maxConcurrent: 1 })
  t.equal((await admin(a, 'POST', '/admin/api-keys', { name: 'team-a' })).status, 409, 'a duplicate name')

  const works = await within(async () => (await generate(b, secret)).status === 200)
  t.ok(works < 1000, `the other replica takes the new key within a second (${works.toFixed(0)} ms)`)
  t.equal((await generate(b, 'mst_not-a-key')).status, 401, 'another secret does not work')

  // maxConcurrent 1: a stream in flight on replica b, a second request on replica a is refused.
  const ollama = new Ollama({ host: b.url, headers: { authorization: `Bearer ${secret}` } })
  const stream = (async () => {
    let last: any
    for await (const part of await ollama.generate({ model: 'llama3', prompt: 'long', stream: true })) last = part
    return last?.done === true
  })()
  await within(async () => (await fleet.heldGpus()).length > 0)
  const second = await generate(a, secret)
  t.equal(second.status, 429, 'over maxConcurrent on the other replica')
  t.ok(second.retryAfter != null, 'with Retry-After')
  t.equal(await stream, true, 'the first one finished')

  for (const gw of [a, b]) {
    const list = await admin(gw, 'GET', '/admin/api-keys')
    t.equal(list.status, 200)
    t.match(list.body, [{ name: 'team-a', source: 'table', priority: 'high', maxConcurrent: 1 }])
    t.notOk(list.text.includes(secret), 'the list never shows the secret')
    t.notOk('key' in list.body[0], 'nor a key field')
  }

  t.equal((await admin(a, 'PATCH', '/admin/api-keys/team-a', {})).status, 400, 'an empty change')
  t.equal((await admin(a, 'PATCH', '/admin/api-keys/nobody', { rpm: 5 })).status, 404)
  const changed = await admin(a, 'PATCH', '/admin/api-keys/team-a', { maxConcurrent: null, rpm: 100 })
  t.equal(changed.status, 200)
  t.same(changed.body, { ...changed.body, name: 'team-a', priority: 'high', rpm: 100 })
  t.notOk('maxConcurrent' in changed.body, 'null removes a limit')

  t.equal((await admin(b, 'DELETE', '/admin/api-keys/team-a')).status, 204, 'revoked through the other replica')
  const stops = await within(async () => (await generate(a, secret)).status === 401)
  t.ok(stops < 1000, `it stops working on the first replica within a second (${stops.toFixed(0)} ms)`)
  t.equal((await generate(b, secret)).status, 401)
  t.equal((await admin(a, 'DELETE', '/admin/api-keys/team-a')).status, 404, 'revoked already')
  t.match((await admin(a, 'GET', '/admin/api-keys')).body, [{ name: 'team-a', revokedAt: /^\d{4}-/ }], 'listed as revoked')

  const metrics = (await (await fetch(`${a.url}/metrics`)).text()) + (await (await fetch(`${b.url}/metrics`)).text())
  t.ok(lines.length > 10, `replica a logged ${lines.length} lines`)
  t.notOk(lines.join('\n').includes(secret), 'the secret is in no log line')
  t.notOk(metrics.includes(secret), 'nor in a metric')
  t.ok(lines.some((l) => l.includes('API key created') && l.includes('team-a')), 'the log names the key')

  // Keys in use but no ADMIN_TOKEN: a key holder may not rewrite the fleet or mint keys.
  await insertKey(fleet.db.query, 'ops', 'ops-secret')
  const open = await fleet.replica({ ADMIN_TOKEN: undefined })
  t.equal((await admin(open, 'GET', '/admin/computers', undefined, null)).status, 401, 'no credentials: 401')
  const withKey = await admin(open, 'POST', '/admin/api-keys', { name: 'escalated' }, 'ops-secret')
  t.equal(withKey.status, 403, 'an API key: 403')
  t.match(withKey.body.error, /ADMIN_TOKEN/)
  t.equal((await generate(open, 'ops-secret')).status, 200, 'the key still works where keys belong')
  t.notOk((await admin(a, 'GET', '/admin/api-keys')).body.some((k: any) => k.name === 'escalated'), 'no key was made')
})

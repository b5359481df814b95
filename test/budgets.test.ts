// Token budgets (CONTRACT 17): a key's tokensPerDay / tokensPerMonth (prompt + output tokens, UTC
// windows), set through the admin API, checked at admission on every replica against counters
// shared in Redis; 429 with Retry-After until the window turns (a clock the test controls), in
// the route's format; a request already running finishes. On a database without migration 008,
// setting a budget is 409 naming it.
import t from 'tap'
import { Ollama } from 'ollama'
import OpenAI from 'openai'
import Anthropic from '@anthropic-ai/sdk'
import { startFleet, type Gateway } from './helpers/gateway.js'
import { createTestDatabase } from './helpers/database.js'
import { eventually } from './helpers/api-keys.js'
import { migrate, MIGRATIONS } from '../services/fleet/migrations.js'
import { readFile, writeFile } from 'node:fs/promises'
import { createHash } from 'node:crypto'
import { startEmbeddedGateway, writeInventoryFile } from './helpers/embedded.js'
import { startSimulator } from './helpers/upstream-simulator.js'
import { buildConsole, startBrowser, textWhenMatching } from './helpers/browser.js'

/** The migration that adds the budget columns (services/fleet/migrations.ts). */
const BUDGET_MIGRATION = '008-api-keys-token-budgets'

const TOKEN = 'budgets-admin'
const SLOW = 'slow:1b'
const FAST = 'fast:1b'
const admin = { authorization: `Bearer ${TOKEN}`, 'content-type': 'application/json' }

type KeyRow = Record<string, unknown>

async function adminCall (gw: Gateway, method: string, path: string, body?: unknown): Promise<{ status: number, body: any }> {
  const res = await fetch(`${gw.url}/admin/${path}`, { method, headers: admin, body: body === undefined ? undefined : JSON.stringify(body) })
  const text = await res.text()
  return { status: res.status, body: text === '' ? null : JSON.parse(text) }
}

async function keyRow (gw: Gateway, name: string): Promise<KeyRow | undefined> {
  const res = await adminCall(gw, 'GET', 'api-keys')
  return (res.body as KeyRow[]).find((k) => k.name === name)
}

t.test('over its tokensPerDay a key is refused on both replicas until the UTC day turns; a running request finishes', async (t) => {
  // The test's clock: 20:00 UTC, four hours before the day turns.
  let now = Date.UTC(2026, 5, 15, 20, 0, 0)
  const clock = (): number => now
  const fleet = await startFleet(t, {
    gpus: [1, 1],
    migrate: true,
    upstreams: [
      // a long answer, slowly: still running when the budget runs out
      { model: SLOW, gpus: [0], simulator: { cost: { prefillMsPerToken: 0.05, decodeMsPerToken: 15, answerTokens: 40 } } },
      { model: FAST, gpus: [1], simulator: { cost: { prefillMsPerToken: 0.05, decodeMsPerToken: 0, answerTokens: 6 } } }
    ],
    options: { ADMIN_TOKEN: TOKEN }
  })
  const [slowSim, fastSim] = fleet.upstreams
  const a = await fleet.replica({ now: clock })
  const b = await fleet.replica({ now: clock })
  const created = await adminCall(a, 'POST', 'api-keys', { name: 'capped', tokensPerDay: 1_000_000 })
  t.equal(created.status, 201)
  t.equal(created.body.tokensPerDay, 1_000_000, 'the budget is a field of the key')
  const secret = created.body.key as string
  const ollamaOn = (gw: Gateway): Ollama => new Ollama({ host: gw.url, headers: { Authorization: `Bearer ${secret}` } })
  const tokensOf = (r: { promptTokens: number, evalCount: number }): number => r.promptTokens + r.evalCount
  const ask = { model: FAST, messages: [{ role: 'user', content: 'Say something short.' }], stream: false as const }

  // One request measures what a fast answer costs; the budget is set to less than two of them.
  await ollamaOn(a).chat(ask)
  const one = tokensOf(fastSim.costs().requests[0])
  t.ok(await eventually(async () => (await keyRow(a, 'capped'))?.usedToday === one, 5000), 'usedToday: the first answer')
  const budget = 2 * one - 1
  t.equal((await adminCall(a, 'PATCH', 'api-keys/capped', { tokensPerDay: budget })).status, 200)
  t.ok(await eventually(async () => (await keyRow(b, 'capped'))?.tokensPerDay === budget, 5000), 'the other replica has the budget')

  // A slow streamed answer starts, within the budget...
  const slow = await ollamaOn(b).chat({ model: SLOW, messages: [{ role: 'user', content: 'Tell me a long story.' }], stream: true })
  const slowParts: Array<{ done: boolean, eval_count?: number }> = []
  const iterator = slow[Symbol.asyncIterator]()
  const first = await iterator.next()
  if (first.done !== true) slowParts.push(first.value)
  // ...and while it runs, a second fast answer on the other replica uses the budget up.
  await ollamaOn(b).chat(ask)
  const used = 2 * one
  t.ok(await eventually(async () => (await keyRow(a, 'capped'))?.usedToday === used, 5000), 'usedToday counts both replicas')

  // Refused on both replicas, in each route's format, with the seconds until the UTC day turns.
  for (const gw of [a, b]) {
    const res = await fetch(`${gw.url}/api/chat`, { method: 'POST', headers: { authorization: `Bearer ${secret}` }, body: JSON.stringify(ask) })
    t.equal(res.status, 429, `Ollama route refused on ${gw.url}`)
    t.equal(res.headers.get('retry-after'), String(4 * 3600), 'Retry-After: until midnight UTC')
    const body = await res.json() as { error: unknown }
    t.match(body.error, /tokensPerDay/, 'an Ollama error naming the budget')
    const openai = new OpenAI({ baseURL: gw.url + '/v1', apiKey: secret, maxRetries: 0 })
    const err = await openai.chat.completions.create({ model: FAST, messages: [{ role: 'user', content: 'hi' }] }).catch((e: unknown) => e)
    t.ok(err instanceof OpenAI.RateLimitError, 'the OpenAI client sees a rate limit')
    t.equal((err as InstanceType<typeof OpenAI.RateLimitError>).headers?.get('retry-after'), String(4 * 3600))
    const anthropic = new Anthropic({ baseURL: gw.url, apiKey: null, authToken: secret, maxRetries: 0 })
    const aerr = await anthropic.messages.create({ model: FAST, max_tokens: 5, messages: [{ role: 'user', content: 'hi' }] }).catch((e: unknown) => e)
    t.ok(aerr instanceof Anthropic.RateLimitError, 'the Anthropic client sees a rate limit')
  }
  t.equal(fastSim.costs().requests.length, 2, 'no refused request reached an upstream')

  // The request in flight when the budget ran out finishes, whole.
  for (let next = await iterator.next(); next.done !== true; next = await iterator.next()) slowParts.push(next.value)
  const last = slowParts[slowParts.length - 1]
  t.equal(last.done, true, 'the running answer ended normally')
  t.equal(last.eval_count, 40, 'with every token')
  const all = used + tokensOf(slowSim.costs().requests[0])
  t.ok(await eventually(async () => (await keyRow(a, 'capped'))?.usedToday === all, 5000), 'its tokens count too, once it ended')
  const row = await keyRow(b, 'capped')
  t.same({ tokensPerDay: row?.tokensPerDay, usedToday: row?.usedToday, usedThisMonth: row?.usedThisMonth }, { tokensPerDay: budget, usedToday: all, usedThisMonth: all },
    'GET /admin/api-keys: the budget and the use beside it')

  // The day turns (the test's clock): served again on both replicas.
  now = Date.UTC(2026, 5, 16, 0, 0, 1)
  for (const gw of [a, b]) {
    const answer = await ollamaOn(gw).chat(ask)
    t.equal(answer.done, true, `served again on ${gw.url} the next day`)
  }
  const today = tokensOf(fastSim.costs().requests[2]) + tokensOf(fastSim.costs().requests[3])
  t.ok(await eventually(async () => (await keyRow(a, 'capped'))?.usedToday === today, 5000), "usedToday: the new day's only")
  t.equal((await keyRow(a, 'capped'))?.usedThisMonth, all + today, 'usedThisMonth: the whole month')

  // A month budget already used up: refused until the first of next month.
  t.equal((await adminCall(a, 'PATCH', 'api-keys/capped', { tokensPerDay: null, tokensPerMonth: all })).status, 200)
  t.ok(await eventually(async () => (await keyRow(b, 'capped'))?.tokensPerMonth === all, 5000), 'the other replica has the month budget')
  const res = await fetch(`${b.url}/api/chat`, { method: 'POST', headers: { authorization: `Bearer ${secret}` }, body: JSON.stringify(ask) })
  t.equal(res.status, 429)
  t.equal(res.headers.get('retry-after'), String((Date.UTC(2026, 6, 1) - now) / 1000), 'Retry-After: until the month turns')
  t.match((await res.json() as { error: string }).error, /tokensPerMonth/)
})

t.test('budgets: bounded like the other limits; 409 naming the migration on a database without it', async (t) => {
  const fleet = await startFleet(t, { gpus: [1], migrate: true, upstreams: [{ model: FAST, gpus: [0] }], options: { ADMIN_TOKEN: TOKEN } })
  const gw = await fleet.replica()
  t.equal((await adminCall(gw, 'POST', 'api-keys', { name: 'zero', tokensPerDay: 0 })).status, 400, 'a budget of 0 is refused')
  t.equal((await adminCall(gw, 'POST', 'api-keys', { name: 'huge', tokensPerMonth: 1e13 })).status, 400, 'past 10^12 is refused')
  t.equal((await adminCall(gw, 'POST', 'api-keys', { name: 'text', tokensPerDay: '5' })).status, 400, 'not a number: refused')

  // A database migrated up to the api_keys table but not to the budget columns.
  const old = await createTestDatabase(t)
  await migrate(old.query, MIGRATIONS.filter((m) => m.name !== BUDGET_MIGRATION))
  const unmigrated = await fleet.replica({ MARIADB_URL: old.url })
  const refused = await adminCall(unmigrated, 'POST', 'api-keys', { name: 'capped', tokensPerDay: 1000 })
  t.equal(refused.status, 409)
  t.match(refused.body.error, BUDGET_MIGRATION, 'the answer names the migration')
  t.equal((await adminCall(unmigrated, 'POST', 'api-keys', { name: 'plain', rpm: 5 })).status, 201, 'a key without a budget is still created')
  t.equal((await adminCall(unmigrated, 'PATCH', 'api-keys/plain', { tokensPerMonth: 5 })).status, 409, 'nor set by a change')
  t.equal((await adminCall(unmigrated, 'PATCH', 'api-keys/plain', { rpm: 6 })).status, 200, 'other changes work')
  await migrate(old.query)
  t.equal((await adminCall(unmigrated, 'PATCH', 'api-keys/plain', { tokensPerMonth: 5 })).status, 200, 'once migrated, the budget is kept')
  t.equal((await keyRow(unmigrated, 'plain'))?.tokensPerMonth, 5)
})

t.test('embedded mode: a budget from the inventory file, counted in memory', async (t) => {
  let now = Date.UTC(2026, 0, 31, 23, 59, 0)
  const sim = await startSimulator({ models: [FAST], cost: { prefillMsPerToken: 0.05, decodeMsPerToken: 0, answerTokens: 6 } })
  t.teardown(() => sim.close())
  const file = await writeInventoryFile(t, [{ name: 'fast-1', model: FAST, port: sim.port, gpus: [1] }])
  const inventory = JSON.parse(await readFile(file, 'utf8')) as Record<string, unknown>
  const secret = 'embedded-budget-secret'
  inventory.apiKeys = [{ name: 'file-key', sha256: createHash('sha256').update(secret).digest('hex'), tokensPerMonth: 1 }]
  await writeFile(file, JSON.stringify(inventory))
  const gw = await startEmbeddedGateway(t, { INVENTORY_FILE: file, ADMIN_TOKEN: TOKEN, now: () => now })
  const ask = { model: FAST, messages: [{ role: 'user', content: 'hi' }], stream: false }
  const chat = async (): Promise<Response> => await fetch(`${gw.url}/api/chat`, { method: 'POST', headers: { authorization: `Bearer ${secret}` }, body: JSON.stringify(ask) })
  t.equal((await chat()).status, 200, 'within its budget')
  t.ok(await eventually(async () => Number((await keyRow(gw, 'file-key'))?.usedThisMonth) > 0, 5000), 'counted in memory')
  const refused = await chat()
  t.equal(refused.status, 429, 'over its month budget')
  t.equal(refused.headers.get('retry-after'), '60', 'until February begins')
  now = Date.UTC(2026, 1, 1)
  t.equal((await chat()).status, 200, 'a new month')
})

t.test("console: the API keys list shows each key's tokens against its budgets", async (t) => {
  // The page's scripts, compiled as `npm run build` does (the gateway reads them when it starts).
  buildConsole()
  const fleet = await startFleet(t, {
    gpus: [1],
    migrate: true,
    upstreams: [{ model: FAST, gpus: [0], simulator: { cost: { prefillMsPerToken: 0.05, decodeMsPerToken: 0, answerTokens: 6 } } }],
    options: { ADMIN_TOKEN: TOKEN }
  })
  const gw = await fleet.replica()
  const created = await adminCall(gw, 'POST', 'api-keys', { name: 'wall', tokensPerDay: 100000, tokensPerMonth: 2500000 })
  await new Ollama({ host: gw.url, headers: { Authorization: `Bearer ${created.body.key as string}` } })
    .chat({ model: FAST, messages: [{ role: 'user', content: 'hello' }], stream: false })
  const used = fleet.upstreams[0].costs().requests.reduce((n, r) => n + r.promptTokens + r.evalCount, 0)
  t.ok(await eventually(async () => (await keyRow(gw, 'wall'))?.usedToday === used, 5000), 'counted')

  const browser = await startBrowser(t)
  const page = await browser.newPage()
  t.teardown(async () => { await page.close() })
  await page.goto(`${gw.url}/ui/`)
  await page.waitForSelector('body[data-ready="true"]', { timeout: 5000 })
  await page.click('#admin-toggle')
  await page.waitForSelector('#token-form:not([hidden])')
  await page.fill('#admin-token', TOKEN)
  await page.click('#token-form button[type="submit"]')
  await page.waitForSelector('#admin:not([hidden])', { timeout: 3000 })
  await page.click('.tab[data-tab="api-keys"]')
  const row = page.locator('.admin-table[data-resource="api-keys"] tr', { hasText: 'wall' })
  const text = await textWhenMatching(row, 'today')
  t.match(text, `${used.toLocaleString('en-US')} / 100,000 today`, 'the day: used against the budget')
  t.match(text, `${used.toLocaleString('en-US')} / 2,500,000 this month`, 'the month: used against the budget')
})

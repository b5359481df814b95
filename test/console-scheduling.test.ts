// Scheduler v3 made visible (CONTRACT 16): GET /admin/scheduling says, per LLM server, what it
// holds warm — its loaded models, the conversations cached there, its affinity hit rate — in both
// stores of the affinity map; and the console's Servers table shows it, in Debian's Chromium
// driven by playwright-core, after a real conversation through the gateway (the ollama client,
// simulated upstreams, MariaDB and Redis).
import t from 'tap'
import { execFileSync } from 'node:child_process'
import { mkdirSync } from 'node:fs'
import { createRequire } from 'node:module'
import { join } from 'node:path'
import { Ollama, type Message } from 'ollama'
import { startFleet, type Gateway } from './helpers/gateway.js'
import { startBrowser, textWhenMatching } from './helpers/browser.js'
import { packageRoot } from '../services/config/package-root.js'

const ARTIFACTS = join(packageRoot, 'test', 'artifacts')
const TOKEN = 'scheduling-view-token'

interface ServerWarmth { id: string, name: string, models: string[], conversations: number, requests: number, hits: number, hitRate: number | null }

/** Three turns of one conversation through the gateway: each resends the last one's messages and answer. */
async function converse (gw: Gateway, model: string, opening: string): Promise<void> {
  const ollama = new Ollama({ host: gw.url })
  const messages: Message[] = [{ role: 'system', content: 'You are a careful assistant.' }]
  for (const ask of [opening, 'and then?', 'why so?']) {
    messages.push({ role: 'user', content: ask })
    const answer = await ollama.chat({ model, messages })
    messages.push(answer.message)
  }
}

async function scheduling (gw: Gateway, token?: string): Promise<{ status: number, body: { affinity: boolean, servers: ServerWarmth[] } }> {
  const res = await fetch(`${gw.url}/admin/scheduling`, { headers: token !== undefined ? { authorization: `Bearer ${token}` } : {} })
  return { status: res.status, body: await res.json() as { affinity: boolean, servers: ServerWarmth[] } }
}

for (const store of ['redis', 'memory'] as const) {
  t.test(`${store}: GET /admin/scheduling counts each server's cached conversations and affinity hits`, async (t) => {
    const fleet = await startFleet(t, {
      gpus: [1, 1],
      upstreams: [{ model: 'm', gpus: [0], name: 'm-1' }, { model: 'm', gpus: [1], name: 'm-2' }],
      options: { ADMIN_TOKEN: TOKEN, ...(store === 'memory' ? { LEASE_STORE: 'memory' } : {}) }
    })
    const gw = await fleet.replica()
    t.equal((await scheduling(gw)).status, 401, 'an admin route')
    const before = await scheduling(gw, TOKEN)
    t.same(before.body.servers.map((s) => [s.name, s.conversations, s.requests, s.hitRate]), [['m-1', 0, 0, null], ['m-2', 0, 0, null]], 'nothing cached before any request')

    await converse(gw, 'm', 'tell me about tides')
    const after = (await scheduling(gw, TOKEN)).body
    t.equal(after.affinity, true, 'affinity is on')
    const served = after.servers.find((s) => s.requests > 0)
    t.ok(served !== undefined, 'a server was leased for the conversation')
    t.same(served && { requests: served.requests, hits: served.hits, conversations: served.conversations, models: served.models },
      { requests: 3, hits: 2, conversations: 1, models: ['m'] },
      'its three turns on one server: the second and third sent there by the map, one conversation cached, the model warm')
    t.equal(after.servers.filter((s) => s !== served).reduce((n, s) => n + s.conversations + s.requests, 0), 0, 'nothing on the other server')

    // a second conversation: two cached, whichever servers they went to
    await converse(gw, 'm', 'tell me about winds')
    const both = (await scheduling(gw, TOKEN)).body.servers
    t.equal(both.reduce((n, s) => n + s.conversations, 0), 2, 'two conversations cached in all')
    // (its first turn may be one too: the map holds the system prompt both share)
    t.ok(both.reduce((n, s) => n + s.hits, 0) >= 4, 'each one\'s later turns were hits')
    t.equal(both.reduce((n, s) => n + s.requests, 0), 6, 'six turns counted')
  })
}

t.test('the console\'s Servers table shows what each server holds warm, after a conversation', async (t) => {
  const tsc = createRequire(import.meta.url).resolve('typescript/bin/tsc')
  execFileSync(process.execPath, [tsc, '-p', join(packageRoot, 'tsconfig.ui.json')], { stdio: 'inherit' })
  mkdirSync(ARTIFACTS, { recursive: true })
  const browser = await startBrowser(t)
  const fleet = await startFleet(t, {
    gpus: [1, 1],
    upstreams: [{ model: 'qwq', gpus: [0], name: 'qwq-1' }, { model: 'qwq', gpus: [1], name: 'qwq-2' }],
    options: { ADMIN_TOKEN: TOKEN }
  })
  const gw = await fleet.replica()
  const page = await browser.newPage()
  t.teardown(async () => { await page.close() })
  const errors: string[] = []
  page.on('pageerror', (err) => errors.push(err.message))
  await page.goto(`${gw.url}/ui/`)
  await page.waitForSelector('body[data-ready="true"]', { timeout: 5000 })
  const row = (name: string) => page.locator('#assignment-rows tr').filter({ has: page.locator('.a-name', { hasText: new RegExp(`^${name}$`) }) })
  t.equal(await textWhenMatching(row('qwq-1').locator('.a-conversations'), '—'), '—', 'without the token: nothing to show')
  t.equal(await row('qwq-1').locator('.a-conversations').getAttribute('title'), 'shown with the admin token', 'and says why')

  await page.click('#admin-toggle')
  await page.fill('#admin-token', TOKEN)
  await page.click('#token-form button[type="submit"]')
  await page.waitForSelector('#admin:not([hidden])', { timeout: 3000 })
  t.equal(await textWhenMatching(row('qwq-1').locator('.a-conversations'), /^0$/), '0', 'with it: no conversation cached yet')

  await converse(gw, 'qwq', 'tell me about tides')
  const { body } = await scheduling(gw, TOKEN)
  const served = body.servers.find((s) => s.requests > 0) as ServerWarmth
  t.ok(served !== undefined, 'one server served the conversation')
  // The page reads again soon after the feed shows the server's slots change, else every 5 s.
  const conversations = await textWhenMatching(row(served.name).locator('.a-conversations'), /^1$/, 10_000)
  t.equal(conversations, '1', `${served.name} shows the conversation cached there`)
  t.equal(await textWhenMatching(row(served.name).locator('.a-hits'), /^67 %$/, 10_000), '67 %', 'and its affinity hit rate: 2 of 3 turns')
  t.match(await row(served.name).locator('.a-hits').getAttribute('title'), /2 of 3 requests/, 'its title says of how many')
  t.equal(await textWhenMatching(row(served.name).locator('.a-loaded'), 'qwq'), 'qwq', 'the model it serves warm')
  await page.screenshot({ path: join(ARTIFACTS, 'console-scheduling.png'), fullPage: true })
  t.same(errors, [], 'no script errors')
})

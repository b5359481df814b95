// The operator console (CONTRACT 13) in a real browser: Debian's Chromium driven by playwright-core,
// against two replicas on real MariaDB and Redis with simulated upstreams.
import t from 'tap'
import { mkdirSync } from 'node:fs'
import { join } from 'node:path'
import { startFleet, type Gateway } from './helpers/gateway.js'
import { buildConsole, startBrowser, textWhenMatching } from './helpers/browser.js'
import type { Page } from 'playwright-core'
import { startSimulator } from './helpers/upstream-simulator.js'
import { packageRoot } from '../services/config/package-root.js'

const ARTIFACTS = join(packageRoot, 'test', 'artifacts')

// The page's scripts, compiled as `npm run build` does (the gateway reads them when it starts).
buildConsole()
mkdirSync(ARTIFACTS, { recursive: true })
// One browser for the file (starting Chromium is the slow part); each test opens its own tab.
const browser = await startBrowser(t)

async function post (gw: Gateway, path: string, body: unknown): Promise<{ status: number, body: any }> {
  const res = await fetch(gw.url + path, { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify(body) })
  return { status: res.status, body: await res.json() }
}

const generate = async (gw: Gateway, model: string): Promise<Response> =>
  await fetch(`${gw.url}/api/generate`, { method: 'POST', body: JSON.stringify({ model, prompt: 'x', stream: false }) })

t.test('the console shows the fleet and follows the other replica live', async (t) => {
  const fleet = await startFleet(t, {
    gpus: [1, 1, 1],
    upstreams: [{ model: 'qwq', gpus: [0] }, { model: 'llama3', gpus: [1, 2] }]
  })
  const [one, two] = [await fleet.replica(), await fleet.replica()]
  const page = await browser.newPage()
  t.teardown(async () => { await page.close() })
  const errors: string[] = []
  const foreign: string[] = []
  page.on('pageerror', (err) => errors.push(err.message))
  page.on('console', (msg) => { if (msg.type() === 'error') errors.push(msg.text()) })
  const origin = new URL(one.url).origin
  page.on('request', (request) => {
    const url = new URL(request.url())
    if (url.protocol !== 'data:' && url.origin !== origin) foreign.push(request.url())
  })

  const response = await page.goto(`${one.url}/ui/`)
  t.equal(response?.status(), 200)
  await page.waitForSelector('body[data-ready="true"]', { timeout: 5000 })

  // every GPU, by name, on its computer
  for (const [i, id] of fleet.gpuIds.entries()) {
    t.equal(await page.locator(`[data-gpu="${id}"] .gpu-name`).textContent(), `GPU ${id}`, `GPU ${i + 1} named`)
    t.equal(await page.locator(`[data-gpu="${id}"] .gpu-state`).textContent(), 'idle')
  }
  t.equal(await page.locator('.computer-name').allTextContents().then((n) => n.join()), 'box')
  t.same((await page.locator('#assignment-rows .a-name').allTextContents()).sort(), ['llama3-2', 'qwq-1'])
  t.equal(await page.locator('#replica-count').textContent(), '2 replicas alive')

  const gpu = `[data-gpu="${fleet.gpuIds[0]}"]`
  const isState = (state: string) => async (): Promise<number> => {
    const started = performance.now()
    await page.waitForSelector(`${gpu}.state-${state}`, { timeout: 1000 })
    return performance.now() - started
  }

  // a lease taken on the other replica
  const leasing = performance.now()
  const reserved = await post(two, '/gpu/reserve', { outputType: 'text', model: 'qwq' })
  t.equal(reserved.status, 200)
  await isState('leased')()
  const shownMs = performance.now() - leasing
  t.ok(shownMs < 1000, `lease on the other replica shown after ${shownMs.toFixed(0)} ms`)
  t.equal(await page.locator(`${gpu} .gpu-state`).textContent(), 'leased')
  t.match(await page.locator(`${gpu} .gpu-detail`).textContent(), /qwq · on qwq-1 · reserved/)
  t.match(await page.locator(`${gpu} .gpu-slots`).textContent(), 'slots 1/1')

  // three requests wait behind it: a queue of three
  const waiting = [generate(two, 'qwq'), generate(one, 'qwq'), generate(two, 'qwq')]
  await page.waitForFunction(() => document.querySelector('#queue-rows tr[data-key="llm:qwq"] .queue-depth')?.textContent === '3', undefined, { timeout: 3000 })
  t.equal(await page.locator('#queue-rows tr[data-key="llm:qwq"] .queue-model').textContent(), 'qwq')
  // the oldest wait, counted by the page from the first waiter's arrival
  const oldest = page.locator('#queue-rows tr[data-key="llm:qwq"] .queue-oldest')
  t.ok(Math.abs(Number(await oldest.getAttribute('data-since')) - Date.now()) < 5000, 'the oldest waiter\'s arrival')
  t.match(await oldest.textContent(), /^\d+ s$/, 'shown as a wait, not "—"')
  t.ok(await page.locator('#queues-empty').isHidden(), 'no "nobody waiting" while three wait')
  await page.screenshot({ path: join(ARTIFACTS, 'console.png'), fullPage: true })

  // its end, on the other replica
  const releasing = performance.now()
  t.equal((await post(two, '/gpu/release', { leaseId: reserved.body.leaseId })).status, 200)
  for (const res of await Promise.all(waiting)) t.equal(res.status, 200)
  await isState('idle')()
  const endMs = performance.now() - releasing
  t.ok(endMs < 1000, `release and the three requests shown ended after ${endMs.toFixed(0)} ms`)
  await page.waitForSelector('#queues-empty:not([hidden])', { timeout: 1000 })
  await page.waitForFunction(() => document.querySelectorAll('#recent-rows tr').length >= 3, undefined, { timeout: 2000 })
  const models = await page.locator('#recent-rows .r-model').allTextContents()
  t.same(models.slice(0, 3), ['qwq', 'qwq', 'qwq'], 'the last requests, newest first')
  t.same((await page.locator('#recent-rows .r-status').allTextContents()).slice(0, 3), ['200', '200', '200'])

  // the page updates in place: the GPU's element is the one that was there at load
  t.equal(await page.locator(gpu).evaluate((node) => (node as HTMLElement & { marked?: boolean }).marked), undefined)
  await page.locator(gpu).evaluate((node) => { (node as HTMLElement & { marked?: boolean }).marked = true })
  const again = await post(one, '/gpu/reserve', { outputType: 'text', model: 'qwq' })
  await isState('leased')()
  t.equal(await page.locator(gpu).evaluate((node) => (node as HTMLElement & { marked?: boolean }).marked), true, 'same element, changed in place (no redraw)')
  await post(one, '/gpu/release', { leaseId: again.body.leaseId })
  await isState('idle')()

  t.same(errors, [], 'no page errors')
  t.same(foreign, [], 'no request to any other host')
})

t.test('on a phone, and under a prefix', async (t) => {
  const fleet = await startFleet(t, { gpus: [1, 1], upstreams: [{ model: 'qwq', gpus: [0, 1] }] })
  // The gateway embedded in a host app under /maestro: every URL the page uses is relative.
  const Fastify = (await import('fastify')).default
  const maestro = (await import('../app.js')).default
  const host = Fastify({ logger: false, forceCloseConnections: true })
  await host.register(maestro, { prefix: '/maestro', dotenv: false, ...fleet.options })
  await host.listen({ port: 0, host: '127.0.0.1' })
  t.teardown(async () => { await host.close() })
  const address = host.server.address()
  const base = `http://127.0.0.1:${typeof address === 'object' && address != null ? address.port : 0}/maestro`

  const page = await browser.newPage()
  t.teardown(async () => { await page.close() })
  await page.setViewportSize({ width: 390, height: 844 })
  const errors: string[] = []
  page.on('pageerror', (err) => errors.push(err.message))
  const paths: string[] = []
  page.on('request', (request) => { const u = new URL(request.url()); if (u.protocol !== 'data:') paths.push(u.pathname) })
  await page.goto(`${base}/ui`)
  await page.waitForSelector('body[data-ready="true"]', { timeout: 5000 })
  t.equal(new URL(page.url()).pathname, '/maestro/ui/', '/ui leads to /ui/ under the prefix')
  t.ok(paths.every((p) => p.startsWith('/maestro/')), `every request under the prefix: ${paths.join(' ')}`)
  t.ok(paths.includes('/maestro/gpu/events'))
  t.equal(await page.locator('.gpu').count(), 2)
  // a request, then a reservation, so the phone shows rows of every kind
  const served = await fetch(`${base}/api/generate`, { method: 'POST', body: JSON.stringify({ model: 'qwq', prompt: 'x', stream: false }) })
  t.equal(served.status, 200)
  const reserved = await fetch(`${base}/gpu/reserve`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify({ outputType: 'text', model: 'qwq' }) })
  t.equal(reserved.status, 200)
  await page.waitForSelector('.gpu.state-leased', { timeout: 1000 })
  await page.waitForFunction(() => document.querySelectorAll('#recent-rows tr').length === 1, undefined, { timeout: 2000 })
  const width = await page.evaluate(() => document.documentElement.scrollWidth)
  t.ok(width <= 390, `nothing wider than the phone (${width} px)`)
  await page.screenshot({ path: join(ARTIFACTS, 'console-phone.png'), fullPage: true })
  t.same(errors, [])
})

/** What the editing panel says after `action` (its status line, emptied first). */
async function outcome (page: Page, action: () => Promise<unknown>): Promise<string> {
  await page.evaluate(() => { const m = document.querySelector('.admin-message'); if (m != null) m.textContent = '' })
  await action()
  await page.waitForFunction(() => (document.querySelector('.admin-message')?.textContent ?? '') !== '', undefined, { timeout: 3000 })
  return await page.locator('.admin-message').textContent() ?? ''
}

/**
 * Records, in the page, what the `resource` list's row for `name` says at the moment the editing
 * panel announces an outcome (an observer runs before anything else can redraw the list); the
 * answer is null while nothing was announced, '' when the row was not there.
 */
async function rowAtAnnouncement (page: Page, resource: string, name: string): Promise<() => Promise<string | null>> {
  await page.evaluate(([resource, name]) => {
    const box = document.querySelector('.admin-message')
    const seen = window as unknown as { rowAtAnnouncement?: string }
    delete seen.rowAtAnnouncement
    if (box == null) return
    new MutationObserver((_records, observer) => {
      if ((box.textContent ?? '') === '') return
      const rows = Array.from(document.querySelectorAll(`.admin-table[data-resource="${resource}"] tbody tr`))
      seen.rowAtAnnouncement = rows.find((tr) => tr.textContent?.includes(name) === true)?.textContent ?? ''
      observer.disconnect()
    }).observe(box, { childList: true, characterData: true, subtree: true })
  }, [resource, name])
  return async () => await page.evaluate(() => (window as unknown as { rowAtAnnouncement?: string }).rowAtAnnouncement ?? null)
}

t.test('with a token, the console adds a model and a server that a request then reaches, removes it, and makes and revokes an API key', async (t) => {
  const token = 'console-test-token'
  const fleet = await startFleet(t, { gpus: [1, 1], upstreams: [{ model: 'qwq', gpus: [0] }], migrate: true, options: { ADMIN_TOKEN: token } })
  const [one, two] = [await fleet.replica(), await fleet.replica()]
  // the server the operator is about to add, already running on the second GPU
  const mistral = await startSimulator({ gpuIds: [fleet.gpuIds[1]], recorder: fleet.recorder, models: ['mistral'] })
  t.teardown(() => mistral.close())

  const page = await browser.newPage()
  t.teardown(async () => { await page.close() })
  const errors: string[] = []
  page.on('pageerror', (err) => errors.push(err.message))
  await page.goto(`${one.url}/ui/`)
  await page.waitForSelector('body[data-ready="true"]', { timeout: 5000 })

  // nothing is offered before the token
  await page.click('#admin-toggle')
  await page.waitForSelector('#token-form:not([hidden])')
  t.ok(await page.locator('#admin').isHidden(), 'no editing before the token')
  await page.fill('#admin-token', 'wrong')
  await page.click('#token-form button[type="submit"]')
  await page.waitForFunction(() => document.querySelector('.token-message')?.textContent === 'That token was refused.', undefined, { timeout: 3000 })
  await page.fill('#admin-token', token)
  await page.click('#token-form button[type="submit"]')
  await page.waitForSelector('#admin:not([hidden])', { timeout: 3000 })
  t.equal(await page.evaluate(() => sessionStorage.getItem('maestro-admin-token')), token, 'kept in the tab\'s session')
  t.equal(await page.evaluate(() => localStorage.length), 0, 'and nowhere else')

  // a model, then a server for it, through the forms
  await page.click('.tab[data-tab="models"]')
  await page.click('[data-pane="models"] .add')
  await page.fill('#f-models-name', 'mistral')
  await page.selectOption('#f-models-kind', 'llm')
  const modelRow = await rowAtAnnouncement(page, 'models', 'mistral')
  t.equal(await outcome(page, async () => await page.click('.admin-form button[type="submit"]')), 'model added')
  t.match(await modelRow(), /mistral/, 'announced once the list shows the new model')

  await page.click('.tab[data-tab="assignments"]')
  await page.click('[data-pane="assignments"] .add')
  await page.fill('#f-assignments-name', 'mistral-1')
  await page.fill('#f-assignments-model', 'mistral')
  await page.fill('#f-assignments-port', String(mistral.port))
  await page.selectOption('#f-assignments-gpuIds', [fleet.gpuIds[1]])
  t.equal(await outcome(page, async () => await page.click('.admin-form button[type="submit"]')), 'server added')

  // the live view shows it, and a request through the other replica reaches it
  await page.waitForSelector('#assignment-rows tr:has(.a-name:text-is("mistral-1"))', { timeout: 2000 })
  let answer: Response | undefined
  const deadline = performance.now() + 2000
  while (performance.now() < deadline) {
    answer = await generate(two, 'mistral')
    if (answer.status === 200) break
    await new Promise((resolve) => setTimeout(resolve, 50))
  }
  t.equal(answer?.status, 200, 'the other replica serves the new server')
  t.ok(mistral.requests.some((r) => r.path === '/api/generate'), 'the request reached it')
  await page.waitForFunction(() => document.querySelector('#recent-rows .r-model')?.textContent === 'mistral', undefined, { timeout: 2000 })

  // drain it, then remove it: a destructive action asks first
  const row = page.locator('.admin-table[data-resource="assignments"] tr', { hasText: 'mistral-1' })
  t.equal(await outcome(page, async () => await row.locator('button', { hasText: 'Drain' }).click()), 'Drain: mistral-1 done')
  await page.waitForSelector('#assignment-rows tr:has(.a-name:text-is("mistral-1")) .health-drained', { timeout: 2000 })
  await row.locator('button', { hasText: 'Remove' }).click()
  await page.waitForSelector('#confirm[open]')
  await page.click('#confirm button[value="no"]')
  t.equal(await row.count(), 1, 'cancelled: still there')
  await row.locator('button', { hasText: 'Remove' }).click()
  await page.click('#confirm button[value="yes"]')
  await page.waitForSelector('#assignment-rows tr:has(.a-name:text-is("mistral-1"))', { state: 'detached', timeout: 2000 })
  t.equal((await generate(one, 'mistral')).status, 404, 'gone')

  // an API key: its secret shown once, copyable; it works on the other replica and names the client
  await page.click('.tab[data-tab="api-keys"]')
  await page.click('[data-pane="api-keys"] .add')
  await page.fill('#f-api-keys-name', 'wall-test')
  await page.fill('#f-api-keys-maxConcurrent', '2')
  t.equal(await outcome(page, async () => await page.click('.admin-form button[type="submit"]')), 'API key added')
  const secret = await page.locator('.admin-secret .secret').textContent() ?? ''
  t.ok(secret.length >= 16, 'the new secret is shown')
  t.ok(await page.locator('.admin-secret .copy').isVisible(), 'with a copy button')
  await page.screenshot({ path: join(ARTIFACTS, 'console-admin.png'), fullPage: true })
  t.notOk((await page.locator('.admin-table[data-resource="api-keys"]').textContent())?.includes(secret), 'the list never shows it')
  let keyed: Response | undefined
  for (const until = performance.now() + 2000; performance.now() < until;) {
    keyed = await fetch(`${two.url}/api/generate`, { method: 'POST', headers: { authorization: `Bearer ${secret}` }, body: JSON.stringify({ model: 'qwq', prompt: 'x', stream: false }) })
    if (keyed.status === 200) break
    await new Promise((resolve) => setTimeout(resolve, 50))
  }
  t.equal(keyed?.status, 200, 'the key works on the other replica')
  await page.waitForFunction(() => document.querySelector('#recent-rows .r-client')?.textContent === 'wall-test', undefined, { timeout: 2000 })
  await page.click('.admin-secret .dismiss')
  t.equal(await page.locator('.admin-secret').textContent(), '', 'dismissed: the secret is gone from the page')
  const keyRow = page.locator('.admin-table[data-resource="api-keys"] tr', { hasText: 'wall-test' })
  await keyRow.locator('button', { hasText: 'Revoke' }).click()
  const revokedRow = await rowAtAnnouncement(page, 'api-keys', 'wall-test')
  t.equal(await outcome(page, async () => await page.click('#confirm button[value="yes"]')), 'API key wall-test revoked')
  t.match(await revokedRow(), /revoked/, 'announced once the list shows the key revoked')
  t.match(await textWhenMatching(keyRow, /revoked/), /revoked/, 'listed as revoked')
  t.equal(await keyRow.locator('button').count(), 0, 'and past changing')
  let revoked = 200
  for (const until = performance.now() + 2000; performance.now() < until && revoked !== 401;) {
    revoked = (await fetch(`${two.url}/api/generate`, { method: 'POST', headers: { authorization: `Bearer ${secret}` }, body: JSON.stringify({ model: 'qwq', prompt: 'x', stream: false }) })).status
  }
  t.equal(revoked, 401, 'revoked: refused')
  t.same(errors, [], 'no page errors')
})

// The console's Usage view (CONTRACT 17) in a real browser: Debian's Chromium driven by
// playwright-core, against two replicas on real MariaDB and Redis. The token counts go into the
// fleet's usage ledger in Redis through `record` (what the capture from answers calls), the
// GPU busy share comes from a reservation made on the other replica (the shared lease store), a
// key's budget from the admin API. The charts are checked by what uPlot shows: its legend's labels
// and values, its canvas; a screenshot is kept in test/artifacts/.
import t from 'tap'
import { mkdirSync } from 'node:fs'
import { join } from 'node:path'
import type { Locator, Page } from 'playwright-core'
import { setTimeout as sleep } from 'node:timers/promises'
import { Redis } from 'ioredis'
import { startFleet } from './helpers/gateway.js'
import { REDIS_URL } from './helpers/redis.js'
import { buildConsole, startBrowser, textWhenMatching } from './helpers/browser.js'
import { packageRoot } from '../services/config/package-root.js'
import { RedisUsageLedger } from '../services/usage/redis-usage-ledger.js'

const ARTIFACTS = join(packageRoot, 'test', 'artifacts')
const HOUR_MS = 3_600_000
// The view reads again every 10 s: a change shows within one refresh.
const REFRESHED_MS = 15_000

buildConsole()
mkdirSync(ARTIFACTS, { recursive: true })
const browser = await startBrowser(t)

/** A chart's legend row for `label`, and its value cell. */
const legendValue = (page: Page, panel: string, label: string): Locator =>
  page.locator(`#${panel} .u-legend tr.u-series`).filter({ has: page.locator('.u-label', { hasText: new RegExp(`^${label}$`) }) }).locator('.u-value')
const digits = (text: string | null): number => Number((text ?? '').replace(/[^0-9]/g, ''))
/** A number as the page writes it (grouped the browser's way): any separators between the digits. */
const shown = (n: number): RegExp => new RegExp(`^${String(n).split('').join('[^0-9]?')}$`)

t.test('the Usage view charts tokens per hour, GPU busy share and key budgets, and follows new data', async (t) => {
  const token = 'usage-test-token'
  const fleet = await startFleet(t, {
    gpus: [1, 1],
    upstreams: [{ model: 'qwq', gpus: [0] }, { model: 'llama3', gpus: [1] }],
    migrate: true,
    options: { ADMIN_TOKEN: token }
  })
  const [one, two] = [await fleet.replica(), await fleet.replica()]
  const admin = { authorization: `Bearer ${token}`, 'content-type': 'application/json' }

  // a key with budgets, and what it and others used: this hour, three hours ago, ten days ago
  const created = await fetch(`${one.url}/admin/api-keys`, { method: 'POST', headers: admin, body: JSON.stringify({ name: 'team-a', tokensPerDay: 10000, tokensPerMonth: 200000 }) })
  t.equal(created.status, 201, 'a key with budgets')
  // The fleet's usage ledger in Redis, as a replica's capture records into it (the gateway's own
  // instance lives in its encapsulated plugin context).
  const redis = new Redis(REDIS_URL)
  t.teardown(() => { redis.disconnect() })
  const ledger = new RedisUsageLedger({ client: redis, prefix: fleet.prefix })
  // The hour bars are read by position from the right: start clear of an hour's turn, so "this
  // hour" and "three hours ago" are still the same bars when the assertions read them.
  const toNextHour = HOUR_MS - Date.now() % HOUR_MS
  if (toNextHour < 40_000) await sleep(toNextHour + 1000)
  const now = Date.now()
  const record = async (client: string, model: string, promptTokens: number, outputTokens: number, at = Date.now()): Promise<void> => {
    // team-a is an API key: its tokens count against its budgets too
    await ledger.record({ client, budgetKey: client === 'team-a' ? client : undefined, model, assignment: `${model}-${model === 'qwq' ? 1 : 2}`, requests: 1, promptTokens, outputTokens, at })
  }
  await record('team-a', 'qwq', 1200, 300)
  await record('team-b', 'llama3', 500, 250)
  await record('team-b', 'qwq', 2000, 1000, now - 3 * HOUR_MS)
  await record('team-b', 'llama3', 40000, 2000, now - 10 * 24 * HOUR_MS)

  const page = await browser.newPage()
  t.teardown(async () => { await page.close() })
  const errors: string[] = []
  page.on('pageerror', (err) => errors.push(err.message))
  page.on('console', (msg) => { if (msg.type() === 'error') errors.push(msg.text()) })
  const origin = new URL(one.url).origin
  const foreign: string[] = []
  page.on('request', (request) => {
    const url = new URL(request.url())
    if (url.protocol !== 'data:' && url.origin !== origin) foreign.push(request.url())
  })
  // the token as the page keeps it once typed in (the console test types it)
  await page.addInitScript((value) => { sessionStorage.setItem('maestro-admin-token', value) }, token)
  await page.goto(`${one.url}/ui/#usage`)
  await page.waitForSelector('#usage:not([hidden]) #usage-clients .uplot', { timeout: 10_000 })
  t.equal(await page.locator('.views [data-view="usage"]').getAttribute('aria-selected'), 'true', 'the header\'s Usage tab is the one open')
  t.ok(await page.locator('main.layout').isHidden(), 'the fleet is behind its own tab')

  // tokens per hour by client: a stacked bar series per client, the legend's values the window's totals
  const clients = await page.locator('#usage-clients .u-legend tr.u-series .u-label').allTextContents()
  t.same(clients, ['Time', 'team-b', 'team-a'], 'the largest first (the ten-day-old hour is outside the 24 h)')
  t.equal(digits(await legendValue(page, 'usage-clients', 'team-a').textContent()), 1500)
  t.equal(digits(await legendValue(page, 'usage-clients', 'team-b').textContent()), 3750)
  t.equal(digits(await legendValue(page, 'usage-models', 'qwq').textContent()), 4500)
  t.equal(digits(await legendValue(page, 'usage-models', 'llama3').textContent()), 750)
  const canvas = await page.locator('#usage-clients .uplot canvas').boundingBox()
  t.ok(canvas != null && canvas.width > 300 && canvas.height > 150, `the chart is drawn (${canvas?.width} × ${canvas?.height})`)
  // under the cursor, the hour's own value: the bar three hours ago is team-b's 3000 alone
  const box = await page.locator('#usage-clients .u-over').boundingBox()
  if (box == null) throw new Error('no plotting area')
  const hoverAt = async (fromRight: number): Promise<void> => {
    await page.mouse.move(box.x + box.width * (1 - (fromRight + 0.5) / 24), box.y + box.height - 3)
  }
  await hoverAt(3)
  t.equal(await textWhenMatching(legendValue(page, 'usage-clients', 'team-b'), shown(3000)).then(digits), 3000, 'hovering the bar of three hours ago')
  t.equal(digits(await legendValue(page, 'usage-clients', 'team-a').textContent()), 0)
  await page.mouse.move(1, 1)

  // the key's budget: a bar for the day and one for the month
  const budget = page.locator('[data-budget="team-a"]')
  t.match(await textWhenMatching(budget.locator('[data-window="today"] .budget-used'), /of/), /^1.?500 of 10.?000 \(15%\)$/)
  t.match(await budget.locator('[data-window="this month"] .budget-used').textContent(), /^1.?500 of 200.?000 \(1%\)$/)
  t.equal(await page.locator('#usage-budgets [data-budget]').count(), 1, 'keys without a budget get no bar')

  // the GPU timeline: a row per GPU, nothing busy yet
  const gpuRows = await page.locator('#usage-gpus .u-legend tr.u-series .u-label').allTextContents()
  t.same(gpuRows, ['Minute', ...fleet.gpuIds.map((id) => `GPU ${id}`)])
  const [firstGpu, secondGpu] = fleet.gpuIds.map((id) => legendValue(page, 'usage-gpus', `GPU ${id}`))
  t.match(await firstGpu.textContent(), /^(0%|unknown)$/, 'idle (or not read yet)')

  // more arrives: a reservation of the first GPU on the other replica, more tokens for team-a
  const reserved = await fetch(`${two.url}/gpu/reserve`, { method: 'POST', headers: admin, body: JSON.stringify({ outputType: 'text', model: 'qwq' }) })
  t.equal(reserved.status, 200)
  await record('team-a', 'qwq', 2000, 500)
  const busy = await textWhenMatching(firstGpu, /^[1-9]\d*%$/, REFRESHED_MS)
  t.match(busy, /^[1-9]\d*%$/, `the reserved GPU shows busy: ${busy}`)
  t.equal(await secondGpu.textContent(), '0%', 'the other one stays idle')
  t.match(await page.locator('#usage-gpus .chart-summary').textContent(), `busiest: GPU ${fleet.gpuIds[0]}`)
  t.equal(await textWhenMatching(legendValue(page, 'usage-clients', 'team-a'), shown(4000), REFRESHED_MS).then(digits), 4000, 'the client chart follows')
  t.equal(digits(await legendValue(page, 'usage-models', 'qwq').textContent()), 7000, 'and the model chart')
  t.match(await textWhenMatching(budget.locator('[data-window="today"] .budget-used'), /^4.?000/, REFRESHED_MS), /^4.?000 of 10.?000 \(40%\)$/, 'and the budget')
  t.same(await page.locator('#usage-clients .u-legend tr.u-series .u-label').allTextContents(), ['Time', 'team-a', 'team-b'], 'team-a now first')

  await page.screenshot({ path: join(ARTIFACTS, 'console-usage.png'), fullPage: true })

  // the last 30 days: the ten-day-old hour counts
  await page.click('#usage [data-window-choice="month"]')
  t.equal(await textWhenMatching(legendValue(page, 'usage-clients', 'team-b'), shown(45750)).then(digits), 45750, '30 days take in the old hour')
  t.equal(await page.locator('#usage [data-window-choice="month"]').getAttribute('aria-pressed'), 'true')
  t.equal(await page.locator('#usage-clients .window-words').textContent(), 'last 30 days')
  await page.screenshot({ path: join(ARTIFACTS, 'console-usage-30-days.png') })
  // on a phone the charts take the screen's width
  await page.setViewportSize({ width: 390, height: 844 })
  await page.waitForFunction(() => (document.querySelector('#usage-clients .uplot')?.getBoundingClientRect().width ?? 999) <= 390, undefined, { timeout: 3000 })
  await page.screenshot({ path: join(ARTIFACTS, 'console-usage-phone.png'), fullPage: true })
  await page.setViewportSize({ width: 1400, height: 900 })

  // back to the fleet
  await page.click('.views [data-view="fleet"]')
  t.ok(await page.locator('main.layout').isVisible(), 'the fleet tab shows the fleet')
  t.ok(await page.locator('#usage').isHidden())

  t.same(errors, [], 'no script errors')
  t.same(foreign, [], 'nothing asked of any other host')
})

t.test('without the token the view says what it needs, and uPlot is served from the package', async (t) => {
  const fleet = await startFleet(t, { gpus: [1], upstreams: [{ model: 'qwq', gpus: [0] }], options: { ADMIN_TOKEN: 'other-token' } })
  const gw = await fleet.replica()
  const lib = await fetch(`${gw.url}/ui/uPlot.esm.js`)
  t.equal(lib.status, 200)
  t.match(lib.headers.get('content-type'), /^text\/javascript/)
  t.match(await lib.text(), /export \{ uPlot as default \}|export default uPlot/)
  t.equal((await fetch(`${gw.url}/ui/uPlot.min.css`)).status, 200)

  const page = await browser.newPage()
  t.teardown(async () => { await page.close() })
  await page.goto(`${gw.url}/ui/`)
  await page.click('.views [data-view="usage"]')
  const note = page.locator('#usage-clients .chart-note')
  t.match(await textWhenMatching(note, /admin token/), /needs the admin token/)
  t.ok(await page.locator('#usage-clients .uplot').count() === 0, 'no chart without data')
  t.equal(new URL(page.url()).hash, '#usage', 'the address names the view')
})

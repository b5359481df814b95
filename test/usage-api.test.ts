// GET /admin/usage (CONTRACT 17) on real replicas: what any replica records is reported at once by
// every replica, before and after the roll-up (the plugin's timer, USAGE_ROLLUP_MS) moved it into
// MariaDB; JSON and CSV for each groupBy; from/to; bad parameters; /metrics; embedded mode.
import t, { type Test } from 'tap'
import Fastify, { type FastifyInstance } from 'fastify'
import maestro, { type MaestroOptions } from '../app.js'
import { startFleet } from './helpers/gateway.js'
import { REDIS_URL, testPrefix } from './helpers/redis.js'
import { SERVICE_VARIABLES, writeInventoryFile } from './helpers/embedded.js'
import { scrape } from './helpers/prometheus.js'
import { USAGE_COUNTERS, type UsageEntry, type UsageLedger } from '../services/usage/usage-ledger.js'

/** A replica listening on a random port, with its own usage ledger at hand (the gateway's decorators live in its plugin's context). */
interface Replica {
  url: string
  usage: UsageLedger
  inner: FastifyInstance
}

async function startReplica (t: Test, options: MaestroOptions, opts: { embedded?: boolean } = {}): Promise<Replica> {
  const app = Fastify({ logger: false, forceCloseConnections: true })
  let inner: FastifyInstance | undefined
  // The gateway is an encapsulated plugin: its instance is the first context registered.
  app.addHook('onRegister', (instance) => { inner ??= instance })
  t.teardown(async () => { await app.close() })
  // Embedded mode: the environment's service variables are hidden while it starts.
  const saved = opts.embedded === true ? SERVICE_VARIABLES.map((v) => [v, process.env[v]] as const) : []
  for (const [v] of saved) delete process.env[v]
  try {
    await app.register(maestro, { dotenv: false, ...options })
    await app.listen({ port: 0, host: '127.0.0.1' })
  } finally {
    for (const [v, value] of saved) if (value !== undefined) process.env[v] = value
  }
  const address = app.server.address()
  const port = typeof address === 'object' && address != null ? address.port : 0
  if (inner == null) throw new Error('no gateway context')
  return { url: `http://127.0.0.1:${port}`, usage: inner.usage, inner }
}

const HOUR = 3_600_000
const H0 = Date.UTC(2025, 0, 31, 10)
const H1 = H0 + HOUR
const RANGE = `from=${new Date(H0 - HOUR).toISOString()}&to=${new Date(H1 + HOUR).toISOString()}`

const HOSTILE = ['a,b', 'say "hi"', 'line\nbreak', '=cmd|calc', '+1', '-2', '@at', 'ünï ☃']

type Row = Record<string, string | number>

async function usage (gw: Replica, query: string, headers: Record<string, string> = {}): Promise<{ status: number, type: string, body: string }> {
  const res = await fetch(`${gw.url}/admin/usage?${query}`, { headers })
  return { status: res.status, type: res.headers.get('content-type') ?? '', body: await res.text() }
}

async function rows (gw: Replica, query: string): Promise<Row[]> {
  const res = await usage(gw, query)
  if (res.status !== 200) throw new Error(`GET /admin/usage?${query} answered ${res.status}: ${res.body}`)
  return (JSON.parse(res.body) as { rows: Row[] }).rows
}

/** RFC 4180, enough for the answer: quoted cells with doubled quotes and line breaks inside. */
function parseCsv (text: string): string[][] {
  const out: string[][] = []
  let row: string[] = []
  let cell = ''
  let quoted = false
  for (let i = 0; i < text.length; i++) {
    const ch = text[i]
    if (quoted) {
      if (ch === '"' && text[i + 1] === '"') { cell += '"'; i++ } else if (ch === '"') quoted = false
      else cell += ch
    } else if (ch === '"') quoted = true
    else if (ch === ',') { row.push(cell); cell = '' } else if (ch === '\r' && text[i + 1] === '\n') { row.push(cell); out.push(row); row = []; cell = ''; i++ } else cell += ch
  }
  return out
}

/** The expected rows grouped by `dims`, from what was recorded. */
function expectedRows (entries: UsageEntry[], dims: Array<'client' | 'model' | 'assignment' | 'hour'>): Row[] {
  const map = new Map<string, Row>()
  for (const e of entries) {
    const values = dims.map((d) => d === 'hour' ? new Date((e.at as number) - (e.at as number) % HOUR).toISOString() : e[d])
    const key = JSON.stringify(values)
    const row = map.get(key) ?? { ...Object.fromEntries(dims.map((d, i) => [d, values[i]])), ...Object.fromEntries(USAGE_COUNTERS.map((c) => [c, 0])) }
    for (const c of USAGE_COUNTERS) (row[c] as number) += e[c] ?? 0
    map.set(key, row)
  }
  return [...map.values()].sort((a, b) => {
    for (const d of dims) if (a[d] !== b[d]) return (a[d] as string) < (b[d] as string) ? -1 : 1
    return 0
  })
}

function entries (): UsageEntry[] {
  const out: UsageEntry[] = []
  for (let i = 0; i < 24; i++) {
    out.push({
      client: i % 3 === 0 ? 'team-a' : i % 3 === 1 ? 'team-b' : '10.0.0.7',
      model: i % 2 === 0 ? 'llama3' : 'qwen',
      assignment: `asg-${i % 4}`,
      at: i % 2 === 0 ? H0 + i * 1000 : H1 + i * 1000,
      requests: 1,
      promptTokens: 10 * i,
      cachedPromptTokens: i,
      outputTokens: 3 * i + 1,
      images: i % 5 === 0 ? 1 : 0,
      audioSeconds: i % 6 === 0 ? 2.5 : 0,
      gpuSeconds: 0.5 * i,
      errors: i % 7 === 0 ? 1 : 0
    })
  }
  return out
}

t.test('replicas on one fleet: reported at once, the same after the roll-up; JSON and CSV; from/to; 400s', async (t) => {
  const fleet = await startFleet(t, { gpus: [], upstreams: [], migrate: true, options: { USAGE_ROLLUP_MS: 1000 } })
  const [a, b] = [await startReplica(t, fleet.options), await startReplica(t, fleet.options)]
  const recorded = entries()
  const hostile = HOSTILE.map((name, i): UsageEntry => ({ client: name, model: name, assignment: name, at: H0, requests: 1, outputTokens: i + 1 }))
  await Promise.all([...recorded, ...hostile].map(async (e, i) => { await (i % 2 === 0 ? a : b).usage.record(e) }))
  const all = [...recorded, ...hostile]

  const check = async (when: string): Promise<void> => {
    for (const dims of [['client'], ['model'], ['assignment'], ['hour'], ['hour', 'client']] as const) {
      t.same(await rows(b, `${RANGE}&groupBy=${dims.join(',')}`), expectedRows(all, [...dims]), `${when}: groupBy=${dims.join(',')}`)
    }
    t.same(await rows(a, `from=${new Date(H1).toISOString()}&to=${new Date(H1 + HOUR).toISOString()}&groupBy=hour`),
      expectedRows(all.filter((e) => e.at === undefined || e.at >= H1), ['hour']), `${when}: from/to select the hours`)
    t.same(await rows(a, 'groupBy=client'), [], `${when}: by default the last 24 hours (none recorded then)`)
  }
  await check('at once')

  // The replicas' timers roll up within a second: wait until the table has every request.
  const total = all.length
  const deadline = Date.now() + 20_000
  for (;;) {
    const [row] = await fleet.db.query('SELECT CAST(COALESCE(SUM(requests), 0) AS SIGNED) AS n FROM maestro_usage_hourly')
    if (Number(row.n) === total) break
    if (Date.now() > deadline) throw new Error(`the table holds ${String(row.n)} of ${total} requests`)
    await new Promise((resolve) => setTimeout(resolve, 50))
  }
  await check('after the roll-up')

  const csv = await usage(a, `${RANGE}&groupBy=client`, { accept: 'text/csv' })
  t.equal(csv.status, 200)
  t.match(csv.type, /^text\/csv/)
  const table = parseCsv(csv.body)
  t.same(table[0], ['client', ...USAGE_COUNTERS], 'a header line')
  const want = expectedRows(all, ['client'])
  const formula = (s: string): string => ['=', '+', '-', '@'].includes(s[0]) ? `'${s}` : s
  t.same(table.slice(1), want.map((r) => [formula(r.client as string), ...USAGE_COUNTERS.map((c) => String(r[c]))]),
    'every row; commas, quotes and line breaks quoted; formulas defused')
  t.ok(csv.body.includes('"say ""hi"""') && csv.body.includes("'=cmd|calc") && csv.body.includes('"line\nbreak"'))
  const byHour = parseCsv((await usage(a, `${RANGE}&groupBy=hour`, { accept: 'text/csv' })).body)
  t.same(byHour.map((r) => r[0]), ['hour', new Date(H0).toISOString(), new Date(H1).toISOString()])

  for (const [query, name] of [
    ['from=yesterday', 'from'], ['to=2025-13-45T99:00Z', 'to'], ['from=2025-01-31T10:00:00Z&to=2025-01-31T09:00:00Z', 'from'],
    ['groupBy=team', 'groupBy'], ['to=9999-12-31T23:59:59Z', 'to'], ['from=1969-12-31', 'from'], ['groupBy=client,client', 'groupBy'], [`from=${'9'.repeat(100)}`, 'from']
  ]) {
    const res = await usage(a, query)
    t.equal(res.status, 400, `${query}: 400`)
    t.match(JSON.parse(res.body).error, name, `${query}: names ${name}`)
  }

  // /metrics: the counts recorded on this replica.
  const onA = all.filter((_, i) => i % 2 === 0)
  const metrics = await scrape(a.url)
  const sum = (name: string, labels: Record<string, string>): number => metrics.find(name, labels).reduce((n, s) => n + s.value, 0)
  t.equal(sum('maestro_tokens_total', { client: 'team-a', model: 'llama3', direction: 'prompt' }),
    onA.filter((e) => e.client === 'team-a' && e.model === 'llama3').reduce((n, e) => n + (e.promptTokens ?? 0), 0))
  t.equal(sum('maestro_tokens_total', { direction: 'output' }), onA.reduce((n, e) => n + (e.outputTokens ?? 0), 0))
  t.equal(sum('maestro_gpu_seconds_total', { assignment: 'asg-2' }), onA.filter((e) => e.assignment === 'asg-2').reduce((n, e) => n + (e.gpuSeconds ?? 0), 0))
})

t.test('embedded mode: the in-memory ledger; the admin token guards the route', async (t) => {
  const file = await writeInventoryFile(t, [])
  const gw = await startReplica(t, { INVENTORY_FILE: file, ADMIN_TOKEN: 'usage-secret' }, { embedded: true })
  const recorded = entries()
  for (const e of recorded) await gw.usage.record(e)
  t.equal((await usage(gw, `${RANGE}&groupBy=model`)).status, 401, 'no token: 401')
  const res = await usage(gw, `${RANGE}&groupBy=model`, { authorization: 'Bearer usage-secret' })
  t.same(JSON.parse(res.body).rows, expectedRows(recorded, ['model']))
})

t.test('Redis without MariaDB: read from Redis alone', async (t) => {
  const file = await writeInventoryFile(t, [])
  const gw = await startReplica(t, { INVENTORY_FILE: file, REDIS_URL, REDIS_KEY_PREFIX: testPrefix(t) }, { embedded: true })
  t.equal(gw.inner.inventoryDb, null)
  t.not(gw.inner.leaseRedis, null)
  // Without MariaDB the buffer keeps a month: recent hours.
  const shift = (Date.now() - Date.now() % HOUR) - 2 * HOUR - H0
  const recorded = entries().map((e) => ({ ...e, at: (e.at as number) + shift }))
  for (const e of recorded) await gw.usage.record(e)
  t.same(await rows(gw, 'groupBy=assignment'), expectedRows(recorded, ['assignment']), 'the last 24 hours by default')
})

t.test('leases in memory with MariaDB: what is still in memory is rolled up when the replica closes', async (t) => {
  const fleet = await startFleet(t, { gpus: [], upstreams: [], migrate: true })
  const gw = await startReplica(t, { ...fleet.options, LEASE_STORE: 'memory' })
  t.equal(gw.inner.leaseRedis, null)
  const recorded = entries()
  for (const e of recorded) await gw.usage.record(e)
  t.same(await rows(gw, `${RANGE}&groupBy=client`), expectedRows(recorded, ['client']), 'reported from memory')
  await gw.inner.close()
  const [row] = await fleet.db.query('SELECT CAST(SUM(requests) AS SIGNED) AS n, CAST(SUM(output_tokens) AS SIGNED) AS output FROM maestro_usage_hourly')
  t.same([Number(row.n), Number(row.output)], [recorded.length, recorded.reduce((n, e) => n + (e.outputTokens ?? 0), 0)], 'in the table after close')
})

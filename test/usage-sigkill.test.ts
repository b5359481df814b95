// Usage survives a SIGKILLed replica and a roll-up killed halfway, and a double roll-up doubles
// nothing (CONTRACT 17), end to end: real clients through two replicas (one a process of its own,
// SIGKILLed), the simulator's cost model counting every request itself, MariaDB's
// maestro_usage_hourly read with SQL and GET /admin/usage compared with those counts, per key.
import t from 'tap'
import { Ollama } from 'ollama'
import OpenAI from 'openai'
import { Redis } from 'ioredis'
import { startFleet, type Gateway } from './helpers/gateway.js'
import { insertKey, eventually } from './helpers/api-keys.js'
import { spawnGateway, envOf } from './helpers/child-gateway.js'
import { REDIS_URL } from './helpers/redis.js'
import { RedisUsageLedger } from '../services/usage/redis-usage-ledger.js'
import { applyBatch, redisRollupLock, UsageRollup, type UsageDb } from '../services/usage/usage-rollup.js'
import type { Query } from '../services/fleet/inventory.js'

const TOKEN = 'usage-sigkill-admin'
const MODEL = 'llama3:8b'
const KEYS = { 'team-a': 'secret-team-a', 'team-b': 'secret-team-b' } as const
type Key = keyof typeof KEYS
/** The plugin's roll-up lock key, under the fleet's prefix (plugins/usage.ts). */
const LOCK_KEY = 'usage:rollup-lock'

interface Counts { requests: number, promptTokens: number, cachedPromptTokens: number, outputTokens: number }
const zero = (): Counts => ({ requests: 0, promptTokens: 0, cachedPromptTokens: 0, outputTokens: 0 })
const total = (c: Record<Key, Counts>): number => c['team-a'].requests + c['team-b'].requests

t.test('a SIGKILLed replica, a roll-up killed between apply and drop, and a double roll-up: nothing lost, nothing doubled', async (t) => {
  const fleet = await startFleet(t, {
    gpus: [1],
    migrate: true,
    upstreams: [{ model: MODEL, gpus: [0], simulator: { cost: { prefillMsPerToken: 0.05, decodeMsPerToken: 1, answerTokens: 6 } } }],
    options: { ADMIN_TOKEN: TOKEN, USAGE_ROLLUP_MS: 1000 }
  })
  const sim = fleet.upstreams[0]
  for (const [name, secret] of Object.entries(KEYS)) await insertKey(fleet.db.query, name, secret)
  const expected: Record<Key, Counts> = { 'team-a': zero(), 'team-b': zero() }

  /** Runs one request (one at a time) and adds the simulator's own counts of it to the key's expected sums. */
  const counted = async (key: Key, fn: () => Promise<void>): Promise<void> => {
    const before = sim.costs().requests.length
    await fn()
    const records = sim.costs().requests.slice(before)
    t.equal(records.length, 1, 'one request reached the simulator')
    const e = expected[key]
    e.requests++
    for (const r of records) {
      e.promptTokens += r.promptTokens
      e.cachedPromptTokens += r.cachedTokens
      e.outputTokens += r.evalCount
    }
  }
  /** ollama and openai, streamed and not, under both keys, through `url`. */
  const traffic = async (url: string, label: string): Promise<void> => {
    for (const key of Object.keys(KEYS) as Key[]) {
      const ollama = new Ollama({ host: url, headers: { Authorization: `Bearer ${KEYS[key]}` } })
      const openai = new OpenAI({ baseURL: url + '/v1', apiKey: KEYS[key], maxRetries: 0 })
      const conversation = [{ role: 'user', content: `A conversation that is long enough to be cached, held by ${key}.` }]
      await counted(key, async () => { await ollama.chat({ model: MODEL, messages: conversation, stream: false }) })
      await counted(key, async () => {
        const parts = await ollama.chat({ model: MODEL, messages: conversation, stream: true })
        for await (const _ of parts) { /* read to the end */ }
      })
      await counted(key, async () => {
        const parts = await ollama.generate({ model: MODEL, prompt: `Count to ten, ${label}.`, stream: true })
        for await (const _ of parts) { /* read to the end */ }
      })
      await counted(key, async () => { await openai.chat.completions.create({ model: MODEL, messages: [{ role: 'user', content: `hello from ${label}` }] }) })
      await counted(key, async () => {
        const stream = await openai.chat.completions.create({ model: MODEL, messages: [{ role: 'user', content: `stream to ${label}` }], stream: true, stream_options: { include_usage: true } })
        for await (const _ of stream) { /* read to the end */ }
      })
    }
  }

  /** maestro_usage_hourly, summed per client over its hours (SQL, not the API). */
  const table = async (): Promise<Record<string, Counts>> => {
    const rows = await fleet.db.query(`SELECT client, SUM(requests) AS requests, SUM(prompt_tokens) AS promptTokens,
      SUM(cached_prompt_tokens) AS cachedPromptTokens, SUM(output_tokens) AS outputTokens
      FROM maestro_usage_hourly GROUP BY client ORDER BY client`)
    const out: Record<string, Counts> = {}
    for (const r of rows) {
      out[r.client] = { requests: Number(r.requests), promptTokens: Number(r.promptTokens), cachedPromptTokens: Number(r.cachedPromptTokens), outputTokens: Number(r.outputTokens) }
    }
    return out
  }
  const tableRequests = async (): Promise<number> => Object.values(await table()).reduce((n, c) => n + c.requests, 0)
  /** GET /admin/usage?groupBy=client: MariaDB's rows plus what is still buffered in Redis. */
  const api = async (gw: { url: string }): Promise<Record<string, Counts>> => {
    const res = await fetch(`${gw.url}/admin/usage?groupBy=client`, { headers: { authorization: `Bearer ${TOKEN}` } })
    if (res.status !== 200) throw new Error(`GET /admin/usage answered ${res.status}: ${await res.text()}`)
    const out: Record<string, Counts> = {}
    for (const r of ((await res.json()) as { rows: Array<Record<string, any>> }).rows) {
      out[r.client] = { requests: r.requests, promptTokens: r.promptTokens, cachedPromptTokens: r.cachedPromptTokens, outputTokens: r.outputTokens }
    }
    return out
  }
  const apiRequests = async (gw: { url: string }): Promise<number> => Object.values(await api(gw)).reduce((n, c) => n + c.requests, 0)

  // The test's own handles on the fleet's Redis buffer and MariaDB: to hold the roll-up's turn and
  // to play a replica whose roll-up dies between its commit and its drop.
  const redis = new Redis(REDIS_URL)
  t.teardown(() => { redis.disconnect() })
  const ledger = new RedisUsageLedger({ client: redis, prefix: fleet.prefix })
  const lock = redisRollupLock(redis, fleet.prefix + LOCK_KEY, 60_000)
  const db: UsageDb = {
    query: fleet.db.query,
    transaction: async (work) => {
      const connection = await fleet.db.pool.getConnection()
      const query: Query = async (sql, params) => { const [rows] = await connection.query(sql, params); return rows as any[] }
      try {
        await connection.beginTransaction()
        const result = await work(query)
        await connection.commit()
        return result
      } catch (err) {
        await connection.rollback()
        throw err
      } finally {
        connection.release()
      }
    }
  }
  /** The roll-up ids of batches ('<roll-up id>:<hour>': a roll-up seals one batch per hour buffered). */
  const rollupsOf = (batches: Array<{ id: string }>): Set<string> => new Set(batches.map((b) => b.id.slice(0, b.id.lastIndexOf(':'))))
  const takeTurn = async (): Promise<() => Promise<void>> => {
    let release: (() => Promise<void>) | null = null
    t.ok(await eventually(async () => (release = await lock.acquire()) != null, 10_000), 'the roll-up turn taken (a replica\'s roll-up holds it for milliseconds)')
    if (release == null) throw new Error('no roll-up turn')
    return release
  }

  // 1. A roll-up SIGKILLed in flight, deterministically: replica A (a process of its own) runs alone.
  // The test holds the roll-up turn while A answers, then every row and gap of maestro_usage_hourly
  // (SELECT ... FOR UPDATE), and hands the turn back: A's next roll-up seals all its counts,
  // inserts its batch id and waits on the test's lock inside its transaction, holding the turn.
  // SIGKILL then (well within the 5 s after which A's own query would time out).
  const childA = await spawnGateway(t, envOf(fleet, { ADMIN_TOKEN: TOKEN, USAGE_ROLLUP_MS: 1000 }))
  const releaseA = await takeTurn()
  await traffic(childA.url, 'replica A')
  t.ok(expected['team-a'].cachedPromptTokens > 0, 'the simulator served cached prompt tokens (the repeated conversation)')
  t.ok(await eventually(async () => await apiRequests(childA) === total(expected), 5000), 'replica A\'s counts are recorded (in Redis)')
  const blocker = await fleet.db.pool.getConnection()
  t.teardown(() => { blocker.release() })
  await blocker.beginTransaction()
  await blocker.query('SELECT * FROM maestro_usage_hourly FOR UPDATE')
  /** Threads of this test's database running `sql…` now (the shared server runs other tests' too). */
  const running = async (sql: string): Promise<number[]> => (await fleet.db.query(`SELECT ID FROM information_schema.PROCESSLIST
    WHERE DB = ? AND ID <> CONNECTION_ID() AND COMMAND = 'Query' AND LEFT(INFO, ?) = ?`, [fleet.db.name, sql.length, sql])).map((r) => Number(r.ID))
  await releaseA()
  let waiting: number[] = []
  t.ok(await eventually(async () => (waiting = await running('INSERT INTO maestro_usage_hourly')).length === 1, 10_000),
    'replica A\'s roll-up is in flight: its transaction waits inside MariaDB to add its counts')
  childA.proc.kill('SIGKILL')
  t.same(await childA.exited, { code: null, signal: 'SIGKILL' }, 'replica A SIGKILLed mid roll-up')
  t.equal(rollupsOf(await ledger.batches()).size, 1, 'it left its counts sealed by its one roll-up')
  t.equal(await redis.exists(fleet.prefix + LOCK_KEY), 1, 'and its roll-up turn held')
  // A statement waiting for a lock does not notice its client gone: once the test lets it run, it
  // finds the connection dead, and MariaDB rolls its transaction (the batch id too) back; nobody
  // is left to send its COMMIT.
  await blocker.commit()
  const threads = async (): Promise<number[]> => (await fleet.db.query('SELECT ID FROM information_schema.PROCESSLIST WHERE ID = ?', [waiting[0]])).map((r) => Number(r.ID))
  t.ok(await eventually(async () => (await threads()).length === 0, 15_000), 'replica A\'s connection ended (its transaction rolled back)')
  t.equal(await tableRequests(), 0, 'nothing of replica A reached maestro_usage_hourly')
  t.same(await fleet.db.query('SELECT id FROM maestro_usage_rollups'), [], 'nor its batch id')
  // Its turn would pass on when it expires (60 s); the test expires it now.
  await redis.del(fleet.prefix + LOCK_KEY)

  // 2. Two replicas: B (a process of its own) and the survivor (in this process). The test holds
  // the roll-up turn, so nothing buffered from now on reaches MariaDB before B dies.
  const releaseTurn = await takeTurn()
  const childB = await spawnGateway(t, envOf(fleet, { ADMIN_TOKEN: TOKEN, USAGE_ROLLUP_MS: 1000 }))
  const survivor: Gateway = await fleet.replica()
  await traffic(childB.url, 'replica B')
  await traffic(survivor.url, 'the survivor, before')
  // B's answers ended; its counts are recorded (in Redis: every replica's report shows them at once)...
  t.ok(await eventually(async () => await apiRequests(survivor) === total(expected), 5000), 'replica B\'s counts are in Redis')
  // ...and not rolled up (the turn is the test's): SIGKILL now.
  childB.proc.kill('SIGKILL')
  t.same(await childB.exited, { code: null, signal: 'SIGKILL' }, 'replica B SIGKILLed right after its answers')
  t.equal(await tableRequests(), 0, 'none of it was rolled up before it died')

  // 3. A roll-up killed between its steps 2 and 3 (usage-rollup.ts), played by the test with the
  // roll-up's own functions: it seals, applies its batch (commits) and dies before dropping it.
  await ledger.seal('killed-after-apply')
  const applied = (await ledger.batches()).filter((b) => b.id.startsWith('killed-after-apply:'))
  t.ok(applied.length > 0, 'the buffered counts sealed into a batch')
  for (const batch of applied) t.ok(await applyBatch(db, batch), `batch ${batch.id} applied (and left in Redis)`)
  t.ok(await tableRequests() > 0, 'the applied batch is in MariaDB')
  // More traffic on the survivor, then a roll-up that dies after sealing, before applying.
  await traffic(survivor.url, 'the survivor, after')
  t.ok(await eventually(async () => await apiRequests(survivor) === total(expected), 5000), 'the survivor\'s counts are recorded')
  await ledger.seal('killed-after-seal')
  t.equal(rollupsOf(await ledger.batches()).size, 3, 'leftovers of three roll-ups: replica A\'s sealed, the applied, one sealed after it')
  // The dead roll-up never releases its turn; its expiry is the test's release, now.
  await releaseTurn()

  // 4. The survivor's roll-ups (its timer, USAGE_ROLLUP_MS 1000) apply the leftovers: the applied
  // batch adds nothing (its id is in maestro_usage_rollups), the sealed ones their counts (replica
  // A's id was rolled back with its transaction).
  t.ok(await eventually(async () => (await ledger.batches()).length === 0, 15_000), 'the survivor applied and dropped every leftover batch')
  t.ok(await eventually(async () => await tableRequests() >= total(expected), 15_000), 'maestro_usage_hourly holds every request')
  // A double roll-up on top: two more, one after the other (as another replica would run them).
  const rollup = new UsageRollup({ ledger, db, lock })
  for (let i = 0; i < 2; i++) {
    let result: Awaited<ReturnType<UsageRollup['run']>> = null
    t.ok(await eventually(async () => (result = await rollup.run()) != null, 10_000), `roll-up ${i + 1} had its turn`)
    t.same(result, { applied: 0, alreadyApplied: 0 }, `roll-up ${i + 1}: nothing left to apply`)
  }

  // Nothing lost, nothing doubled: the table (SQL) and the API equal the simulator's own counts, per key.
  t.same(await table(), expected, 'maestro_usage_hourly: exactly the simulator\'s counts per key')
  t.same(await api(survivor), expected, 'GET /admin/usage?groupBy=client: the same')
  t.equal(sim.costs().requests.length, total(expected), 'every request the simulator served is counted, once')
})

// The usage ledger (CONTRACT 17) on a real Redis and MariaDB: counts recorded by several replicas
// add up; the roll-up into maestro_usage_hourly counts each request exactly once whether it runs
// twice, races another, or dies between its steps; names that would break a separator round trip.
import t, { type Test } from 'tap'
import type { Pool } from 'mysql2/promise'
import type { Query } from '../services/fleet/inventory.js'
import { MemoryUsageLedger, USAGE_COUNTERS, zeroCounts, type UsageCounts, type UsageEntry, type UsageLedger } from '../services/usage/usage-ledger.js'
import { RedisUsageLedger } from '../services/usage/redis-usage-ledger.js'
import { applyBatch, redisRollupLock, UsageRollup, type RollupLock, type UsageDb } from '../services/usage/usage-rollup.js'
import { usageReport, type UsageRow } from '../services/usage/usage-report.js'
import { createTestDatabase } from './helpers/database.js'
import { redisClients, testPrefix } from './helpers/redis.js'
import type { RedisConnection } from '../services/config/redis-connections.js'

const HOUR = 3_600_000
/** A fixed hour, so a test never straddles the turn of an hour. */
const H0 = Date.UTC(2025, 0, 31, 10)
const H1 = H0 + HOUR
const WHOLE_DAY = { from: H0 - 12 * HOUR, to: H0 + 12 * HOUR }

/** Names a separator, a CSV cell or a spreadsheet would trip over; exact case and trailing space kept. */
const HOSTILE = ['a,b', 'say "hi"', 'line\nbreak', '=cmd|calc', '["x","y"]', 'Alice', 'alice', 'alice ', 'ünï ☃', '']

function usageDb (pool: Pool): UsageDb {
  const query = (connection: { query: Pool['query'] }): Query => async (sql, params) => {
    const [rows] = await connection.query(sql, params)
    return rows as any[]
  }
  return {
    query: query(pool),
    transaction: async (work) => {
      const connection = await pool.getConnection()
      try {
        await connection.beginTransaction()
        const result = await work(query(connection))
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
}

/** Always this roll-up's turn: for races the lock would otherwise prevent (correctness must not depend on it). */
const noLock: RollupLock = { acquire: async () => async () => {} }

type Key = string
/** What a test recorded, summed per client, model, assignment and hour: what the table must hold in the end. */
class Expected {
  readonly sums = new Map<Key, UsageCounts>()
  add (e: UsageEntry): void {
    const key = JSON.stringify([e.client, e.model, e.assignment, e.at])
    const sum = this.sums.get(key) ?? zeroCounts()
    for (const c of USAGE_COUNTERS) sum[c] += e[c] ?? 0
    this.sums.set(key, sum)
  }

  /** Rows as the report answers them grouped by client (sorted). */
  byClient (): UsageRow[] {
    const rows = new Map<string, UsageRow>()
    for (const [key, counts] of this.sums) {
      const client = (JSON.parse(key) as string[])[0]
      const row = rows.get(client) ?? { client, ...zeroCounts() }
      for (const c of USAGE_COUNTERS) row[c] += counts[c]
      rows.set(client, row)
    }
    return [...rows.values()].sort((a, b) => (a.client as string) < (b.client as string) ? -1 : 1)
  }
}

let seq = 0
function entry (client: string, at = H0): UsageEntry {
  seq++
  return {
    client,
    model: `model-${seq % 3}`,
    assignment: `asg-${seq % 2}`,
    at,
    requests: 1,
    promptTokens: 100 + seq,
    cachedPromptTokens: seq % 50,
    outputTokens: 7 * seq,
    images: seq % 3 === 0 ? 1 : 0,
    audioSeconds: seq % 4 === 0 ? 1.5 : 0,
    gpuSeconds: 0.25 * (seq % 8),
    errors: seq % 5 === 0 ? 1 : 0
  }
}

/** The hourly table summed per (client, model, assignment, hour), as Expected keys it. */
async function tableSums (db: UsageDb): Promise<Map<Key, UsageCounts>> {
  const rows = await db.query(`SELECT DATE_FORMAT(hour, '%Y-%m-%dT%H:%i:%sZ') AS hour, client, model, assignment, requests,
    prompt_tokens, cached_prompt_tokens, output_tokens, images, audio_seconds, gpu_seconds, errors FROM maestro_usage_hourly`)
  const out = new Map<Key, UsageCounts>()
  for (const r of rows) {
    const key = JSON.stringify([r.client.toString('utf8'), r.model.toString('utf8'), r.assignment.toString('utf8'), Date.parse(r.hour)])
    out.set(key, {
      requests: Number(r.requests),
      promptTokens: Number(r.prompt_tokens),
      cachedPromptTokens: Number(r.cached_prompt_tokens),
      outputTokens: Number(r.output_tokens),
      images: Number(r.images),
      audioSeconds: r.audio_seconds,
      gpuSeconds: r.gpu_seconds,
      errors: Number(r.errors)
    })
  }
  return out
}

const sorted = (m: Map<Key, UsageCounts>): Array<[Key, UsageCounts]> => [...m].sort(([a], [b]) => a < b ? -1 : 1)

/** `n` replicas' ledgers on one Redis and prefix, each with its own connection. */
async function redisLedgers (t: Test, n: number): Promise<{ prefix: string, ledgers: RedisUsageLedger[], clients: RedisConnection[] }> {
  const prefix = testPrefix(t)
  const ledgers: RedisUsageLedger[] = []
  const clients: RedisConnection[] = []
  for (let i = 0; i < n; i++) {
    const { client } = await redisClients(t)
    clients.push(client)
    ledgers.push(new RedisUsageLedger({ client, prefix, onError: (err) => { throw err } }))
  }
  return { prefix, ledgers, clients }
}

async function recordAll (ledgers: UsageLedger[], entries: UsageEntry[], expected: Expected): Promise<void> {
  await Promise.all(entries.map(async (e, i) => {
    expected.add(e)
    await ledgers[i % ledgers.length].record(e)
  }))
}

t.test('two replicas record on one Redis: the report is the exact sum, at once', async (t) => {
  const { ledgers } = await redisLedgers(t, 2)
  const expected = new Expected()
  await recordAll(ledgers, [...Array(40)].map((_, i) => entry(`client-${i % 4}`, i % 2 === 0 ? H0 : H1)), expected)
  for (const ledger of ledgers) {
    t.same(await usageReport(ledger, null, { ...WHOLE_DAY, groupBy: ['client'] }), expected.byClient(), 'either replica reads every count')
  }
  const perHour = await usageReport(ledgers[0], null, { ...WHOLE_DAY, groupBy: ['hour'] })
  t.same(perHour.map((r) => [r.hour, r.requests]), [[new Date(H0).toISOString(), 20], [new Date(H1).toISOString(), 20]])
  const onlyH1 = await usageReport(ledgers[0], null, { from: H1, to: H1 + HOUR, groupBy: ['hour'] })
  t.same(onlyH1.map((r) => r.hour), [new Date(H1).toISOString()], 'from and to select hours')
})

t.test('bad counts are not counted: negative, not finite, fractions of whole counters', async (t) => {
  const ledger = new MemoryUsageLedger()
  await ledger.record({ client: 'c', model: 'm', assignment: 'a', at: H0, requests: 1, promptTokens: -5, outputTokens: Infinity, images: 2.9, gpuSeconds: NaN })
  const [row] = await usageReport(ledger, null, { ...WHOLE_DAY, groupBy: ['model'] })
  t.same(row, { model: 'm', ...zeroCounts(), requests: 1, images: 2 })
})

t.test('roll-up run twice counts once; later counts add to the same rows', async (t) => {
  const tdb = await createTestDatabase(t, { migrate: true })
  const db = usageDb(tdb.pool)
  const { ledgers, prefix, clients } = await redisLedgers(t, 2)
  const rollup = new UsageRollup({ ledger: ledgers[0], db, lock: redisRollupLock(clients[0], prefix + 'usage:rollup-lock', 10_000) })
  const expected = new Expected()
  await recordAll(ledgers, [...Array(30)].map((_, i) => entry(`c${i % 3}`, i % 3 === 0 ? H1 : H0)), expected)
  t.same(await rollup.run(), { applied: 2, alreadyApplied: 0 }, 'one batch per hour')
  t.same(await rollup.run(), { applied: 0, alreadyApplied: 0 }, 'nothing left the second time')
  t.same(sorted(await tableSums(db)), sorted(expected.sums), 'the table holds each count once')
  await recordAll(ledgers, [...Array(10)].map((_, i) => entry(`c${i % 3}`)), expected)
  await rollup.run()
  t.same(sorted(await tableSums(db)), sorted(expected.sums), 'added to the rows already there')
  t.same(await usageReport(ledgers[1], db, { ...WHOLE_DAY, groupBy: ['client'] }), expected.byClient(), 'the report reads the table')
})

t.test('roll-ups racing (no lock, several rounds, records in between): each count once', async (t) => {
  const tdb = await createTestDatabase(t, { migrate: true })
  const db = usageDb(tdb.pool)
  const { ledgers } = await redisLedgers(t, 3)
  const rollups = ledgers.map((ledger) => new UsageRollup({ ledger, db, lock: noLock }))
  const expected = new Expected()
  for (let round = 0; round < 6; round++) {
    const entries = [...Array(20)].map((_, i) => entry(`c${i % 5}`, i % 4 === 0 ? H1 : H0))
    await Promise.all([recordAll(ledgers, entries, expected), ...rollups.map(async (r) => await r.run())])
    t.same(await usageReport(ledgers[round % 3], db, { ...WHOLE_DAY, groupBy: ['client'] }), expected.byClient(), `round ${round}: the report counts once`)
  }
  await Promise.all(rollups.map(async (r) => await r.run()))
  t.same(sorted(await tableSums(db)), sorted(expected.sums), 'the table holds each count once')
  t.same((await ledgers[0].buffered(0, Infinity)).batches, [], 'no batch left behind')
})

t.test('reports while roll-ups run: each report counts every request once', async (t) => {
  const tdb = await createTestDatabase(t, { migrate: true })
  const db = usageDb(tdb.pool)
  const { ledgers } = await redisLedgers(t, 2)
  const rollup = new UsageRollup({ ledger: ledgers[0], db, lock: noLock })
  // A slow reader: between reading Redis and reading MariaDB it pauses, so roll-ups seal and apply in between.
  const reader = ledgers[1]
  const slow: UsageLedger = {
    record: async (e) => { await reader.record(e) },
    buffered: async (fromHour, to) => {
      const read = await reader.buffered(fromHour, to)
      await new Promise((resolve) => setTimeout(resolve, 2 + Math.floor(Math.random() * 15)))
      return read
    },
    generation: async () => await reader.generation(),
    seal: async (id) => { await reader.seal(id) },
    batches: async () => await reader.batches(),
    tokensUsed: async (keys, at) => await reader.tokensUsed(keys, at),
    drop: async (id) => { await reader.drop(id) }
  }
  const expected = new Expected()
  const wrong: number[] = []
  for (let round = 0; round < 30; round++) {
    await recordAll(ledgers, [...Array(4)].map((_, i) => entry(`r${i % 2}`, i % 2 === 0 ? H0 : H1)), expected)
    const want = expected.byClient()
    const reports = [...Array(4)].map(async (_, i) => {
      // staggered, so some reads fall between a seal and its apply
      await new Promise((resolve) => setTimeout(resolve, i))
      return await usageReport(slow, db, { ...WHOLE_DAY, groupBy: ['client'] })
    })
    const [, ...seen] = await Promise.all([rollup.run(), ...reports])
    for (const report of seen) if (JSON.stringify(report) !== JSON.stringify(want)) wrong.push(round)
  }
  t.same(wrong, [], 'no report counted a request twice or missed one')
})

t.test('the same batch applied twice at once: added once', async (t) => {
  const tdb = await createTestDatabase(t, { migrate: true })
  const db = usageDb(tdb.pool)
  const { ledgers } = await redisLedgers(t, 1)
  const expected = new Expected()
  await recordAll(ledgers, [entry('x'), entry('y')], expected)
  await ledgers[0].seal('r1')
  const [batch] = await ledgers[0].batches()
  const answers = await Promise.all([applyBatch(db, batch), applyBatch(db, batch), applyBatch(db, batch)])
  t.same(answers.filter(Boolean).length, 1, 'one apply added it')
  t.same(sorted(await tableSums(db)), sorted(expected.sums))
})

t.test('a roll-up killed between its steps: the next one recovers, nothing lost or doubled', async (t) => {
  const tdb = await createTestDatabase(t, { migrate: true })
  const db = usageDb(tdb.pool)
  const { ledgers } = await redisLedgers(t, 2)
  const [ledger] = ledgers
  const rollup = new UsageRollup({ ledger: ledgers[1], db, lock: noLock })
  const expected = new Expected()
  const report = async (): Promise<UsageRow[]> => await usageReport(ledgers[1], db, { ...WHOLE_DAY, groupBy: ['client'] })

  // Died after sealing: the batches wait in Redis, the report still counts them.
  await recordAll(ledgers, [...Array(8)].map((_, i) => entry(`k${i % 2}`, i % 2 === 0 ? H0 : H1)), expected)
  await ledger.seal('dead-after-seal')
  t.same((await ledger.batches()).length, 2)
  t.same(await report(), expected.byClient(), 'sealed, not applied: counted once')

  // Died after committing one batch, before dropping it: applied and still listed.
  await recordAll(ledgers, [entry('k0'), entry('k2', H1)], expected)
  await ledger.seal('dead-after-commit')
  const committed = (await ledger.batches()).filter((b) => b.id.startsWith('dead-after-commit'))
  t.same(committed.length, 2)
  t.ok(await applyBatch(db, committed[0]))
  t.same(await report(), expected.byClient(), 'applied, not dropped: counted once')

  // Records keep coming; the next roll-up applies the leftovers and skips the applied batch.
  await recordAll(ledgers, [entry('k1'), entry('k3')], expected)
  t.same(await rollup.run(), { applied: 4, alreadyApplied: 1 })
  t.same(sorted(await tableSums(db)), sorted(expected.sums), 'the table holds each count once')
  t.same(await report(), expected.byClient())
  t.same(await ledger.batches(), [], 'nothing left in Redis')
})

t.test('hostile names round trip exactly through Redis and MariaDB', async (t) => {
  const tdb = await createTestDatabase(t, { migrate: true })
  const db = usageDb(tdb.pool)
  const { ledgers } = await redisLedgers(t, 1)
  const expected = new Expected()
  const entries = HOSTILE.flatMap((name) => [
    { client: name, model: name, assignment: name, at: H0, requests: 1, promptTokens: 3 },
    { client: name, model: 'plain', assignment: name, at: H0, requests: 2, outputTokens: 5 }
  ])
  await recordAll(ledgers, entries, expected)
  const want = expected.byClient()
  t.same(await usageReport(ledgers[0], db, { ...WHOLE_DAY, groupBy: ['client'] }), want, 'from Redis')
  await new UsageRollup({ ledger: ledgers[0], db, lock: noLock }).run()
  t.same(sorted(await tableSums(db)), sorted(expected.sums), 'in the table')
  t.same(await usageReport(ledgers[0], db, { ...WHOLE_DAY, groupBy: ['client'] }), want, 'from MariaDB')
  const models = await usageReport(ledgers[0], db, { ...WHOLE_DAY, groupBy: ['model', 'assignment'] })
  t.same(models.length, HOSTILE.length * 2, 'a row per model and assignment')
})

t.test('memory ledger (leases in memory) with MariaDB: rolled up like Redis', async (t) => {
  const tdb = await createTestDatabase(t, { migrate: true })
  const db = usageDb(tdb.pool)
  const ledger = new MemoryUsageLedger()
  const rollup = new UsageRollup({ ledger, db, lock: noLock })
  const expected = new Expected()
  await recordAll([ledger], [...Array(12)].map((_, i) => entry(`m${i % 3}`, i % 2 === 0 ? H0 : H1)), expected)
  await ledger.seal('dead')
  await Promise.all([rollup.run(), rollup.run()])
  await recordAll([ledger], [entry('m0')], expected)
  t.same(await usageReport(ledger, db, { ...WHOLE_DAY, groupBy: ['client'] }), expected.byClient())
  await rollup.run()
  t.same(sorted(await tableSums(db)), sorted(expected.sums))
})

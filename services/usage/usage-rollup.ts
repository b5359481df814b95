/**
 * Moves buffered usage into `maestro_usage_hourly`, one replica at a time, each count exactly once.
 *
 * Why exactly once, whoever dies or races:
 * 1. Seal (one Redis script, atomic): every buffered hour's hash is renamed to a batch key named
 *    by a fresh roll-up id and its hour, and listed as sealed. A count is in exactly one place:
 *    the live hash (recorded after the seal) or one batch. Nothing writes to a batch afterwards.
 * 2. Apply (one MariaDB transaction per batch): INSERT IGNORE of the batch id into
 *    `maestro_usage_rollups`, and only when that inserted a row, the batch's cells added to the
 *    hourly rows. The id's primary key makes a second apply of the same batch (a retry after a
 *    crash, another replica racing on a leftover) add nothing: a concurrent insert of the id waits
 *    for the first transaction and then finds the row; a rolled-back first one leaves it to the
 *    second. The rows and the id commit together or not at all.
 * 3. Drop: the batch leaves Redis only after its transaction committed (or found it applied).
 * A roll-up killed after 1 leaves sealed batches, after 2 an applied one still listed: the next
 * roll-up applies every listed batch (2, a no-op for the applied one) and drops it (3). The lock
 * only saves duplicate work; correctness does not depend on it (its expiry may let two run).
 * Lost: only counts still in Redis when Redis loses its data (at most one roll-up period's).
 */
import { randomUUID } from 'node:crypto'
import type { Cluster, Redis } from 'ioredis'
import type { Query } from '../fleet/inventory.js'
import { loadLuaScripts } from '../lua/lua-scripts.js'
import { hasTable } from '../fleet/migrations.js'
import { FRACTIONAL_COUNTERS, USAGE_COUNTERS, roundFraction, type UsageBatch, type UsageLedger } from './usage-ledger.js'

export interface UsageDb {
  query: Query
  /** `work` between BEGIN and COMMIT on one connection, rolled back when it throws. */
  transaction: <T>(work: (query: Query) => Promise<T>) => Promise<T>
}

/** One roll-up at a time: `acquire` answers a release function, or null while another holds the turn. */
export interface RollupLock {
  acquire: () => Promise<(() => Promise<void>) | null>
}

/** Applied batch ids are kept this long (a batch is applied and dropped within seconds; a week is ample). */
const APPLIED_IDS_KEPT_DAYS = 7
/** Rows per INSERT statement. */
const ROWS_PER_STATEMENT = 200

/** `YYYY-MM-DD HH:00:00`, UTC: a DATETIME value no session time zone shifts. */
export function sqlHour (hourMs: number): string {
  return new Date(hourMs).toISOString().slice(0, 19).replace('T', ' ')
}

const COLUMNS = ['hour', 'client', 'model', 'assignment', 'requests', 'prompt_tokens', 'cached_prompt_tokens',
  'output_tokens', 'images', 'audio_seconds', 'gpu_seconds', 'errors']
const COUNT_COLUMNS = COLUMNS.slice(4)
const ROW_PLACEHOLDERS = `(${COLUMNS.map(() => '?').join(', ')})`
const UPSERT_TAIL = ' ON DUPLICATE KEY UPDATE ' + COUNT_COLUMNS.map((c) => `${c} = ${c} + VALUES(${c})`).join(', ')

/**
 * Adds one sealed batch to the hourly table, once: answers false when its id was applied before
 * (by this or another replica), or it is empty.
 */
export async function applyBatch (db: UsageDb, batch: UsageBatch): Promise<boolean> {
  if (batch.cells.length === 0) return false
  return await db.transaction(async (query) => {
    const claimed = await query('INSERT IGNORE INTO maestro_usage_rollups (id) VALUES (?)', [batch.id]) as unknown as { affectedRows: number }
    if (claimed.affectedRows === 0) return false
    const hour = sqlHour(batch.hour)
    // One order for every batch: two roll-ups adding to the same rows lock them in the same order (no deadlock).
    const ordered = batch.cells.map((cell) => ({ key: JSON.stringify([cell.client, cell.model, cell.assignment]), cell }))
      .sort((a, b) => a.key < b.key ? -1 : a.key > b.key ? 1 : 0).map(({ cell }) => cell)
    for (let i = 0; i < ordered.length; i += ROWS_PER_STATEMENT) {
      const cells = ordered.slice(i, i + ROWS_PER_STATEMENT)
      const params: unknown[] = []
      for (const cell of cells) {
        params.push(hour, cell.client, cell.model, cell.assignment,
          ...USAGE_COUNTERS.map((c) => FRACTIONAL_COUNTERS.has(c) ? roundFraction(cell.counts[c]) : cell.counts[c]))
      }
      await query(`INSERT INTO maestro_usage_hourly (${COLUMNS.join(', ')}) VALUES ${cells.map(() => ROW_PLACEHOLDERS).join(', ')}${UPSERT_TAIL}`, params)
    }
    return true
  })
}

export interface RollupResult {
  /** batches added to MariaDB by this roll-up */
  applied: number
  /** batches found applied already (a roll-up died before dropping them, or raced this one) */
  alreadyApplied: number
}

export interface UsageRollupOptions {
  ledger: UsageLedger
  db: UsageDb
  lock: RollupLock
  log?: { warn: (obj: object, msg: string) => void }
}

export class UsageRollup {
  private warnedUnmigrated = false

  constructor (private readonly opts: UsageRollupOptions) {}

  /** One roll-up: seal what is buffered, apply every sealed batch, drop it. Null when it was not this replica's turn (or the table is missing). */
  async run (): Promise<RollupResult | null> {
    const release = await this.opts.lock.acquire()
    if (release == null) return null
    try {
      if (!await hasTable(this.opts.db.query, 'maestro_usage_rollups')) {
        // Counts stay buffered until the tables exist: nothing is lost meanwhile.
        if (!this.warnedUnmigrated) this.opts.log?.warn({}, 'usage is not rolled up into MariaDB until npm run migrate has made maestro_usage_hourly')
        this.warnedUnmigrated = true
        return null
      }
      await this.opts.ledger.seal(randomUUID())
      return await this.applySealed()
    } finally {
      await release()
    }
  }

  /** Steps 2 and 3 alone, for every batch sealed so far (by any roll-up, finished or not). */
  async applySealed (): Promise<RollupResult> {
    const result: RollupResult = { applied: 0, alreadyApplied: 0 }
    for (const batch of await this.opts.ledger.batches()) {
      if (await applyBatch(this.opts.db, batch)) result.applied++
      else if (batch.cells.length > 0) result.alreadyApplied++
      await this.opts.ledger.drop(batch.id)
    }
    if (result.applied > 0) {
      await this.opts.db.query(`DELETE FROM maestro_usage_rollups WHERE applied_at < NOW() - INTERVAL ${APPLIED_IDS_KEPT_DAYS} DAY`)
    }
    return result
  }
}

/** The turn as a Redis key with an expiry and a token: only the holder's token deletes it. */
export function redisRollupLock (client: Redis | Cluster, key: string, ttlMs: number): RollupLock {
  const commands = client as unknown as Record<string, (...args: string[]) => Promise<unknown>>
  for (const { name, numberOfKeys, lua } of loadLuaScripts(['usage-unlock-1'])) {
    if (typeof commands[name] !== 'function') client.defineCommand(name, { lua, numberOfKeys })
  }
  return {
    acquire: async () => {
      const token = randomUUID()
      if (await client.set(key, token, 'PX', ttlMs, 'NX') == null) return null
      return async () => { await commands['usage-unlock'].call(client, key, token) }
    }
  }
}

/** One process: a flag. */
export function memoryRollupLock (): RollupLock {
  let held = false
  return {
    acquire: async () => {
      if (held) return null
      held = true
      return async () => { held = false }
    }
  }
}

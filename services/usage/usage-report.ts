/**
 * `GET /admin/usage`'s rows: MariaDB's hourly rows plus what is still buffered (so a request is
 * visible at once), summed by the dimensions asked for.
 *
 * The two reads must not count a batch twice or miss one sealed between them: the buffer is read
 * at one instant (its live hours and every sealed batch, with the seal generation), then MariaDB
 * in one transaction (one snapshot: the rows and which of those batches were applied). A batch
 * applied in that snapshot is left out of the buffered side. A seal after the buffer was read
 * could put counts in MariaDB that the buffer also showed as live: the generation, read again
 * after MariaDB, tells, and the report reads again.
 */
import type { Query } from '../fleet/inventory.js'
import {
  FRACTIONAL_COUNTERS, HOUR_MS, USAGE_COUNTERS, addCounts, hourOf, roundFraction, zeroCounts,
  type UsageCell, type UsageCounts, type UsageLedger
} from './usage-ledger.js'
import type { UsageDb } from './usage-rollup.js'

export const USAGE_DIMENSIONS = ['client', 'model', 'assignment', 'hour'] as const
export type UsageDimension = typeof USAGE_DIMENSIONS[number]

export interface UsageQuery {
  /** ms; hours starting at or after from's hour count */
  from: number
  /** ms, exclusive: hours starting before it count */
  to: number
  /** one or more dimensions, each once; a row per combination of their values */
  groupBy: UsageDimension[]
}

/** The grouped dimensions' values (hour as ISO time, `2025-01-31T10:00:00.000Z`) and the counts. */
export type UsageRow = Partial<Record<UsageDimension, string>> & UsageCounts

/** A report retries this often when a seal ran under it, then answers what it read last. */
const READ_ATTEMPTS = 5
/** MySQL/MariaDB: table does not exist (a database `npm run migrate` has not touched yet). */
const ER_NO_SUCH_TABLE = 1146

const SQL_DIMENSION: Record<UsageDimension, string> = {
  client: 'client',
  model: 'model',
  assignment: 'assignment',
  hour: "DATE_FORMAT(hour, '%Y-%m-%dT%H:00:00.000Z')"
}
const SQL_SUMS = ['requests', 'prompt_tokens', 'cached_prompt_tokens', 'output_tokens', 'images', 'audio_seconds', 'gpu_seconds', 'errors']
  .map((column, i) => `SUM(${column}) AS ${USAGE_COUNTERS[i]}`).join(', ')

/** `YYYY-MM-DD HH:MM:SS`, UTC, rounded up to the second (DATETIME has no ms; `to` is exclusive). */
function sqlTime (ms: number): string {
  return new Date(Math.ceil(ms / 1000) * 1000).toISOString().slice(0, 19).replace('T', ' ')
}

function text (value: unknown): string {
  return Buffer.isBuffer(value) ? value.toString('utf8') : String(value)
}

class UsageTally {
  private readonly rows = new Map<string, UsageRow>()

  constructor (private readonly groupBy: UsageDimension[]) {}

  add (values: Record<UsageDimension, string>, counts: UsageCounts): void {
    const picked = this.groupBy.map((d) => values[d])
    const key = JSON.stringify(picked)
    let row = this.rows.get(key)
    if (row === undefined) {
      row = { ...Object.fromEntries(this.groupBy.map((d, i) => [d, picked[i]])), ...zeroCounts() }
      this.rows.set(key, row)
    }
    addCounts(row, counts)
  }

  addCell (cell: UsageCell): void {
    this.add({ client: cell.client, model: cell.model, assignment: cell.assignment, hour: new Date(cell.hour).toISOString() }, cell.counts)
  }

  sorted (): UsageRow[] {
    const rows = [...this.rows.values()]
    for (const row of rows) for (const c of FRACTIONAL_COUNTERS) row[c] = roundFraction(row[c])
    return rows.sort((a, b) => {
      for (const d of this.groupBy) {
        const x = a[d] as string
        const y = b[d] as string
        if (x !== y) return x < y ? -1 : 1
      }
      return 0
    })
  }
}

async function hourlyRows (query: Query, q: UsageQuery): Promise<Array<Record<string, unknown>>> {
  const dims = q.groupBy.map((d) => `${SQL_DIMENSION[d]} AS ${d}`).join(', ')
  const positions = q.groupBy.map((_, i) => i + 1).join(', ')
  return await query(`SELECT ${dims}, ${SQL_SUMS} FROM maestro_usage_hourly WHERE hour >= ? AND hour < ? GROUP BY ${positions}`,
    [sqlTime(hourOf(q.from)), sqlTime(q.to)])
}

async function readDatabase (db: UsageDb, q: UsageQuery, batchIds: string[]): Promise<{ rows: Array<Record<string, unknown>>, applied: Set<string> }> {
  try {
    return await db.transaction(async (query) => {
      const rows = await hourlyRows(query, q)
      const applied = batchIds.length === 0
        ? []
        : await query('SELECT id FROM maestro_usage_rollups WHERE id IN (?)', [batchIds])
      return { rows, applied: new Set(applied.map((r) => String(r.id))) }
    })
  } catch (err) {
    // Not migrated yet: nothing was ever rolled up, everything is still buffered.
    if ((err as { errno?: number }).errno === ER_NO_SUCH_TABLE) return { rows: [], applied: new Set() }
    throw err
  }
}

/** The usage of [from, to) grouped as asked: from MariaDB (when there is one) and the ledger's buffer. */
export async function usageReport (ledger: UsageLedger, db: UsageDb | null, q: UsageQuery): Promise<UsageRow[]> {
  const fromHour = hourOf(q.from)
  for (let attempt = 1; ; attempt++) {
    const buffered = await ledger.buffered(fromHour, q.to)
    const batches = buffered.batches.filter((b) => b.hour >= fromHour && b.hour < q.to)
    const stored = db == null ? { rows: [], applied: new Set<string>() } : await readDatabase(db, q, batches.map((b) => b.id))
    if (db != null && attempt < READ_ATTEMPTS && await ledger.generation() !== buffered.generation) continue
    const tally = new UsageTally(q.groupBy)
    for (const row of stored.rows) {
      const values = Object.fromEntries(q.groupBy.map((d) => [d, text(row[d])])) as Record<UsageDimension, string>
      const counts = zeroCounts()
      for (const c of USAGE_COUNTERS) counts[c] = Number(row[c])
      tally.add(values, counts)
    }
    for (const cell of buffered.live) tally.addCell(cell)
    for (const batch of batches) {
      if (!stored.applied.has(batch.id)) for (const cell of batch.cells) tally.addCell(cell)
    }
    return tally.sorted()
  }
}

/** The default window: the last 24 hours. */
export const DEFAULT_USAGE_WINDOW_MS = 24 * HOUR_MS
